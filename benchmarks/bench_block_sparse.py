"""Block-sparse attention vs SDPA on CPU: forward time, peak extra memory, error.

Problem: batch 1, 8 heads, head dim 64, fp32, forward only, default torch thread
count, blocks of 64 positions. Each row compares ``torch.ops.attnopt.block_sparse_attention``
(selection included) with ``torch.nn.functional.scaled_dot_product_attention`` under the
same causal flag (the CPU flash kernel). Rows: dynamic top-k keeping 1/8 of the key
blocks (``topk = N / 64 / 8``; a causal query block sees about half of them, so this
is about a quarter of the causal work) and 1/16 (about an eighth of the causal work),
causal and bidirectional, and the static radial pattern. The "kept / visible blocks"
column is measured from the selection: kept (query block, key block) pairs over the
pairs the causal flag allows. The fused C++ kernel serves these calls (built on first
use); the "gather path" row is the PyTorch path it replaces (run under
``attnopt.kernels.cpp_kernels_disabled``).

Measurement (see ``benchmarks/_harness.py``): every (implementation, length) pair runs
in a fresh subprocess; peak extra memory is the growth of the resident set during one
call, output included; time is the median (``--stat min``: the fastest) of
``--repeats`` calls after a warm-up.

Error: ``‖ours − exact‖ / ‖exact‖`` at N=4096 on the same random inputs as the timing,
with exact softmax attention (SDPA) as the truth. Random Gaussian q and k give an
almost uniform attention map, the worst case for any block selection, so these
errors are an upper bound rather than what a pretrained model sees.

Run: ``python benchmarks/bench_block_sparse.py --stat min``
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Measure the checkout this script lives in, not whichever attnopt is installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import child_entry, measure, relative_error, table  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 8, 64, 64

ROWS = [
    ("dynamic top-k 1/8", dict(causal=True, pattern="dynamic", fraction=8)),
    ("dynamic top-k 1/16", dict(causal=True, pattern="dynamic", fraction=16)),
    ("radial (local 4)", dict(causal=True, pattern="radial", local_blocks=4)),
    ("dynamic top-k 1/8", dict(causal=False, pattern="dynamic", fraction=8)),
    (
        "dynamic top-k 1/8, gather path",
        dict(causal=False, pattern="dynamic", fraction=8, fused=False),
    ),
]


def _inputs(n: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3)]


def _topk(n: int, params: dict) -> int | None:
    if params["pattern"] != "dynamic":
        return None
    return max(1, math.ceil(n / BLOCK) // params["fraction"])


def _op_args(params: dict) -> tuple:
    return (
        BLOCK,
        params.get("topk"),
        None,
        params.get("local_blocks", 1),
        params.get("sink_blocks", 1),
        params["pattern"],
    )


def _make_sdpa(n: int, params: dict):
    import torch.nn.functional as F

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=params["causal"])

    return (lambda: _inputs(n)), run


def _make_block_sparse(n: int, params: dict):
    import contextlib

    import torch

    from attnopt.kernels import cpp_kernels_disabled

    # fused=False: the PyTorch gather path, for this runner's calls only.
    path = contextlib.nullcontext if params.get("fused", True) else cpp_kernels_disabled

    import attnopt.kernels.block_sparse  # registers the op

    assert Path(attnopt.kernels.block_sparse.__file__).is_relative_to(_ROOT)
    args = _op_args(params)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def run(q, k, v):
        with path():
            return torch.ops.attnopt.block_sparse_attention(
                q, k, v, None, None, scale, params["causal"], *args
            )

    return (lambda: _inputs(n)), run


RUNNERS = {"sdpa": _make_sdpa, "block_sparse": _make_block_sparse}


def _density(n: int, params: dict) -> float:
    """Kept (query block, key block) pairs over those the causal flag lets a query block
    see, from the selection on the benchmark's inputs."""
    import torch

    from attnopt.kernels.block_sparse.selection import block_layout, select_blocks

    q, k, _ = _inputs(n)
    causal = params["causal"]
    with torch.no_grad():
        _, count = select_blocks(
            q, k, None, block=BLOCK, causal=causal, scale=1.0 / math.sqrt(HEAD_DIM),
            pattern=params["pattern"], topk=_topk(n, params), threshold=None,
            local_blocks=params.get("local_blocks", 1), sink_blocks=params.get("sink_blocks", 1),
        )  # fmt: skip
    L = block_layout(n, n, BLOCK, causal)
    rows = torch.arange(L.num_q_blocks) + L.first_block
    visible = (
        (rows + 1).clamp(max=L.num_k_blocks) if causal else torch.full_like(rows, L.num_k_blocks)
    )
    return count.double().sum().item() / (visible.sum().item() * count.shape[0] * count.shape[1])


def _error(n: int, params: dict) -> float:
    import torch

    params = {**params, "topk": _topk(n, params)}
    with torch.no_grad():
        q, k, v = _inputs(n)
        exact = RUNNERS["sdpa"](n, params)[1](q, k, v)
        ours = RUNNERS["block_sparse"](n, params)[1](q, k, v)
    return relative_error(ours, exact)


def main(argv: list[str] | None = None) -> None:
    if child_entry(RUNNERS):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--error-len", type=int, default=4096)
    args = parser.parse_args(argv)

    import torch

    print(
        f"B=1 H={HEADS} D={HEAD_DIM} fp32, block {BLOCK}, forward only, {args.stat} of "
        f"{args.repeats} calls, {torch.get_num_threads()} threads"
    )
    print()
    script = str(Path(__file__).resolve())
    rows = []
    errors = {i: _error(args.error_len, p) for i, (_, p) in enumerate(ROWS)}
    for n in args.seq_lens:
        base = {}
        for causal in sorted({p["causal"] for _, p in ROWS}, reverse=True):
            base[causal] = measure(script, "sdpa", n, {"causal": causal}, args.repeats, args.stat)
        for i, (name, params) in enumerate(ROWS):
            # The config (topk included) is fixed per row, as in a converted model; the
            # harness's warm-up runs it on a short input first.
            topk = _topk(n, params)
            params = {**params, "topk": topk}
            ours = measure(script, "block_sparse", n, params, args.repeats, args.stat)
            sdpa = base[params["causal"]]
            mark = "" if sdpa["exact_peak"] and ours["exact_peak"] else "*"
            rows.append(
                {
                    "n": n,
                    "config": f"{name}" + (f" (topk={topk})" if topk else ""),
                    "causal": "yes" if params["causal"] else "no",
                    "density": f"1/{1 / _density(n, params):.1f}",
                    "sdpa_ms": f"{sdpa['ms']:.1f}",
                    "ours_ms": f"{ours['ms']:.1f}",
                    "speedup": f"{sdpa['ms'] / ours['ms']:.1f}x",
                    "sdpa_mib": f"{sdpa['peak_mib']:.1f}{mark}",
                    "ours_mib": f"{ours['peak_mib']:.1f}{mark}",
                    "error": f"{errors[i]:.3f}",
                }
            )
            print(f"measured N={n} {rows[-1]['config']}", file=sys.stderr, flush=True)
    columns = [
        ("n", "N"),
        ("config", "block sparse"),
        ("causal", "causal"),
        ("density", "kept / visible blocks"),
        ("sdpa_ms", "SDPA (ms)"),
        ("ours_ms", "ours (ms)"),
        ("speedup", "speedup"),
        ("sdpa_mib", "SDPA peak extra (MiB)"),
        ("ours_mib", "ours peak extra (MiB)"),
        ("error", f"rel. error @N={args.error_len}"),
    ]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
