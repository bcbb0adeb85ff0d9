"""Dense attention in plain PyTorch: the truth every other kernel is checked against.

It materialises the full ``[B, H, N, M]`` score matrix, so it is only for checking
and for the exact ``dense`` variant; the layout is the one stated in
:mod:`attnopt.kernels`. Two things differ from
``torch.nn.functional.scaled_dot_product_attention`` on purpose: a query row with no
visible key returns zeros instead of NaN, and half-precision inputs are computed in
fp32 and rounded once at the end.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels._checks import check_attention_inputs

__all__ = ["compute_dtype", "dense_attention_reference", "masked_attention", "visible_keys"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention is accumulated in: fp32 for fp16/bf16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias)·v`` over the keys where ``visible`` is True.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]`` with
            ``H % Hkv == 0``. Inputs are assumed valid (callers check them).
        visible: bool, broadcastable to ``[B, H, N, M]``; ``None`` means all keys.
        bias: float, broadcastable to ``[B, H, N, M]``; may hold ``-inf``.
        scale: multiplier of ``q·kᵀ``; ``None`` means ``1/sqrt(D)``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows without a visible key are 0.
    """
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    rep = H // Hkv
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Grouped-query attention by broadcasting a size-1 group dim, not by repeating K/V.
    q5 = q.to(ct).reshape(B, Hkv, rep, N, D)
    k5 = k.to(ct).unsqueeze(2)  # [B, Hkv, 1, M, D]
    v5 = v.to(ct).unsqueeze(2)  # [B, Hkv, 1, M, Dv]
    scores = (q5 @ k5.transpose(-1, -2) * scale).reshape(B, H, N, M)
    if bias is not None:
        scores = scores + bias.to(ct)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    # Subtract the row max for stability; a row that is all -inf has max -inf, which
    # would give NaN, so it subtracts 0 instead and its weights stay exactly 0.
    # (amax needs a non-empty dim: with no keys at all, every row is empty.)
    row_max = scores.amax(-1, keepdim=True).detach() if M else scores.new_zeros(B, H, N, 1)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)  # [B, H, N, M]
    denom = weights.sum(dim=-1, keepdim=True)
    out = weights.reshape(B, Hkv, rep, N, M) @ v5  # [B, Hkv, rep, N, Dv]
    out = out.reshape(B, H, N, -1) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


def visible_keys(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    kv_mask: torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean ``[.., N, M]`` visibility from the causal flag and the per-key mask.

    Causal attention is bottom-right aligned: query ``i`` sits at key position
    ``i + M - N`` and sees keys at or before it.
    """
    visible = None
    if causal:
        pos = torch.arange(q_len, device=device) + (kv_len - q_len)
        visible = torch.arange(kv_len, device=device)[None, :] <= pos[:, None]  # [N, M]
    if kv_mask is not None:
        keys = kv_mask.unsqueeze(-2)  # [.., 1, M] against [N, M]
        visible = keys if visible is None else visible & keys
    return visible


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Exact softmax attention in the attnopt op layout.

    Args:
        q: ``[B, H, N, D]``.
        k: ``[B, Hkv, M, D]``, ``H % Hkv == 0``.
        v: ``[B, Hkv, M, Dv]``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are hidden.
        bias: optional float broadcastable to ``[B, H, N, M]``, added to the scaled
            scores; ``-inf`` entries hide keys.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` sees keys ``j <= i + M - N``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are exactly 0.

    Example:
        >>> q = torch.randn(1, 4, 5, 8); k = torch.randn(1, 2, 5, 8); v = torch.randn(1, 2, 5, 8)
        >>> dense_attention_reference(q, k, v, causal=True).shape
        torch.Size([1, 4, 5, 8])
    """
    shapes = check_attention_inputs("dense_attention_reference", q, k, v, kv_mask, bias)
    visible = visible_keys(
        shapes.q_len, shapes.kv_len, causal=causal, kv_mask=kv_mask, device=q.device
    )
    return masked_attention(q, k, v, visible, bias=bias, scale=scale)
