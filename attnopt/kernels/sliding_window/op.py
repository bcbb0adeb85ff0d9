"""``attnopt::sliding_window_attention``: the sliding-window variant as one graph node.

The forward runs the blockwise CPU kernel. The backward is its own op
(``sliding_window_attention_backward``, the blockwise backward), so a traced
backward is one node too; only the inputs are kept between forward and backward,
and the backward recomputes the attention weights group by group.

On CUDA tensors both ops run the Triton kernels of
:mod:`~attnopt.kernels.sliding_window.triton_sliding_window` (registered only when
Triton is installed, and imported on first use, so importing attnopt never needs it);
inputs those kernels do not take (float64, head dims over 256) keep the blockwise path.
CPU tensors always take the PyTorch path: the Triton interpreter is for tests only.
Because the op keeps only its inputs, the CUDA backward first reruns the Triton forward
for the log-sum-exp it needs (one extra forward: about 40% on top of the backward's
matmul work).
"""

import torch

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels._triton import triton_available
from attnopt.kernels.sliding_window.blockwise import sliding_window_backward, sliding_window_forward

__all__ = ["sliding_window_attention", "sliding_window_attention_backward"]

_NAME = "attnopt::sliding_window_attention"


def _check(q, k, v, kv_mask, bias, window, sinks, dilation) -> None:
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (sliding-window attention takes masks only as "
            f"causal plus kv_mask), got a tensor of shape {tuple(bias.shape)}"
        )
    check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_window_args(_NAME, window, sinks, dilation)


@torch.library.custom_op(_NAME, mutates_args=())
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    dilation: int,
) -> torch.Tensor:
    """Sliding-window attention; semantics of
    :class:`~attnopt.kernels.sliding_window.SlidingWindow`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, M]``; ``bias`` must be None.
    Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    _check(q, k, v, kv_mask, bias, window, sinks, dilation)
    return sliding_window_forward(
        q, k, v, kv_mask, window=window, sinks=sinks, dilation=dilation, scale=scale, causal=causal
    )


@sliding_window_attention.register_fake
def _sliding_window_attention_fake(q, k, v, kv_mask, bias, scale, causal, window, sinks, dilation):
    _check(q, k, v, kv_mask, bias, window, sinks, dilation)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::sliding_window_attention_backward", mutates_args=())
def sliding_window_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    dilation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sliding_window_attention` for ``q``, ``k`` and ``v``."""
    dq, dk, dv = sliding_window_backward(
        grad_out,
        q,
        k,
        v,
        kv_mask,
        window=window,
        sinks=sinks,
        dilation=dilation,
        scale=scale,
        causal=causal,
    )
    return dq, dk.contiguous(), dv.contiguous()


@sliding_window_attention_backward.register_fake
def _sliding_window_attention_backward_fake(
    grad_out, q, k, v, kv_mask, scale, causal, window, sinks, dilation
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, bias, scale, causal, window, sinks, dilation = inputs
    ctx.save_for_backward(q, k, v, kv_mask)
    ctx.args = (scale, causal, window, sinks, dilation)


def _backward(ctx, grad_out):
    q, k, v, kv_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnopt.sliding_window_attention_backward(
        grad_out, q, k, v, kv_mask, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None


sliding_window_attention.register_autograd(_backward, setup_context=_setup_context)


# -- CUDA: the Triton kernels ---------------------------------------------------------------------


def _triton_kernels():
    """The Triton kernels' module, imported on first use: importing Triton takes seconds
    and is only needed once a CUDA tensor arrives."""
    from attnopt.kernels.sliding_window import triton_sliding_window

    return triton_sliding_window


def sliding_window_attention_triton(
    q, k, v, kv_mask, bias, scale, causal, window, sinks, dilation
) -> torch.Tensor:
    """The CUDA kernel of ``attnopt::sliding_window_attention`` (same arguments)."""
    _check(q, k, v, kv_mask, bias, window, sinks, dilation)
    tsw = _triton_kernels()
    if tsw.triton_supports(q, k, v) is not None:
        return sliding_window_forward(
            q, k, v, kv_mask, window=window, sinks=sinks, dilation=dilation, scale=scale,
            causal=causal,
        )  # fmt: skip
    out, _ = tsw.sliding_window_forward_triton(
        q, k, v, kv_mask, window=window, sinks=sinks, dilation=dilation, scale=scale, causal=causal
    )
    return out


def sliding_window_attention_backward_triton(
    grad_out, q, k, v, kv_mask, scale, causal, window, sinks, dilation
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernel of ``attnopt::sliding_window_attention_backward`` (same arguments)."""
    tsw = _triton_kernels()
    if tsw.triton_supports(q, k, v) is not None:
        dq, dk, dv = sliding_window_backward(
            grad_out, q, k, v, kv_mask, window=window, sinks=sinks, dilation=dilation,
            scale=scale, causal=causal,
        )  # fmt: skip
        return dq, dk.contiguous(), dv.contiguous()
    args = dict(window=window, sinks=sinks, dilation=dilation, scale=scale, causal=causal)
    # The op schema keeps only the inputs, so the log-sum-exp is recomputed here.
    out, lse = tsw.sliding_window_forward_triton(q, k, v, kv_mask, **args)
    return tsw.sliding_window_backward_triton(
        grad_out.to(q.dtype), q, k, v, out, lse, kv_mask, **args
    )


if triton_available():
    sliding_window_attention.register_kernel("cuda")(sliding_window_attention_triton)
    sliding_window_attention_backward.register_kernel("cuda")(
        sliding_window_attention_backward_triton
    )
