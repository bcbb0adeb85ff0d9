"""``attnopt::linear_attention``: linear attention as one graph node.

The forward runs the chunked CPU kernel. The backward is its own op
(``linear_attention_backward``) that differentiates the chunked kernel with
``torch.func.vjp`` group by group, so a traced backward is one node too and the
feature-map tensors (hedgehog's weights) get gradients for distillation. Only the
inputs are kept between forward and backward.

On CUDA tensors both ops run the Triton kernels (``triton_linear``) when Triton is
installed; Triton is imported on the first CUDA call, not with attnopt. CUDA calls the
kernels cannot take (feature or value dim above ``MAX_TRITON_DIM``), and tensors on any
other device, keep the PyTorch path.
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import triton_available
from attnopt.kernels.linear.chunked import linear_forward
from attnopt.kernels.linear.feature_maps import check_feature_tensors
from attnopt.kernels.linear.reference import check_linear_args

__all__ = ["linear_attention", "linear_attention_backward"]

_NAME = "attnopt::linear_attention"


def _check(q, k, v, kv_mask, bias, causal, feature_map, chunk, decay, eps, tensors) -> None:
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (linear attention cannot honour an additive score "
            f"bias), got a tensor of shape {tuple(bias.shape)}"
        )
    shapes = check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_linear_args(
        _NAME,
        feature_map=feature_map,
        chunk=chunk,
        decay=decay,
        eps=eps,
        causal=causal,
        heads=shapes.heads,
    )
    check_feature_tensors(
        _NAME, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )


@torch.library.custom_op(_NAME, mutates_args=())
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    feature_map: str,
    chunk: int,
    decay: list[float] | None,
    eps: float,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Normalised linear attention; semantics of :class:`~attnopt.kernels.linear.Linear`
    and :func:`~attnopt.kernels.linear.reference.linear_attention_reference`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, M]``; ``bias`` must be None.
    ``decay``: None or 1 or ``H`` values in (0, 1] (causal only). Feature-map
    tensors: None for elu/relu; softmax_rf: the projection ``[D, m]`` as ``q_weight``
    and ``k_weight``; hedgehog: ``[H, D, F]``, ``[H, F]``, ``[Hkv, D, F]``, ``[Hkv, F]``.
    Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    tensors = (q_weight, q_bias, k_weight, k_bias)
    _check(q, k, v, kv_mask, bias, causal, feature_map, chunk, decay, eps, tensors)
    with torch.no_grad():
        return linear_forward(
            q,
            k,
            v,
            kv_mask,
            scale=scale,
            causal=causal,
            feature_map=feature_map,
            chunk=chunk,
            decay=decay,
            eps=eps,
            tensors=tensors,
        )


@linear_attention.register_fake
def _linear_attention_fake(
    q, k, v, kv_mask, bias, scale, causal, feature_map, chunk, decay, eps, qw, qb, kw, kb
):
    _check(q, k, v, kv_mask, bias, causal, feature_map, chunk, decay, eps, (qw, qb, kw, kb))
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _backward_pytorch(
    grad_out, q, k, v, kv_mask, scale, causal, feature_map, chunk, decay, eps, tensors,
    tensor_grads,
):  # fmt: skip
    """The backward through the chunked PyTorch kernel (any device)."""
    present = [i for i, t in enumerate(tensors) if t is not None] if tensor_grads else []

    def forward(q_, k_, v_, *ts):
        full = list(tensors)
        for i, t in zip(present, ts, strict=True):
            full[i] = t
        return linear_forward(
            q_,
            k_,
            v_,
            kv_mask,
            scale=scale,
            causal=causal,
            feature_map=feature_map,
            chunk=chunk,
            decay=decay,
            eps=eps,
            tensors=tuple(full),
            differentiable=True,
        )

    # Custom-op bodies run below the autograd dispatch key; torch.func.vjp records its
    # own graph of the chunked kernel.
    _, vjp = torch.func.vjp(forward, q, k, v, *(tensors[i] for i in present))
    grads = vjp(grad_out)
    dq, dk, dv = (g.contiguous() for g in grads[:3])
    out = [q.new_empty(0) for _ in range(4)]
    for i, g in zip(present, grads[3:], strict=True):
        out[i] = g.contiguous()
    return dq, dk, dv, *out


@torch.library.custom_op("attnopt::linear_attention_backward", mutates_args=())
def linear_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    feature_map: str,
    chunk: int,
    decay: list[float] | None,
    eps: float,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    tensor_grads: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Gradients of :func:`linear_attention` for ``q, k, v`` and the four feature-map
    tensors; a feature-map gradient is an empty tensor when ``tensor_grads`` is False
    or the tensor is None."""
    return _backward_pytorch(
        grad_out, q, k, v, kv_mask, scale, causal, feature_map, chunk, decay, eps,
        (q_weight, q_bias, k_weight, k_bias), tensor_grads,
    )  # fmt: skip


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    kv_mask,
    scale,
    causal,
    feature_map,
    chunk,
    decay,
    eps,
    qw,
    qb,
    kw,
    kb,
    tensor_grads,
):
    grads = [
        t.new_empty(t.shape) if tensor_grads and t is not None else q.new_empty(0)
        for t in (qw, qb, kw, kb)
    ]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *grads


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, _bias, scale, causal, feature_map, chunk, decay, eps, *tensors = inputs
    ctx.save_for_backward(q, k, v, kv_mask, *tensors)
    ctx.args = (scale, causal, feature_map, chunk, decay, eps)


