"""``attnopt::block_sparse_attention``: the block-sparse variant as one graph node.

The forward selects the key blocks (:func:`select_blocks`) and runs the gather kernel
over them. The backward is its own op (``block_sparse_attention_backward``): only the
inputs are kept between forward and backward; it selects the same blocks again (the
selection is a deterministic function of q, k and the mask, and a constant of the
gradient) and recomputes each chunk's weights.

On CUDA tensors, when Triton is installed, both ops run Triton kernels
(:mod:`~attnopt.kernels.block_sparse.triton_block_sparse`, the dynamic selection by
:mod:`~attnopt.kernels.block_sparse.triton_selection`); the contract is the same: the
backward selects again with the same (deterministic) kernels and, since only the
inputs are kept, runs the forward once more for the output and logsumexp it needs.
Shapes the kernels do not take (head dims above 256, float64) stay on the PyTorch path
on CUDA too. CPU tensors always take the PyTorch path.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import triton_available
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


# -- CUDA: Triton kernels ------------------------------------------------------------------------


def _triton_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton kernels handle these inputs (else the PyTorch path runs on CUDA too)."""
    return (
        q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] <= 256
        and v.shape[-1] <= 256
    )


def _select_triton(
    q, k, kv_mask, scale, causal, block, topk, threshold, local_blocks, sink_blocks, pattern
):
    # Imported here: importing attnopt must neither need nor load Triton.
    from attnopt.kernels.block_sparse.triton_selection import select_blocks_triton

    return select_blocks_triton(
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


def _block_sparse_attention_triton(
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
    """The CUDA kernel of ``attnopt::block_sparse_attention`` (any device Triton runs on)."""
    from attnopt.kernels.block_sparse.triton_block_sparse import block_sparse_forward_triton

    args = (block, topk, threshold, local_blocks, sink_blocks, pattern)
    _check(q, k, v, kv_mask, bias, *args)
    if not _triton_takes(q, v):
        selection = _select(q, k, kv_mask, scale, causal, *args)
        return block_sparse_forward(
            q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
        )
    selection = _select_triton(q, k, kv_mask, scale, causal, *args)
    out, _ = block_sparse_forward_triton(
        q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
    )
    return out


def _block_sparse_attention_backward_triton(
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
    """The CUDA kernel of ``attnopt::block_sparse_attention_backward``."""
    from attnopt.kernels.block_sparse.triton_block_sparse import block_sparse_backward_triton

    args = (block, topk, threshold, local_blocks, sink_blocks, pattern)
    if not _triton_takes(q, v):
        selection = _select(q, k, kv_mask, scale, causal, *args)
        dq, dk, dv = block_sparse_backward(
            grad_out, q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
        )
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    # The same kernels as the forward on the same inputs: the same selection.
    selection = _select_triton(q, k, kv_mask, scale, causal, *args)
    return block_sparse_backward_triton(
        grad_out, q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
    )


if triton_available():
    block_sparse_attention.register_kernel("cuda")(_block_sparse_attention_triton)
    block_sparse_attention_backward.register_kernel("cuda")(_block_sparse_attention_backward_triton)
