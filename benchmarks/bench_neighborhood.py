"""Neighbourhood and agent attention vs non-causal SDPA on CPU: time, memory, error.

Problem: batch 1, 8 heads, head dim 64, fp32, non-causal, forward only, default torch
thread count; the ``N`` tokens lay out as a grid (``4096`` = 64×64, ``16384`` =
128×128; the 3-D rows use 16×16×16 and 16×32×32). Rows:

* ``neighborhood 2-D``: ``torch.ops.attnopt.neighborhood_attention``, kernel 13×13;
* ``neighborhood 3-D``: the same op, kernel 3×7×7 (causal-free video-like window);
* ``agent``: ``torch.ops.attnopt.agent_attention`` with 49 agents (a 7×7 agent grid).

The baseline is ``torch.nn.functional.scaled_dot_product_attention`` without a mask
(the CPU flash kernel). Time and peak extra memory come from
:mod:`benchmarks._harness` (one subprocess per measurement; see there). The
relative error is ``‖ours − exact‖ / ‖exact‖`` against exact softmax attention on
the same random inputs at ``N = 4096``. Random q/k give nearly uniform attention
over all keys, so any local or low-rank approximation is far from it there: the
column says how different the variant is, not how well it would do on a trained
model's attention.

Run: ``python benchmarks/bench_neighborhood.py --repeats 3 --stat min``
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

KERNEL_2D = (13, 13)
KERNEL_3D = (3, 7, 7)
AGENTS = 49


def token_grid(n: int, rank: int) -> tuple[int, ...]:
    """``n`` tokens as a near-cubic grid of ``rank`` axes (64×64 for 4096, 16×32×32 for
    16384 in 3-D); the smaller sides first."""
    sides = []
    rest = n
    for left in range(rank, 1, -1):
        side = max(
            d
            for d in range(1, math.isqrt(rest) + 1)
            if rest % d == 0 and d <= round(rest ** (1 / left))
        )
        sides.append(side)
        rest //= side
    return (*sides, rest)


def _inputs(n: int, params: dict):
    import torch

    def make():
        gen = torch.Generator().manual_seed(0)
        shape = (params["batch"], params["heads"], n, params["head_dim"])
        return [torch.randn(shape, generator=gen) for _ in range(3)]

    return make


def _sdpa(n: int, params: dict):
    import torch.nn.functional as F

    return _inputs(n, params), lambda q, k, v: F.scaled_dot_product_attention(q, k, v)


def _neighborhood(rank: int, kernel: tuple[int, ...]):
    def make(n: int, params: dict):
        import torch

        import attnopt.kernels.neighborhood  # noqa: F401  (registers the op)

        grid = list(token_grid(n, rank))
        args = (list(kernel), [1] * rank, [1] * rank, [False] * rank)
        scale = params["head_dim"] ** -0.5

        def run(q, k, v):
            return torch.ops.attnopt.neighborhood_attention(q, k, v, None, None, scale, grid, *args)

        return _inputs(n, params), run

    return make


def _agent(n: int, params: dict):
    import torch

    import attnopt.kernels.agent  # noqa: F401  (registers the op)

    grid = list(token_grid(n, 2))
    scale = params["head_dim"] ** -0.5

    def run(q, k, v):
        return torch.ops.attnopt.agent_attention(q, k, v, None, None, scale, AGENTS, grid)

    return _inputs(n, params), run


RUNNERS = {
    "sdpa": _sdpa,
    "neighborhood_2d": _neighborhood(2, KERNEL_2D),
    "neighborhood_3d": _neighborhood(3, KERNEL_3D),
    "agent": _agent,
}

ROWS = {
    "neighborhood_2d": f"neighborhood 2-D {KERNEL_2D[0]}×{KERNEL_2D[1]}",
    "neighborhood_3d": "neighborhood 3-D " + "×".join(map(str, KERNEL_3D)),
    "agent": f"agent ({AGENTS} agents)",
}


def _errors(n: int, params: dict) -> dict[str, float]:
    """Relative error of each variant against exact attention on one random problem."""
    import torch

    with torch.no_grad():
        make, exact_run = _sdpa(n, params)
        exact = exact_run(*make())
        out = {}
        for name in ROWS:
            make, run = RUNNERS[name](n, params)
            out[name] = relative_error(run(*make()), exact)
    return out


def main(argv: list[str] | None = None) -> None:
    if child_entry(RUNNERS):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--error-len", type=int, default=4096)
    args = parser.parse_args(argv)
    params = {"batch": 1, "heads": 8, "head_dim": 64}

    import torch

    print(
        f"B=1 H=8 D=64 fp32 non-causal, forward only, {args.stat} of {args.repeats} calls, "
        f"{torch.get_num_threads()} threads; relative error vs exact attention at "
        f"N={args.error_len} on random inputs"
    )
    print()
    errors = _errors(args.error_len, params)
    rows = []
    for n in args.seq_lens:
        base = measure(__file__, "sdpa", n, params, args.repeats, args.stat)
        for name in args.rows:
            ours = measure(__file__, name, n, params, args.repeats, args.stat)
            mark = "" if base["exact_peak"] and ours["exact_peak"] else "*"
            rank = 3 if name == "neighborhood_3d" else 2
            rows.append(
                {
                    "variant": ROWS[name],
                    "n": f"{n} ({'×'.join(map(str, token_grid(n, rank)))})",
                    "sdpa_ms": f"{base['ms']:.1f}",
                    "ours_ms": f"{ours['ms']:.1f}",
                    "speedup": f"{base['ms'] / ours['ms']:.1f}x",
                    "sdpa_mib": f"{base['peak_mib']:.1f}{mark}",
                    "ours_mib": f"{ours['peak_mib']:.1f}{mark}",
                    "error": f"{errors[name]:.3f}",
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    columns = [
        ("variant", "variant"),
        ("n", "N (grid)"),
        ("sdpa_ms", "SDPA (ms)"),
        ("ours_ms", "ours (ms)"),
        ("speedup", "speedup"),
        ("sdpa_mib", "SDPA peak extra (MiB)"),
        ("ours_mib", "ours peak extra (MiB)"),
        ("error", f"rel. error @{args.error_len}"),
    ]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