def _backward(ctx, grad_out):
    q, k, v, kv_mask, *tensors = ctx.saved_tensors
    tensor_grads = any(ctx.needs_input_grad[11:15])
    dq, dk, dv, *dts = torch.ops.attnopt.linear_attention_backward(
        grad_out, q, k, v, kv_mask, *ctx.args, *tensors, tensor_grads
    )
    dts = [
        g if tensor_grads and t is not None and ctx.needs_input_grad[11 + i] else None
        for i, (g, t) in enumerate(zip(dts, tensors, strict=True))
    ]
    return dq, dk, dv, None, None, None, None, None, None, None, None, *dts


linear_attention.register_autograd(_backward, setup_context=_setup_context)


# -- CUDA: the Triton kernels ------------------------------------------------------------------

if triton_available():

    @linear_attention.register_kernel("cuda")
    def _linear_attention_cuda(
        q, k, v, kv_mask, bias, scale, causal, feature_map, chunk, decay, eps, qw, qb, kw, kb
    ):
        from attnopt.kernels.linear import triton_linear

        tensors = (qw, qb, kw, kb)
        _check(q, k, v, kv_mask, bias, causal, feature_map, chunk, decay, eps, tensors)
        kw_args = dict(
            scale=scale, causal=causal, feature_map=feature_map, chunk=chunk, decay=decay,
            eps=eps, tensors=tensors,
        )  # fmt: skip
        with torch.no_grad():
            if triton_linear.triton_supports(q, v, feature_map, tensors) is not None:
                return linear_forward(q, k, v, kv_mask, **kw_args)
            return triton_linear.linear_forward_triton(q, k, v, kv_mask, **kw_args)

    @linear_attention_backward.register_kernel("cuda")
    def _linear_attention_backward_cuda(
        grad_out, q, k, v, kv_mask, scale, causal, feature_map, chunk, decay, eps,
        qw, qb, kw, kb, tensor_grads,
    ):  # fmt: skip
        from attnopt.kernels.linear import triton_linear

        tensors = (qw, qb, kw, kb)
        if triton_linear.triton_supports(q, v, feature_map, tensors) is not None:
            return _backward_pytorch(
                grad_out, q, k, v, kv_mask, scale, causal, feature_map, chunk, decay, eps,
                tensors, tensor_grads,
            )  # fmt: skip
        return triton_linear.linear_backward_triton(
            grad_out.contiguous(), q, k, v, kv_mask, scale=scale, causal=causal,
            feature_map=feature_map, chunk=chunk, decay=decay, eps=eps, tensors=tensors,
            tensor_grads=tensor_grads,
        )  # fmt: skip
