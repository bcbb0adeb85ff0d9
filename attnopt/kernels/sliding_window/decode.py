"""Sliding-window attention for token generation: a few queries against a bounded cache.

During decoding a query only ever needs the last ``(window - 1) * dilation + 1`` keys
and the ``sinks`` first ones, so the cache (``attnopt.cache``) keeps exactly those, in
a ring buffer whose slots are in no particular order. Which cached key a query sees is
therefore decided from absolute positions, not from slot order:
:func:`window_visible_positions` applies the rule of
:class:`~attnopt.kernels.sliding_window.SlidingWindow` to a query position and the
cached keys' positions, and :func:`window_decode_attention` runs softmax attention over
the visible ones (on CUDA through the Triton decode kernel when it is available).

Layout as everywhere in :mod:`attnopt.kernels`: ``q [B, H, N, D]``, ``k [B, Hkv, L, D]``,
``v [B, Hkv, L, Dv]``.
"""

from __future__ import annotations

import torch

from attnopt.kernels.dense.reference import masked_attention

__all__ = ["window_decode_attention", "window_span", "window_visible_positions"]


def window_span(window: int, dilation: int = 1) -> int:
    """Positions a causal window reaches back over, the query's own included:
    ``(window - 1) * dilation + 1`` (the non-sink keys a decode cache must keep)."""
    return (window - 1) * dilation + 1


def window_visible_positions(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """Bool ``[N, L]``: which keys at absolute positions ``k_pos [L]`` (``-1``: empty
    slot) the causal queries at ``q_pos [N]`` see, by the sliding-window rule
    ``0 <= p - j < window * dilation``, ``(p - j) % dilation == 0``, or ``j < sinks``
    with ``j <= p``."""
    delta = q_pos[:, None] - k_pos[None, :]  # [N, L]
    filled = (k_pos >= 0)[None, :]
    in_window = (delta >= 0) & (delta < window * dilation) & (delta % dilation == 0)
    sink = (k_pos[None, :] < sinks) & (delta >= 0)
    return filled & (in_window | sink)


def _triton_decode():
    try:
        from attnopt.kernels.sliding_window.triton_decode import decode_attention_triton
    except ImportError:  # Triton or the kernel is absent: the PyTorch path below serves
        return None
    return decode_attention_triton


def window_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q`` over the cached keys it sees.

    Args:
        q: ``[B, H, N, D]`` (``N`` new queries, usually 1).
        k: ``[B, Hkv, L, D]``; v: ``[B, Hkv, L, Dv]``: the cached keys, any slot order.
        visible: bool ``[B, N, L]`` (or broadcastable): query ``i`` sees key ``j``.
            Combine :func:`window_visible_positions` with the keys' padding mask.
        scale: multiplier of ``q·kᵀ``.
        use_triton: run the Triton decode kernel (one query per row); default: on CUDA
            tensors when it is importable. ``True`` on CPU needs ``TRITON_INTERPRET=1``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; a query that sees no key returns zeros.

    Example:
        >>> q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        >>> pos = torch.tensor([5, 6, 7, 8, 9])
        >>> vis = window_visible_positions(torch.tensor([9]), pos, window=3)
        >>> window_decode_attention(q, k, v, vis[None], scale=8**-0.5).shape
        torch.Size([1, 4, 1, 8])
    """
    if visible.dim() == 2:
        visible = visible.unsqueeze(0)
    if use_triton is None:
        use_triton = q.is_cuda and q.shape[2] == 1
    if use_triton:
        kernel = _triton_decode()
        if kernel is not None:
            # One query: its visibility is a per-key mask, [B, 1, L] (the op layout).
            kv_mask = visible[:, 0].expand(q.shape[0], -1).unsqueeze(1)
            return kernel(q, k, v, kv_mask, scale=scale)
    mask = visible.unsqueeze(1)  # [B, 1, N, L]
    if q.dtype in (torch.float32, torch.float64) and bool(visible.any(-1).all()):
        # SDPA's fused CPU kernel: far fewer dispatches than the reference for one query.
        # (It would return NaN for a query that sees no key; those take the path below.)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    return masked_attention(q, k, v, mask, scale=scale)
