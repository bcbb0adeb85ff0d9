"""``attnopt::dense_attention``: exact attention as one opaque graph node.

The rewrite swaps an attention site for one call of this op, so a rewritten graph
keeps a single node per site through ``torch.export`` and the exporters. The forward
runs the reference; the backward is its own op (``dense_attention_backward``) that
recomputes the forward and differentiates it, so a traced backward is one node too
and no attention weights are kept between forward and backward.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import masked_attention, visible_keys

__all__ = ["dense_attention", "dense_attention_backward"]


@torch.library.custom_op("attnopt::dense_attention", mutates_args=())
def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Exact softmax attention, as
    :func:`~attnopt.kernels.dense.reference.dense_attention_reference`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, M]``, ``bias`` float broadcastable to
    ``[B, H, N, M]``; returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    shapes = check_attention_inputs("attnopt::dense_attention", q, k, v, kv_mask, bias)
    visible = visible_keys(
        shapes.q_len, shapes.kv_len, causal=causal, kv_mask=kv_mask, device=q.device
    )
    return masked_attention(q, k, v, visible, bias=bias, scale=scale).contiguous()


@dense_attention.register_fake
def _dense_attention_fake(q, k, v, kv_mask, bias, scale, causal):
    check_attention_inputs("attnopt::dense_attention", q, k, v, kv_mask, bias)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::dense_attention_backward", mutates_args=())
def dense_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`dense_attention` for ``q, k, v`` and ``bias``.

    The bias gradient has ``bias``'s own (possibly broadcast) shape; it is an empty
    tensor when ``bias_grad`` is False or ``bias`` is None.
    """
    visible = visible_keys(
        q.shape[-2], k.shape[-2], causal=causal, kv_mask=kv_mask, device=q.device
    )
    # Custom-op bodies run below the autograd dispatch key, so plain autograd would
    # record nothing here; torch.func.vjp differentiates through its own transform.
    if bias is not None and bias_grad:
        _, vjp = torch.func.vjp(
            lambda q_, k_, v_, b_: masked_attention(q_, k_, v_, visible, bias=b_, scale=scale),
            q,
            k,
            v,
            bias,
        )
        dq, dk, dv, dbias = vjp(grad_out)
    else:
        _, vjp = torch.func.vjp(
            lambda q_, k_, v_: masked_attention(q_, k_, v_, visible, bias=bias, scale=scale),
            q,
            k,
            v,
        )
        dq, dk, dv = vjp(grad_out)
        dbias = q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous()


@dense_attention_backward.register_fake
def _dense_attention_backward_fake(grad_out, q, k, v, kv_mask, bias, scale, causal, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, bias, scale, causal = inputs
    ctx.save_for_backward(q, k, v, kv_mask, bias)
    ctx.scale = scale
    ctx.causal = causal


def _backward(ctx, grad_out):
    q, k, v, kv_mask, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = torch.ops.attnopt.dense_attention_backward(
        grad_out, q, k, v, kv_mask, bias, ctx.scale, ctx.causal, bias_grad
    )
    return dq, dk, dv, None, dbias if bias_grad else None, None, None


dense_attention.register_autograd(_backward, setup_context=_setup_context)
