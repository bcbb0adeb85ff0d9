"""Block-sparse attention forward through the fused C++ CPU kernel (``block_sparse_cpu.cpp``).

The gather path (:mod:`~attnopt.kernels.block_sparse.gather`) copies every query
block's kept key and value blocks into buffers before its matmuls; at 16k positions
with an eighth of the blocks kept, that is gigabytes of copies. The C++ kernel reads
the value blocks in place and transposes one kept key block at a time into a
per-thread tile that stays in cache: one work item is one query block of one head,
items run in parallel, the matmuls run on oneDNN's brgemm micro-kernel, and the
softmax is an online one over groups of four kept blocks (so the score buffer stays
small whatever ``topk``). It computes what the gather path computes (the tests
compare both with the naive reference).

It serves inference on CPU with fp32 q, k, v whose rows are contiguous; everything
else (autograd, half precision, other devices) and every call where the kernel cannot
be built (see :mod:`attnopt.kernels._cpp`) takes the gather path.

Memory: besides the output, per thread ``block·(2·D + 4·block + 3)`` numbers (97 KiB
at block 64, D 64), allocated once per call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnopt.kernels._cpp import fp32_cpu_rows, load_extension
from attnopt.kernels.block_sparse.selection import block_layout

__all__ = ["fused_block_sparse"]

_SOURCE = Path(__file__).with_name("block_sparse_cpu.cpp")


def fused_block_sparse(
    q, k, v, kv_mask, selection, *, block: int, scale: float, causal: bool
) -> torch.Tensor | None:
    """The forward of checked inputs over ``selection`` (as
    :func:`~attnopt.kernels.block_sparse.gather.block_sparse_forward`), or None where
    the fused kernel does not apply or cannot be built."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grad or not all(fp32_cpu_rows(t) for t in (q, k, v)):
        return None
    ext = load_extension(_SOURCE)
    if ext is None:
        return None
    from attnopt.kernels.block_sparse.gather import key_bias_of

    B, H, N, _ = q.shape
    M = k.shape[2]
    L = block_layout(N, M, block, causal)
    out = torch.empty(B, H, N, v.shape[-1], dtype=torch.float32)
    out[:, :, : L.row_start - L.offset].zero_()  # causal rows before key 0 see nothing
    bias = None if kv_mask is None else key_bias_of(kv_mask, M, M, torch.float32, q.device)
    index, count = selection
    ext.block_sparse_fwd(
        q,
        k,
        v,
        index.to(torch.int32),
        count.to(torch.int32),
        bias,
        out,
        L.block,
        L.offset,
        L.first_block,
        L.row_start,
        L.row_end,
        causal,
        scale,
    )
    return out
