"""Linear attention written plainly, O(N·M): the truth the chunked kernel is checked against.

It builds the full ``[B, H, N, M]`` matrix ``φ(Q)·φ(K)ᵀ``, masks it (causal,
padding), weights it by the decay ``λ^(p−j)`` and normalises each row, so it is
for checking only.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import compute_dtype, visible_keys
from attnopt.kernels.linear.feature_maps import (
    apply_feature_map,
    check_feature_map_args,
    check_feature_tensors,
)

__all__ = ["check_decay", "check_linear_args", "decay_matrix", "linear_attention_reference"]


def check_decay(caller: str, decay: object, heads: int | None = None) -> None:
    """``decay`` is None, a number in (0, 1], or a non-empty sequence of them (one per
    head; its length must be 1 or ``heads`` when ``heads`` is given)."""
    values = decay if isinstance(decay, (tuple, list)) else (decay,)
    if decay is None:
        return
    ok = len(values) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < x <= 1.0 for x in values
    )
    if not ok:
        raise ValueError(
            f"{caller}: decay must be None, a number in (0, 1] or a sequence of them (one "
            f"per head), got {decay!r}"
        )
    if heads is not None and len(values) not in (1, heads):
        raise ValueError(
            f"{caller}: decay must have 1 value or one per query head ({heads}), got "
            f"{len(values)} values"
        )


def check_linear_args(
    caller: str,
    *,
    feature_map: object,
    chunk: object,
    decay: object,
    eps: object,
    causal: bool,
    heads: int | None = None,
) -> None:
    """Checks shared by the linear-attention config, op and kernels."""
    check_feature_map_args(caller, feature_map, None)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(
            f"{caller}: chunk must be a positive int (positions per chunk of the causal "
            f"kernel), got {chunk!r}"
        )
    check_decay(caller, decay, heads)
    if decay is not None and not causal:
        raise ValueError(
            f"{caller}: decay is defined for causal attention only (the state recurrence "
            f"runs forward in time); got decay={decay!r} with causal=False"
        )
    if (
        not isinstance(eps, (int, float))
        or isinstance(eps, bool)
        or not (eps > 0)
        or not math.isfinite(eps)
    ):
        raise ValueError(
            f"{caller}: eps must be a positive finite number (added to the normaliser), got {eps!r}"
        )


def decay_per_head(decay, heads: int, dtype: torch.dtype, device=None) -> torch.Tensor | None:
    """``log λ`` per query head ``[H]``, or None without decay."""
    if decay is None:
        return None
    values = list(decay) if isinstance(decay, (tuple, list)) else [decay]
    if len(values) == 1:
        values = values * heads
    return torch.tensor(values, dtype=torch.float64, device=device).log().to(dtype)


def decay_matrix(q_len: int, kv_len: int, log_decay: torch.Tensor, device=None) -> torch.Tensor:
    """``[H, N, M]`` weights ``λ_h^(p−j)`` for ``j <= p`` (query ``i`` at ``p = i + M − N``),
    0 elsewhere."""
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    dist = pos[:, None] - torch.arange(kv_len, device=device)[None, :]  # [N, M]
    seen = dist >= 0
    w = torch.exp(dist.clamp(min=0).to(log_decay.dtype) * log_decay[:, None, None])
    return w * seen


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    feature_map: str = "elu",
    decay: float | tuple[float, ...] | None = None,
    eps: float = 1e-6,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised linear attention ``out_i = Σ_j a_ij v_j / (Σ_j a_ij + eps)``.

    ``a_ij = φ(q_i)·φ(k_j) · λ^(p−j)`` over the keys query ``i`` sees (causal: ``j <= p``
    with ``p = i + M − N``; padding keys never), where ``λ`` is the head's decay (1
    without decay; causal only).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys contribute nothing.
        scale: attention scale (used by softmax_rf only); default ``1/sqrt(D)``.
        causal: query ``i`` sees keys ``j <= i + M − N``.
        feature_map: ``"elu"``, ``"relu"``, ``"softmax_rf"`` or ``"hedgehog"``
            (see :mod:`attnopt.kernels.linear.feature_maps`).
        decay: None, ``λ`` in (0, 1] for every head, or one per query head.
        eps: added to every normaliser (rows that see no key output 0).
        q_weight, q_bias, k_weight, k_bias: the feature map's tensors (softmax_rf:
            the projection ``[D, m]`` as both weights; hedgehog: ``[H, D, F]``,
            ``[H, F]``, ``[Hkv, D, F]``, ``[Hkv, F]``).

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
        >>> linear_attention_reference(q, k, v, causal=True).shape
        torch.Size([1, 2, 5, 4])
    """
    caller = "linear_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_linear_args(
        caller,
        feature_map=feature_map,
        chunk=1,
        decay=decay,
        eps=eps,
        causal=causal,
        heads=shapes.heads,
    )
    tensors = (q_weight, q_bias, k_weight, k_bias)
    check_feature_tensors(
        caller, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    B, H, N, _ = q.shape
    Hkv, M = shapes.kv_heads, shapes.kv_len
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(shapes.head_dim) if scale is None else scale
    qf = apply_feature_map(
        q.to(ct), feature_map, weight=q_weight, bias=q_bias, scale=scale, query=True
    )
    kf = apply_feature_map(k.to(ct), feature_map, weight=k_weight, bias=k_bias, scale=scale)
    F = qf.shape[-1]
    rep = H // Hkv
    a = qf.reshape(B, Hkv, rep, N, F) @ kf.unsqueeze(2).transpose(-1, -2)  # [B, Hkv, rep, N, M]
    a = a.reshape(B, H, N, M)
    visible = visible_keys(N, M, causal=causal, kv_mask=kv_mask, device=q.device)
    if visible is not None:
        a = a * visible
    log_decay = decay_per_head(decay, H, ct, q.device)
    if log_decay is not None:
        a = a * decay_matrix(N, M, log_decay, device=q.device)
    num = a.reshape(B, Hkv, rep, N, M) @ v.to(ct).unsqueeze(2)  # [B, Hkv, rep, N, Dv]
    den = a.sum(-1, keepdim=True) + eps
    return (num.reshape(B, H, N, -1) / den).to(q.dtype)
