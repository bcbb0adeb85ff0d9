"""``attnopt::hybrid_attention``: softmax window + linear attention as one graph node.

The forward runs the blockwise CPU kernel. The backward is its own op
(``hybrid_attention_backward``) that differentiates the blockwise kernel with
``torch.func.vjp``, so a traced backward is one node too and the feature-map
tensors and the mixing logits get gradients for distillation. Only the inputs are
kept between forward and backward.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.hybrid.blockwise import hybrid_forward
from attnopt.kernels.hybrid.reference import check_hybrid_args, check_mix_logit
from attnopt.kernels.linear.feature_maps import check_feature_tensors

__all__ = ["hybrid_attention", "hybrid_attention_backward"]

_NAME = "attnopt::hybrid_attention"


def _check(q, k, v, kv_mask, bias, causal, window, sinks, feature_map, chunk, tensors, mix):
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (hybrid attention takes masks only as causal plus "
            f"kv_mask), got a tensor of shape {tuple(bias.shape)}"
        )
    shapes = check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_hybrid_args(
        _NAME, window=window, sinks=sinks, feature_map=feature_map, chunk=chunk, causal=causal
    )
    check_feature_tensors(
        _NAME, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    check_mix_logit(_NAME, mix, shapes.heads)


@torch.library.custom_op(_NAME, mutates_args=())
def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    feature_map: str,
    chunk: int,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    mix_logit: torch.Tensor | None,
) -> torch.Tensor:
    """Causal hybrid attention; semantics of :class:`~attnopt.kernels.hybrid.Hybrid` and
    :func:`~attnopt.kernels.hybrid.reference.hybrid_attention_reference`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, M]``; ``bias`` must be None and
    ``causal`` True. Feature-map tensors as for ``attnopt::linear_attention``;
    ``mix_logit``: None or ``[H]``. Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    tensors = (q_weight, q_bias, k_weight, k_bias)
    _check(q, k, v, kv_mask, bias, causal, window, sinks, feature_map, chunk, tensors, mix_logit)
    with torch.no_grad():
        return hybrid_forward(
            q,
            k,
            v,
            kv_mask,
            window=window,
            sinks=sinks,
            scale=scale,
            feature_map=feature_map,
            chunk=chunk,
            tensors=tensors,
            mix_logit=mix_logit,
        )


@hybrid_attention.register_fake
def _hybrid_attention_fake(
    q, k, v, kv_mask, bias, scale, causal, window, sinks, feature_map, chunk, qw, qb, kw, kb, mix
):
    tensors = (qw, qb, kw, kb)
    _check(q, k, v, kv_mask, bias, causal, window, sinks, feature_map, chunk, tensors, mix)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::hybrid_attention_backward", mutates_args=())
def hybrid_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    feature_map: str,
    chunk: int,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    mix_logit: torch.Tensor | None,
    tensor_grads: bool,
) -> list[torch.Tensor]:
    """Gradients of :func:`hybrid_attention`: ``[dq, dk, dv, d q_weight, d q_bias,
    d k_weight, d k_bias, d mix_logit]``; the last five are empty tensors when
    ``tensor_grads`` is False or the tensor is None."""
    tensors = (q_weight, q_bias, k_weight, k_bias, mix_logit)
    present = [i for i, t in enumerate(tensors) if t is not None] if tensor_grads else []

    def forward(q_, k_, v_, *ts):
        full = list(tensors)
        for i, t in zip(present, ts, strict=True):
            full[i] = t
        return hybrid_forward(
            q_,
            k_,
            v_,
            kv_mask,
            window=window,
            sinks=sinks,
            scale=scale,
            feature_map=feature_map,
            chunk=chunk,
            tensors=tuple(full[:4]),
            mix_logit=full[4],
            differentiable=True,
        )

    # Custom-op bodies run below the autograd dispatch key; torch.func.vjp records its
    # own graph of the blockwise kernel.
    _, vjp = torch.func.vjp(forward, q, k, v, *(tensors[i] for i in present))
    grads = vjp(grad_out)
    out = [g.contiguous() for g in grads[:3]] + [q.new_empty(0) for _ in range(5)]
    for i, g in zip(present, grads[3:], strict=True):
        out[3 + i] = g.contiguous()
    return out


@hybrid_attention_backward.register_fake
def _hybrid_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    kv_mask,
    scale,
    causal,
    window,
    sinks,
    feature_map,
    chunk,
    qw,
    qb,
    kw,
    kb,
    mix,
    tensor_grads,
):
    grads = [
        t.new_empty(t.shape) if tensor_grads and t is not None else q.new_empty(0)
        for t in (qw, qb, kw, kb, mix)
    ]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *grads]


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, _bias, scale, causal, window, sinks, feature_map, chunk, *tensors = inputs
    ctx.save_for_backward(q, k, v, kv_mask, *tensors)
    ctx.args = (scale, causal, window, sinks, feature_map, chunk)


_FIRST_TENSOR = 11  # input index of q_weight


def _backward(ctx, grad_out):
    q, k, v, kv_mask, *tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad[_FIRST_TENSOR : _FIRST_TENSOR + 5]
    tensor_grads = any(needs)
    dq, dk, dv, *dts = torch.ops.attnopt.hybrid_attention_backward(
        grad_out, q, k, v, kv_mask, *ctx.args, *tensors, tensor_grads
    )
    dts = [
        g if tensor_grads and t is not None and need else None
        for g, t, need in zip(dts, tensors, needs, strict=True)
    ]
    return (dq, dk, dv) + (None,) * 8 + tuple(dts)


hybrid_attention.register_autograd(_backward, setup_context=_setup_context)
