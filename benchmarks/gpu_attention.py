"""Time attnopt's ops on a CUDA GPU against the strongest peer doing the same work.

Each attnopt op is called through ``torch.ops.attnopt.*`` on CUDA tensors, so it runs the
Triton kernel registered for CUDA (a row prints ``n/a`` with the reason when an op or
its kernel is missing). Peers, in the same run and on the same inputs:

* sliding window and block-sparse: FlexAttention with the identical block mask
  (``create_block_mask`` for the window; the selection of
  :func:`attnopt.kernels.block_sparse.selection.select_blocks` turned into a
  ``BlockMask`` with ``BlockMask.from_kv_blocks`` for block-sparse), and dense causal
  FlashAttention through SDPA;
* causal linear attention (feature map ``elu``): flash-linear-attention's chunked
  kernel (``fla.ops.linear_attn.chunk_linear_attn``) when ``fla`` is importable.

Throughput counts the useful work only: ``4 · pairs · D`` FLOPs forward (``q·kᵀ`` and
``p·v`` over the attended (query, key) pairs), 3.5× that for forward + backward (the
backward's five matmuls are 2.5× the forward's two). Linear attention counts
``4 · N · D · Dv`` per head forward (one state update and one state read per token).
Every row is also given as a share of the GPU's dense bf16 matmul rate, measured in the
same run. Timing: CUDA events around each call, after warm-up, median of ``--iters``.

Usage::

    python benchmarks/gpu_attention.py                       # N = 4k, 16k, 64k
    python benchmarks/gpu_attention.py --seq-lens 16384 --window 1024 --passes fwd
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731  (argparse type)
    p.add_argument("--seq-lens", type=ints, default=[4096, 16384, 65536], help="e.g. 4096,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--window", type=int, default=1024, help="sliding window (keys per query)")
    p.add_argument("--sinks", type=int, default=0, help="sliding-window sink keys")
    p.add_argument("--block", type=int, default=128, help="block-sparse block size")
    p.add_argument("--density", type=float, default=1 / 8, help="block-sparse kept fraction")
    p.add_argument("--chunk", type=int, default=64, help="linear attention chunk")
    p.add_argument(
        "--variants", default="sliding_window,block_sparse,linear", help="comma-separated subset"
    )
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args(argv)


# -- timing -------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` on the current stream (CUDA events per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(dtype: torch.dtype, warmup: int, iters: int, n: int = 8192) -> float:
    """The GPU's dense matmul rate in this dtype (an ``n × n × n`` product)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _step(fn: Callable[[], torch.Tensor], backward: bool, grad: torch.Tensor | None):
    """One timed call: the forward alone, or forward then backward into the leaves."""
    if not backward:

        def run():
            with torch.no_grad():
                return fn()

        return run

    def run_bwd():
        out = fn()
        out.backward(grad)

    return run_bwd


# -- useful work --------------------------------------------------------------------------------


def sliding_window_pairs(n: int, window: int, sinks: int) -> int:
    """Attended (query, key) pairs of causal sliding-window attention over ``n`` tokens."""
    i = torch.arange(n, dtype=torch.int64)
    in_window = torch.clamp(i + 1, max=window)
    extra_sinks = torch.clamp(torch.clamp(i - window + 1, min=0), max=sinks)
    return int((in_window + extra_sinks).sum())


