"""Linear and hybrid attention vs SDPA on CPU: forward time, peak extra memory, error.

Problem: batch 1, 8 heads, head dim 64, fp32, random normal q, k, v, forward only,
default torch thread count. Rows:

* linear, bidirectional: ``attnopt::linear_attention`` (``causal=False``) against
  ``scaled_dot_product_attention`` (no mask);
* linear, causal chunked: ``attnopt::linear_attention`` (``causal=True``, chunk 64)
  against SDPA with ``is_causal=True``: the fused C++ kernel (built on first use),
  then the PyTorch path it replaces (``attnopt.kernels.cpp_kernels_disabled``);
* hybrid: ``attnopt::hybrid_attention`` (window 64, 4 sinks, chunk 64) against
  causal SDPA.

The feature map is ``--feature-map`` (default elu). Time and memory come from
:mod:`benchmarks._harness` (one subprocess per measurement; peak growth of resident
memory during one call, output included). The last column is the relative error
``‖ours − softmax‖ / ‖softmax‖`` against exact softmax attention (SDPA with the same
mask) on the same random inputs at N = 4096. Linear attention is an approximation,
not a rewrite that keeps the numbers, so on random inputs this error is large; it
is reported, not hidden.

Run: ``python benchmarks/bench_linear.py --seq-lens 4096 16384 --repeats 3 --stat min``
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Measure the checkout this script lives in, not whichever attnopt is installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from benchmarks._harness import child_entry, measure, relative_error, table  # noqa: E402

B, H, D = 1, 8, 64


def _qkv(n: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=gen) for _ in range(3))


def _feature_tensors(feature_map: str):
    from attnopt.kernels.linear import FeatureMapParameters

    params = FeatureMapParameters(feature_map, heads=H, kv_heads=H, head_dim=D, seed=0)
    if feature_map == "softmax_rf":
        return params.projection, None, params.projection, None
    if feature_map == "hedgehog":
        return params.q_weight.data, params.q_bias.data, params.k_weight.data, params.k_bias.data
    return None, None, None, None


def _sdpa(n: int, params: dict):
    import torch.nn.functional as F

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=params["causal"])

    return (lambda: _qkv(n)), run


def _linear(n: int, params: dict):
    import contextlib

    import torch

    from attnopt.kernels import cpp_kernels_disabled

    # fused=False: the PyTorch path, for this runner's calls only.
    path = contextlib.nullcontext if params.get("fused", True) else cpp_kernels_disabled

    import attnopt.kernels.linear  # noqa: F401  (registers the op)

    tensors = _feature_tensors(params["feature_map"])

    def run(q, k, v):
        with path():
            return torch.ops.attnopt.linear_attention(
                q, k, v, None, None, 1 / math.sqrt(D), params["causal"], params["feature_map"],
                params["chunk"], None, 1e-6, *tensors,
            )  # fmt: skip

    return (lambda: _qkv(n)), run


def _hybrid(n: int, params: dict):
    import torch

    import attnopt.kernels.hybrid  # noqa: F401  (registers the op)

    tensors = _feature_tensors(params["feature_map"])

    def run(q, k, v):
        return torch.ops.attnopt.hybrid_attention(
            q, k, v, None, None, 1 / math.sqrt(D), True, params["window"], params["sinks"],
            params["feature_map"], params["chunk"], *tensors, None,
        )  # fmt: skip

    return (lambda: _qkv(n)), run


RUNNERS = {"sdpa": _sdpa, "linear": _linear, "hybrid": _hybrid}


def _error_at(n: int, name: str, params: dict, causal: bool) -> float:
    """Relative error of ``name`` against exact softmax attention on the same inputs."""
    import torch

    with torch.no_grad():
        q, k, v = _qkv(n, seed=1)
        exact = _sdpa(n, {"causal": causal})[1](q, k, v)
        ours = RUNNERS[name](n, params)[1](q, k, v)
    return relative_error(ours, exact)


def main(argv: list[str] | None = None) -> None:
    if child_entry(RUNNERS):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--feature-map", default="elu")
    parser.add_argument("--error-len", type=int, default=4096)
    args = parser.parse_args(argv)

    import torch

    fm = args.feature_map
    cases = [
        ("linear, bidirectional", False, "linear", dict(causal=False, feature_map=fm, chunk=64)),
        ("linear, causal chunked", True, "linear", dict(causal=True, feature_map=fm, chunk=64)),
        (
            "linear, causal chunked, PyTorch path",
            True,
            "linear",
            dict(causal=True, feature_map=fm, chunk=64, fused=False),
        ),
        (
            "hybrid (window 64, 4 sinks)",
            True,
            "hybrid",
            dict(window=64, sinks=4, feature_map=fm, chunk=64),
        ),
    ]
    print(
        f"B={B} H={H} D={D} fp32, feature map {fm}, forward only, {args.stat} of "
        f"{args.repeats} calls, {torch.get_num_threads()} threads; relative error vs exact "
        f"softmax attention at N={args.error_len}"
    )
    print()
    rows = []
    for label, causal, name, params in cases:
        error = _error_at(args.error_len, name, params, causal)
        for n in args.seq_lens:
            base = measure(__file__, "sdpa", n, {"causal": causal}, args.repeats, args.stat)
            ours = measure(__file__, name, n, params, args.repeats, args.stat)
            mark = "" if base["exact_peak"] and ours["exact_peak"] else "*"
            rows.append(
                {
                    "case": label,
                    "n": n,
                    "sdpa_ms": f"{base['ms']:.1f}",
                    "ours_ms": f"{ours['ms']:.1f}",
                    "speedup": f"{base['ms'] / ours['ms']:.1f}x",
                    "sdpa_mib": f"{base['peak_mib']:.1f}{mark}",
                    "ours_mib": f"{ours['peak_mib']:.1f}{mark}",
                    "error": f"{error:.3f}",
                }
            )
            print(f"  measured {label} at N={n}", file=sys.stderr, flush=True)
    print(
        table(
            rows,
            [
                ("case", "case"),
                ("n", "N"),
                ("sdpa_ms", "SDPA (ms)"),
                ("ours_ms", "ours (ms)"),
                ("speedup", "speedup"),
                ("sdpa_mib", "SDPA peak extra (MiB)"),
                ("ours_mib", "ours peak extra (MiB)"),
                ("error", "rel. error vs softmax"),
            ],
        )
    )


if __name__ == "__main__":
    main()
