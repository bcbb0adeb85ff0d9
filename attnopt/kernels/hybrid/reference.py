"""Hybrid softmax-window + linear attention, written plainly: O(N·M), for checking only.

Query ``i`` sits at key position ``p = i + M − N`` (causal, bottom-right aligned).
Its keys split in two:

* window keys ``p − window < j <= p`` and sink keys ``j < sinks, j <= p`` get the
  softmax term ``exp(q·k·scale)``;
* every older key ``sinks <= j <= p − window`` gets the linear term ``φ(q)·φ(k)``;

and both share one normaliser (LoLCATs / Lizard):
``out = (g·Σ_win e^s v + (1−g)·Σ_old φφ v) / (g·Σ_win e^s + (1−g)·Σ_old φφ)``, where
``g = sigmoid(mix_logit_h)`` is an optional learnable per-head mix (LoLCATs' window
factor; without it both weights are 1, which equals ``g = ½``). Padding keys
(``kv_mask`` False) take part in neither sum; a query with neither outputs 0.

Stability: the sums are combined in log space. The linear block enters as one term
with log-weight ``ℓ = log((1−g)·Σ_old φφ)`` and value ``Σ_old φφ v / Σ_old φφ``, and
the shared stabiliser is ``m = max(max_win (s + log g), ℓ)``; every weight is then
``exp(· − m) <= 1``, whether the window scores are large (the linear part
underflows, as it should relative to them) or very negative (the window part
underflows). This is exactly the ratio above; LoLCATs instead adds the linear terms
unscaled to ``exp(s − max s)``, which makes their weight depend on the row's
largest score.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels.dense.reference import compute_dtype
from attnopt.kernels.linear.feature_maps import (
    apply_feature_map,
    check_feature_map_args,
    check_feature_tensors,
)

__all__ = ["check_hybrid_args", "check_mix_logit", "hybrid_attention_reference", "mix_logs"]


def check_hybrid_args(
    caller: str, *, window: object, sinks: object, feature_map: object, chunk: object, causal: bool
) -> None:
    """Checks shared by the hybrid config, op and kernels."""
    check_window_args(caller, window, sinks, 1)
    check_feature_map_args(caller, feature_map, None)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(
            f"{caller}: chunk must be a positive int (query rows per block), got {chunk!r}"
        )
    if not causal:
        raise ValueError(
            f"{caller}: hybrid attention is causal only (its linear part is the running "
            f"state of older keys); got causal=False"
        )


def check_mix_logit(caller: str, mix_logit: torch.Tensor | None, heads: int) -> None:
    if mix_logit is None:
        return
    if (
        not isinstance(mix_logit, torch.Tensor)
        or not mix_logit.dtype.is_floating_point
        or tuple(mix_logit.shape) != (heads,)
    ):
        got = tuple(mix_logit.shape) if isinstance(mix_logit, torch.Tensor) else mix_logit
        raise ValueError(
            f"{caller}: mix_logit must be a float tensor [H] = [{heads}] (one logit per "
            f"query head) or None, got {got!r}"
        )


def mix_logs(mix_logit: torch.Tensor | None, dtype: torch.dtype):
    """``(log g, log(1−g))`` per head for ``g = sigmoid(mix_logit)``, or ``(0, 0)``."""
    if mix_logit is None:
        return 0.0, 0.0
    t = mix_logit.to(dtype)
    return -torch.nn.functional.softplus(-t), -torch.nn.functional.softplus(t)


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    window: int,
    sinks: int = 0,
    scale: float | None = None,
    causal: bool = True,
    feature_map: str = "elu",
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    mix_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal hybrid attention (see the module docstring).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never used.
        window: softmax keys per query, its own position included (``>= 1``).
        sinks: leading keys that always get the softmax term (``>= 0``).
        scale: multiplier of ``q·kᵀ`` in the softmax terms; default ``1/sqrt(D)``.
        causal: must be True.
        feature_map, q_weight, q_bias, k_weight, k_bias: the linear terms' feature map
            (see :mod:`attnopt.kernels.linear.feature_maps`).
        mix_logit: optional ``[H]`` logits of the per-head window weight ``g``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``. With ``window >= M`` it is exactly causal
        softmax attention.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
        >>> hybrid_attention_reference(q, k, v, window=3, sinks=1).shape
        torch.Size([1, 2, 9, 4])
    """
    caller = "hybrid_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_hybrid_args(
        caller, window=window, sinks=sinks, feature_map=feature_map, chunk=1, causal=causal
    )
    tensors = (q_weight, q_bias, k_weight, k_bias)
    check_feature_tensors(
        caller, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    check_mix_logit(caller, mix_logit, shapes.heads)
    B, H, N, D = q.shape
    Hkv, M = shapes.kv_heads, shapes.kv_len
    rep = H // Hkv
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q5 = q.to(ct).reshape(B, Hkv, rep, N, D)
    k5, v5 = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)  # [B, Hkv, 1, M, .]

    pos = torch.arange(N, device=q.device)[:, None] + (M - N)
    key = torch.arange(M, device=q.device)[None, :]
    delta = pos - key  # [N, M]
    in_window = ((delta >= 0) & (delta < window)) | ((key < sinks) & (delta >= 0))
    old = (delta >= window) & (key >= sinks)
    if kv_mask is not None:
        keys = kv_mask.unsqueeze(-2)  # [.., 1, M]
        in_window, old = in_window & keys, old & keys

    log_g, log_1g = mix_logs(mix_logit, ct)
    if isinstance(log_g, torch.Tensor):
        log_g, log_1g = log_g.view(1, H, 1, 1), log_1g.view(1, H, 1)
    scores = (q5 @ k5.transpose(-1, -2) * scale).reshape(B, H, N, M)
    scores = scores.masked_fill(~in_window, float("-inf")) + log_g

    qf = apply_feature_map(
        q.to(ct), feature_map, weight=q_weight, bias=q_bias, scale=scale, query=True
    )
    kf = apply_feature_map(k.to(ct), feature_map, weight=k_weight, bias=k_bias, scale=scale)
    lin = qf.reshape(B, Hkv, rep, N, -1) @ kf.unsqueeze(2).transpose(-1, -2)
    lin = lin.reshape(B, H, N, M) * old
    den_lin = lin.sum(-1)  # [B, H, N]
    num_lin = (lin.reshape(B, Hkv, rep, N, M) @ v5).reshape(B, H, N, -1)
    has_lin = den_lin > 0
    ell = torch.where(has_lin, torch.log(torch.where(has_lin, den_lin, 1.0)), -math.inf) + log_1g

    m = torch.maximum(scores.amax(-1) if M else ell, ell)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()  # [B, H, N]
    weights = torch.exp(scores - m.unsqueeze(-1))  # [B, H, N, M]
    w_lin = torch.exp(ell - m)
    num = (weights.reshape(B, Hkv, rep, N, M) @ v5).reshape(B, H, N, -1)
    num = num + (w_lin / torch.where(has_lin, den_lin, 1.0)).unsqueeze(-1) * num_lin
    den = weights.sum(-1) + w_lin
    out = num / torch.where(den > 0, den, 1.0).unsqueeze(-1)
    return out.to(q.dtype)
