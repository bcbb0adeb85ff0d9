"""``attnopt::neighborhood_attention``: neighbourhood attention as one graph node.

The forward runs the tiled CPU kernel. The backward is its own op
(``neighborhood_attention_backward``, the tiled backward), so a traced backward is
one node too; only the inputs are kept between forward and backward, and the
backward recomputes the attention weights group by group.

The grid and the per-axis parameters are int/bool lists; the number of extra
tokens (``E = N - prod(grid)``) is read from the inputs at run time, so one graph
serves any number of leading CLS/register tokens.

On CUDA tensors the forward runs the Triton kernel (``triton_neighborhood``) when Triton
is installed (imported on the first CUDA call, not with attnopt); head dims above its
``MAX_HEAD_DIM`` keep the tiled PyTorch forward. The backward op has no CUDA kernel of
its own: the tiled PyTorch backward runs on every device.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import triton_available
from attnopt.kernels.neighborhood.geometry import check_neighborhood_args
from attnopt.kernels.neighborhood.reference import check_sequence
from attnopt.kernels.neighborhood.tiled import neighborhood_backward, neighborhood_forward

__all__ = ["neighborhood_attention", "neighborhood_attention_backward"]

_NAME = "attnopt::neighborhood_attention"


def _check(q, k, v, kv_mask, bias, grid, kernel, dilation, stride, causal) -> None:
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (neighbourhood attention takes masks only as "
            f"kv_mask), got a tensor of shape {tuple(bias.shape)}"
        )
    shapes = check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_neighborhood_args(_NAME, grid, kernel, dilation, stride, causal)
    # Symbolic lengths (torch.export) are checked when the graph runs.
    if isinstance(shapes.q_len, int) and isinstance(shapes.kv_len, int):
        check_sequence(_NAME, shapes.q_len, shapes.kv_len, grid)


def _kw(grid, kernel, dilation, stride, causal, scale):
    return dict(
        grid=tuple(grid),
        kernel=tuple(kernel),
        dilation=tuple(dilation),
        stride=tuple(stride),
        causal=tuple(causal),
        scale=scale,
    )


@torch.library.custom_op(_NAME, mutates_args=())
def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    grid: list[int],
    kernel: list[int],
    dilation: list[int],
    stride: list[int],
    causal: list[bool],
) -> torch.Tensor:
    """Neighbourhood attention; semantics of
    :class:`~attnopt.kernels.neighborhood.Neighborhood`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, N, D]``, ``v [B, Hkv, N, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, N]``; ``bias`` must be None. The
    sequence is ``N - prod(grid)`` extra tokens, then the grid in row-major order;
    ``kernel``, ``dilation``, ``stride``, ``causal`` have one entry per grid axis.
    Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    _check(q, k, v, kv_mask, bias, grid, kernel, dilation, stride, causal)
    return neighborhood_forward(
        q, k, v, kv_mask, **_kw(grid, kernel, dilation, stride, causal, scale)
    )


@neighborhood_attention.register_fake
def _neighborhood_attention_fake(
    q, k, v, kv_mask, bias, scale, grid, kernel, dilation, stride, causal
):
    _check(q, k, v, kv_mask, bias, grid, kernel, dilation, stride, causal)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::neighborhood_attention_backward", mutates_args=())
def neighborhood_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    grid: list[int],
    kernel: list[int],
    dilation: list[int],
    stride: list[int],
    causal: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`neighborhood_attention` for ``q``, ``k`` and ``v``."""
    dq, dk, dv = neighborhood_backward(
        grad_out, q, k, v, kv_mask, **_kw(grid, kernel, dilation, stride, causal, scale)
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@neighborhood_attention_backward.register_fake
def _neighborhood_attention_backward_fake(
    grad_out, q, k, v, kv_mask, scale, grid, kernel, dilation, stride, causal
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, bias, scale, *rest = inputs
    ctx.save_for_backward(q, k, v, kv_mask)
    ctx.args = (scale, *rest)


def _backward(ctx, grad_out):
    q, k, v, kv_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnopt.neighborhood_attention_backward(
        grad_out, q, k, v, kv_mask, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


neighborhood_attention.register_autograd(_backward, setup_context=_setup_context)


# -- CUDA: the Triton forward ------------------------------------------------------------------

if triton_available():

    @neighborhood_attention.register_kernel("cuda")
    def _neighborhood_attention_cuda(
        q, k, v, kv_mask, bias, scale, grid, kernel, dilation, stride, causal
    ):
        from attnopt.kernels.neighborhood import triton_neighborhood

        _check(q, k, v, kv_mask, bias, grid, kernel, dilation, stride, causal)
        kw = _kw(grid, kernel, dilation, stride, causal, scale)
        if max(q.shape[-1], v.shape[-1]) > triton_neighborhood.MAX_HEAD_DIM:
            return neighborhood_forward(q, k, v, kv_mask, **kw)
        return triton_neighborhood.neighborhood_forward_triton(q, k, v, kv_mask, **kw)