def block_sparse_pairs(count: torch.Tensor, index: torch.Tensor, n: int, block: int) -> int:
    """Attended pairs of causal block-sparse attention: full blocks below the diagonal,
    the causal triangle on it (summed over batch and heads)."""
    nq = count.shape[-1]
    k = index.shape[-1]
    kept = torch.arange(k, device=count.device) < count[..., None]  # [B, H, nQ, K]
    qb = torch.arange(nq, device=count.device)[:, None]
    q_rows = torch.clamp(n - qb * block, max=block)  # rows of each query block
    diag = (index == qb) & kept
    below = (index < qb) & kept
    k_cols = torch.clamp(n - index.to(torch.int64) * block, max=block)
    pairs = (below * q_rows * k_cols).sum() + (diag * q_rows * (q_rows + 1) // 2).sum()
    return int(pairs)


# -- rows ---------------------------------------------------------------------------------------


class Table:
    def __init__(self, peak: float):
        self.peak = peak
        self.rows: list[tuple[str, ...]] = []

    def add(self, variant, n, pass_, impl, ms, flops, ours_ms, note=""):
        """One row; ``ours_ms`` (attnopt's time for the same work) gives the speedup
        column, peer time / attnopt time."""
        if ms is None:
            self.rows.append((variant, str(n), pass_, impl, "n/a", "", "", "", note))
            return
        tflops = flops / (ms * 1e-3) / 1e12
        ratio = "" if ours_ms is None else f"{ms / ours_ms:.2f}x"
        self.rows.append(
            (variant, str(n), pass_, impl, f"{ms:.3f}", f"{tflops:.1f}",
             f"{100 * tflops / self.peak:.0f}%", ratio, note)
        )  # fmt: skip

    def print(self):
        head = ("variant", "N", "pass", "implementation", "ms", "useful TFLOP/s", "% matmul",
                "attnopt speedup", "note")  # fmt: skip
        rows = [head, *self.rows]
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        for r, row in enumerate(rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if r == 0:
                print("  ".join("-" * w for w in widths))


def _try_time(fn, warmup, iters) -> tuple[float | None, str]:
    try:
        return time_ms(fn, warmup, iters), ""
    except Exception as exc:  # noqa: BLE001  (a missing kernel or peer prints n/a, not a crash)
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def _compare(table, args, variant, n, ours, peers, flops):
    """Time ``ours`` and each peer for every requested pass; ratios are peer / ours."""
    for pass_ in args.passes.split(","):
        backward = pass_ == "fwd+bwd"
        pass_flops = flops * (3.5 if backward else 1.0)
        ours_fn, grad = ours
        ours_ms, note = _try_time(_step(ours_fn, backward, grad), args.warmup, args.iters)
        table.add(variant, n, pass_, "attnopt (Triton)", ours_ms, pass_flops, None, note)
        for name, (fn, g) in peers.items():
            ms, note = _try_time(_step(fn, backward, g), args.warmup, args.iters)
            table.add(variant, n, pass_, name, ms, pass_flops, ours_ms, note)


def _inputs(args, n, dtype):
    hkv = args.kv_heads or args.heads
    shape_q = (args.batch, args.heads, n, args.head_dim)
    shape_kv = (args.batch, hkv, n, args.head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(shape_q, device="cuda", dtype=dtype)
    return q, k, v, grad


def _flex():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), create_block_mask, BlockMask


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=gqa
        )


def bench_sliding_window(table, args, n, dtype):
    q, k, v, grad = _inputs(args, n, dtype)
    scale = 1 / math.sqrt(args.head_dim)
    window, sinks = args.window, args.sinks
    flops = 4 * sliding_window_pairs(n, window, sinks) * args.head_dim * args.batch * args.heads

    def ours():
        return torch.ops.attnopt.sliding_window_attention(
            q, k, v, None, None, scale, True, window, sinks, 1
        )

    peers = {}
    try:
        flex, create_block_mask, _ = _flex()

        def mask_mod(b, h, qi, ki):
            delta = qi - ki
            return (delta >= 0) & ((delta < window) | (ki < sinks))

        bm = create_block_mask(mask_mod, None, None, n, n, device="cuda", _compile=True)
        gqa = q.shape[1] != k.shape[1]
        peers["FlexAttention (same mask)"] = (
            lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa),
            grad,
        )
    except Exception as exc:  # noqa: BLE001  (the peer is optional; its row says why)
        table.add("sliding_window", n, "-", "FlexAttention", None, 0, None, repr(exc)[:80])
    peers["SDPA flash (dense causal)"] = (lambda: _sdpa_flash(q, k, v), grad)
    _compare(table, args, f"sliding_window w={window}", n, (ours, grad), peers, flops)


