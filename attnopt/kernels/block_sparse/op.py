"""``attnopt::block_sparse_attention``: the block-sparse variant as one graph node.

The forward selects the key blocks (:func:`select_blocks`) and runs the gather kernel
over them. The backward is its own op (``block_sparse_attention_backward``): only the
inputs are kept between forward and backward; it selects the same blocks again (the
selection is a deterministic function of q, k and the mask, and a constant of the
gradient) and recomputes each chunk's weights.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.block_sparse.gather import block_sparse_backward, block_sparse_forward
from attnopt.kernels.block_sparse.selection import check_block_sparse_args, select_blocks

__all__ = ["block_sparse_attention", "block_sparse_attention_backward"]

_NAME = "attnopt::block_sparse_attention"


def _check(q, k, v, kv_mask, bias, block, topk, threshold, local_blocks, sink_blocks, pattern):
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (block-sparse attention takes masks only as causal "
            f"plus kv_mask), got a tensor of shape {tuple(bias.shape)}"
        )
    check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_block_sparse_args(_NAME, block, topk, threshold, local_blocks, sink_blocks, pattern)


def _select(
    q, k, kv_mask, scale, causal, block, topk, threshold, local_blocks, sink_blocks, pattern
):
    return select_blocks(
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


@torch.library.custom_op(_NAME, mutates_args=())
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    block: int,
    topk: int | None,
    threshold: float | None,
    local_blocks: int,
    sink_blocks: int,
    pattern: str,
) -> torch.Tensor:
    """Block-sparse attention; semantics of
    :class:`~attnopt.kernels.block_sparse.BlockSparse`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, M]``; ``bias`` must be None.
    Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    args = (block, topk, threshold, local_blocks, sink_blocks, pattern)
    _check(q, k, v, kv_mask, bias, *args)
    selection = _select(q, k, kv_mask, scale, causal, *args)
    return block_sparse_forward(
        q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
    )


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(
    q,
    k,
    v,
    kv_mask,
    bias,
    scale,
    causal,
    block,
    topk,
    threshold,
    local_blocks,
    sink_blocks,
    pattern,
):
    _check(q, k, v, kv_mask, bias, block, topk, threshold, local_blocks, sink_blocks, pattern)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    block: int,
    topk: int | None,
    threshold: float | None,
    local_blocks: int,
    sink_blocks: int,
    pattern: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`block_sparse_attention` for ``q``, ``k`` and ``v`` (the block
    selection held fixed)."""
    args = (block, topk, threshold, local_blocks, sink_blocks, pattern)
    selection = _select(q, k, kv_mask, scale, causal, *args)
    dq, dk, dv = block_sparse_backward(
        grad_out, q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@block_sparse_attention_backward.register_fake
def _block_sparse_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    kv_mask,
    scale,
    causal,
    block,
    topk,
    threshold,
    local_blocks,
    sink_blocks,
    pattern,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, _bias, *args = inputs
    ctx.save_for_backward(q, k, v, kv_mask)
    ctx.args = tuple(args)


def _backward(ctx, grad_out):
    q, k, v, kv_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnopt.block_sparse_attention_backward(
        grad_out, q, k, v, kv_mask, *ctx.args
    )
    return (dq, dk, dv) + (None,) * 10


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)
