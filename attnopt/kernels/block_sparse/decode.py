"""Block-sparse attention for token generation: block selection for the current query.

The cache keeps every key (block-sparse attention may pick any past block). For the
newest query, at position ``M − 1`` of ``M`` cached keys, the key blocks are
mean-pooled, scored against the query itself (its own query block is just this one
query), and the forced blocks (local band, sinks) plus the ``topk`` best (or the
``threshold`` share of estimated mass) are kept, by the rule of
:func:`~attnopt.kernels.block_sparse.selection.select_blocks`. Only the kept blocks'
keys are gathered and attended, so the softmax costs O(kept·block) instead of O(M).

This is the selection the variant makes for a query block of one query, i.e. exactly
:func:`~attnopt.kernels.block_sparse.reference.block_sparse_attention_reference` on
``q [B, H, 1, D]`` against the whole cache; a full-sequence forward pools queries over
whole blocks and can therefore choose differently.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels.block_sparse.selection import select_blocks
from attnopt.kernels.dense.reference import compute_dtype

__all__ = ["block_sparse_decode_attention"]


def block_sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    block: int,
    topk: int | None = None,
    threshold: float | None = None,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    pattern: str = "dynamic",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention of one new query per row over the whole cache.

    Args:
        q: ``[B, H, 1, D]``, the query at position ``M − 1``.
        k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``: every cached key, in order.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        block, topk, threshold, local_blocks, sink_blocks, pattern: as in
            :class:`~attnopt.kernels.block_sparse.BlockSparse`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.

    Returns:
        ``[B, H, 1, Dv]`` in ``q.dtype``; a query that sees no key returns zeros.

    Example:
        >>> q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8)
        >>> block_sparse_decode_attention(q, k, v, block=64, topk=2).shape
        torch.Size([1, 2, 1, 8])
    """
    B, H, N, D = q.shape
    if N != 1:
        raise ValueError(
            f"block_sparse_decode_attention: q must hold one query (N = 1), got N = {N}"
        )
    Hkv, M = k.shape[1], k.shape[2]
    rep = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    index, count = select_blocks(
        q,
        k,
        kv_mask,
        block=block,
        causal=True,
        scale=scale,
        pattern=pattern,
        topk=topk,
        threshold=threshold,
        local_blocks=local_blocks,
        sink_blocks=sink_blocks,
    )
    index, count = index[:, :, 0].long(), count[:, :, 0].long()  # [B, H, K], [B, H]
    K = index.shape[-1]
    index, count = index.expand(B, H, K), count.expand(B, H)
    tokens = index[..., None] * block + torch.arange(block, device=q.device)  # [B, H, K, blk]
    slot_ok = torch.arange(K, device=q.device)[None, None, :, None] < count[..., None, None]
    ok = slot_ok & (tokens < M)
    tokens = torch.where(ok, tokens, 0).reshape(B, H, K * block)
    ok = ok.reshape(B, H, K * block)
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape)).expand(B, H, M)
        ok = ok & km.gather(-1, tokens)
    ct = compute_dtype(q.dtype)
    T = K * block
    # Gather per query head from its kv head, without repeating K/V for the group.
    idx = tokens.reshape(B, Hkv, rep * T)
    k_sel = k.gather(2, idx[..., None].expand(-1, -1, -1, D)).reshape(B, Hkv, rep, T, D)
    v_sel = v.gather(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
    v_sel = v_sel.reshape(B, Hkv, rep, T, -1)
    q5 = q.to(ct).reshape(B, Hkv, rep, 1, D)
    scores = (q5 @ k_sel.to(ct).transpose(-1, -2)).squeeze(-2) * scale  # [B, Hkv, rep, T]
    scores = scores.masked_fill(~ok.reshape(B, Hkv, rep, T), float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    out = (weights.unsqueeze(-2) @ v_sel.to(ct)).squeeze(-2)  # [B, Hkv, rep, Dv]
    out = out / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(B, H, 1, -1).to(q.dtype)