def bench_block_sparse(table, args, n, dtype):
    from attnopt.kernels.block_sparse.selection import select_blocks

    q, k, v, grad = _inputs(args, n, dtype)
    scale = 1 / math.sqrt(args.head_dim)
    block = args.block
    topk = max(1, round(args.density * math.ceil(n / block)))
    with torch.no_grad():
        sel = select_blocks(q, k, block=block, causal=True, scale=scale, topk=topk)
    flops = 4 * block_sparse_pairs(sel.count, sel.index, n, block) * args.head_dim

    def ours():
        return torch.ops.attnopt.block_sparse_attention(
            q, k, v, None, None, scale, True, block, topk, None, 1, 1, "dynamic"
        )

    peers = {}
    try:
        flex, _, BlockMask = _flex()

        def causal(b, h, qi, ki):
            return qi >= ki

        count = sel.count.to(torch.int32).contiguous()
        index = sel.index.to(torch.int32).contiguous()
        bm = BlockMask.from_kv_blocks(count, index, BLOCK_SIZE=block, mask_mod=causal,
                                      seq_lengths=(n, n))  # fmt: skip
        gqa = q.shape[1] != k.shape[1]
        peers["FlexAttention (same blocks)"] = (
            lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa),
            grad,
        )
    except Exception as exc:  # noqa: BLE001  (the peer is optional; its row says why)
        table.add("block_sparse", n, "-", "FlexAttention", None, 0, None, repr(exc)[:80])
    peers["SDPA flash (dense causal)"] = (lambda: _sdpa_flash(q, k, v), grad)
    variant = f"block_sparse b={block} top{topk}"
    _compare(table, args, variant, n, (ours, grad), peers, flops)


def bench_linear(table, args, n, dtype):
    q, k, v, grad = _inputs(args, n, dtype)
    scale = 1 / math.sqrt(args.head_dim)
    flops = 4 * n * args.head_dim * args.head_dim * args.batch * args.heads

    def ours():
        return torch.ops.attnopt.linear_attention(
            q, k, v, None, None, scale, True, "elu", args.chunk, None, 1e-6, None, None, None, None
        )

    peers = {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        def fla_run():
            # fla takes [B, T, H, D] and no feature map: apply elu + 1 as attnopt does.
            qf = (torch.nn.functional.elu(q) + 1).transpose(1, 2)
            kf = (torch.nn.functional.elu(k) + 1).transpose(1, 2)
            o, _ = chunk_linear_attn(qf, kf, v.transpose(1, 2), scale=scale, normalize=True)
            return o.transpose(1, 2)

        peers["flash-linear-attention chunk"] = (fla_run, grad)
    except ImportError as exc:
        table.add("linear elu causal", n, "-", "fla", None, 0, None, f"not importable: {exc}")
    _compare(table, args, "linear elu causal", n, (ours, grad), peers, flops)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu_attention.py needs a CUDA device, and torch.cuda.is_available() is "
            "False here; run it on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    import attnopt  # noqa: F401  (registers the attnopt:: ops and their CUDA kernels)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    peak = matmul_tflops(dtype, args.warmup, args.iters)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"dense {args.dtype} matmul (8192^3): {peak:.1f} TFLOP/s")
    print(
        f"batch {args.batch}, heads {args.heads}/{args.kv_heads or args.heads}, "
        f"head dim {args.head_dim}, {args.dtype}; speedup = peer time / attnopt time\n"
    )
    benches = {
        "sliding_window": bench_sliding_window,
        "block_sparse": bench_block_sparse,
        "linear": bench_linear,
    }
    table = Table(peak)
    for n in args.seq_lens:
        for name in args.variants.split(","):
            if name not in benches:
                raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(benches)}")
            try:
                benches[name](table, args, n, dtype)
            except Exception as exc:  # noqa: BLE001  (one failing variant must not end the run)
                table.add(name, n, "-", "setup", None, 0, None, repr(exc)[:100])
            torch.cuda.empty_cache()
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
