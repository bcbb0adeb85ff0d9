"""Sliding-window attention, written plainly: build the full mask, run dense attention.

This is the definition the blockwise kernel is checked against. It materialises an
``[N, M]`` mask and ``[B, H, N, M]`` scores, so it is for checking only.
"""

from __future__ import annotations

import torch

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels.dense.reference import masked_attention

__all__ = ["sliding_window_attention_reference", "sliding_window_visible"]


def sliding_window_visible(
    q_len: int,
    kv_len: int,
    *,
    window: int,
    sinks: int = 0,
    dilation: int = 1,
    causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean ``[N, M]``: which keys each query sees (before any padding mask).

    Query ``i`` sits at key position ``p = i + M - N``. With ``delta = p - j``:
    causal attention sees key ``j`` iff ``0 <= delta < window * dilation`` and
    ``delta % dilation == 0`` (``window`` keys, the query's own position included);
    bidirectional attention iff ``|delta| < window * dilation`` and
    ``|delta| % dilation == 0``. Keys ``j < sinks`` are always seen (causal: only when
    ``j <= p``).
    """
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    keys = torch.arange(kv_len, device=device)
    delta = pos[:, None] - keys[None, :]  # [N, M]
    span = window * dilation
    if causal:
        in_window = (delta >= 0) & (delta < span) & (delta % dilation == 0)
        sink = (keys[None, :] < sinks) & (delta >= 0)
    else:
        dist = delta.abs()
        in_window = (dist < span) & (dist % dilation == 0)
        sink = (keys[None, :] < sinks).expand_as(in_window)
    return in_window | sink


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    window: int,
    sinks: int = 0,
    dilation: int = 1,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Sliding-window attention with optional sink keys and dilation (O(N·M), exact).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        window, sinks, dilation, causal: see :func:`sliding_window_visible`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
        >>> sliding_window_attention_reference(q, k, v, window=2, causal=True).shape
        torch.Size([1, 2, 6, 4])
    """
    caller = "sliding_window_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_window_args(caller, window, sinks, dilation)
    visible = sliding_window_visible(
        shapes.q_len,
        shapes.kv_len,
        window=window,
        sinks=sinks,
        dilation=dilation,
        causal=causal,
        device=q.device,
    )
    if kv_mask is not None:
        visible = visible & kv_mask.unsqueeze(-2)  # [.., N, M]
    return masked_attention(q, k, v, visible, scale=scale)
