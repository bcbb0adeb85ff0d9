"""Block-sparse attention, written plainly: select blocks, expand them to a token mask,
run dense attention.

This is the definition the gather kernel is checked against. It materialises an
``[N, M]`` mask and ``[B, H, N, M]`` scores, so it is for checking only.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.block_sparse.selection import (
    BlockSelection,
    block_layout,
    check_block_sparse_args,
    kept_blocks,
    select_blocks,
)
from attnopt.kernels.dense.reference import masked_attention, visible_keys

__all__ = ["block_sparse_attention_reference", "block_sparse_visible"]


def block_sparse_visible(
    selection: BlockSelection,
    q_len: int,
    kv_len: int,
    *,
    block: int,
    causal: bool,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[B, H, N, M]``: query ``i`` sees key ``j`` iff ``j``'s block is kept for
    ``i``'s block, causality allows it and ``j`` is not padding."""
    layout = block_layout(q_len, kv_len, block, causal)
    kept = kept_blocks(selection, layout.num_k_blocks)  # [B, H, nQ, nK]
    device = kept.device
    rows = torch.arange(q_len, device=device) + layout.offset
    qblock = rows.div(block, rounding_mode="floor") - layout.first_block
    has_block = rows >= 0  # causal queries before the first key belong to no block
    kblock = torch.arange(kv_len, device=device) // block
    B, H = kept.shape[:2]
    visible = torch.zeros(B, H, q_len, kv_len, dtype=torch.bool, device=device)
    if q_len and kv_len and layout.num_q_blocks:
        qb = qblock.clamp(min=0)
        visible = kept[:, :, qb][:, :, :, kblock] & has_block[:, None]
    dense = visible_keys(q_len, kv_len, causal=causal, kv_mask=kv_mask, device=device)
    return visible if dense is None else visible & dense


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    block: int = 64,
    topk: int | None = None,
    threshold: float | None = None,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    pattern: str = "dynamic",
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Block-sparse softmax attention over the blocks :func:`select_blocks` keeps.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        block, topk, threshold, local_blocks, sink_blocks, pattern: see
            :class:`~attnopt.kernels.block_sparse.BlockSparse`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` sees keys ``j <= i + M - N``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
        >>> block_sparse_attention_reference(q, k, v, block=32, topk=3, causal=True).shape
        torch.Size([1, 2, 200, 8])
    """
    caller = "block_sparse_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_block_sparse_args(caller, block, topk, threshold, local_blocks, sink_blocks, pattern)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else float(scale)
    selection = select_blocks(
        q,
        k,
        kv_mask,
        block=block,
        causal=causal,
        scale=scale,
        pattern=pattern,
        topk=topk,
        threshold=threshold,
        local_blocks=local_blocks,
        sink_blocks=sink_blocks,
    )
    visible = block_sparse_visible(
        selection, shapes.q_len, shapes.kv_len, block=block, causal=causal, kv_mask=kv_mask
    )
    return masked_attention(q, k, v, visible, scale=scale)
