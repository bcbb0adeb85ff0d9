"""Sliding-window attention vs causal SDPA on CPU: forward time and peak extra memory.

Problem: batch 1, 8 heads, head dim 64, fp32, causal, window 256 (no sinks, no
dilation), forward only, default torch thread count. The baseline is
``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``, i.e. full
causal attention (the CPU flash kernel); ours is
``torch.ops.attnopt.sliding_window_attention``.

How memory is measured: every (implementation, length) pair runs in a fresh Python
subprocess, so allocator caches and earlier peaks of one measurement cannot hide or
inflate another. The child first runs the op once on a tiny problem (library and
thread-pool initialisation), then allocates q, k and v, resets the kernel's
resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), reads the resident
set size, runs the op once, and reports ``VmHWM - VmRSS_before`` from
``/proc/self/status``: the peak growth of resident memory during the call, output
included. This needs Linux; where ``clear_refs`` cannot be written the child falls
back to ``ru_maxrss`` growth, which is a lower bound if an earlier peak was higher
(the table marks such numbers with ``*``).

How time is measured: in the same child, after one warm-up call, the median (or with
``--stat min``, the fastest) of ``--repeats`` calls timed with ``time.perf_counter``.
On a shared machine other processes inflate some calls; ``min`` is then the steadier
statistic.

Run: ``python benchmarks/bench_sliding_window.py --seq-lens 1024 4096 16384 --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Measure the checkout this script lives in, not whichever attnopt is installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

IMPLS = ("sdpa", "sliding_window")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(impl: str, n: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import attnopt.kernels.sliding_window  # registers the op

    assert Path(attnopt.kernels.sliding_window.__file__).is_relative_to(_ROOT)

    scale = 1.0 / math.sqrt(args.head_dim)

    def run(q, k, v):
        if impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.ops.attnopt.sliding_window_attention(
            q, k, v, None, None, scale, True, args.window, 0, 1
        )

    gen = torch.Generator().manual_seed(0)

    def inputs(length):
        shape = (args.batch, args.heads, length, args.head_dim)
        return [torch.randn(shape, generator=gen) for _ in range(3)]

    with torch.no_grad():
        run(*inputs(min(n, 2 * args.window)))  # one-time initialisation, not measured
        q, k, v = inputs(n)
        exact = _reset_peak()
        before_rss = _status_kib("VmRSS")
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run(q, k, v)
        if exact:
            peak_kib = _status_kib("VmHWM") - before_rss
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(
                before_max, before_rss
            )
        del out
        run(q, k, v)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run(q, k, v)
            times.append(time.perf_counter() - t0)
    stat = min if args.stat == "min" else statistics.median
    return {
        "ms": stat(times) * 1e3,
        "peak_mib": max(peak_kib, 0) / 1024,
        "exact_peak": exact,
        "threads": torch.get_num_threads(),
    }


def _measure(impl: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--seq-lens",
        str(n),
        "--repeats",
        str(args.repeats),
        "--window",
        str(args.window),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--batch",
        str(args.batch),
        "--stat",
        args.stat,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.child, args.seq_lens[0], args)))
        return

    print(
        f"B={args.batch} H={args.heads} D={args.head_dim} fp32 causal window={args.window}, "
        f"forward only, {args.stat} of {args.repeats} calls, {_threads()} threads"
    )
    print()
    print(
        "| N | SDPA causal (ms) | sliding window (ms) | speedup | SDPA peak extra (MiB) "
        "| ours peak extra (MiB) | memory ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.seq_lens:
        base = _measure("sdpa", n, args)
        ours = _measure("sliding_window", n, args)
        mark = "" if base["exact_peak"] and ours["exact_peak"] else "*"
        ratio = ours["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
        print(
            f"| {n} | {base['ms']:.1f} | {ours['ms']:.1f} | {base['ms'] / ours['ms']:.1f}x "
            f"| {base['peak_mib']:.1f}{mark} | {ours['peak_mib']:.1f}{mark} | {ratio:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
