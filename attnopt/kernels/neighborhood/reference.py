"""Neighbourhood attention, written plainly: build the full mask, run dense attention.

This is the definition the tiled kernel is checked against. It materialises an
``[N, N]`` mask and ``[B, H, N, N]`` scores, so it is for checking only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import masked_attention
from attnopt.kernels.neighborhood.geometry import (
    axis_window_bounds,
    check_neighborhood_args,
    expand_axes,
    sub_axis_length,
)

__all__ = [
    "check_sequence",
    "neighborhood_attention_reference",
    "neighborhood_axes",
    "neighborhood_visible",
]


def neighborhood_axes(grid, kernel, dilation, stride, causal, caller: str) -> tuple:
    """``(grid, kernel, dilation, stride, causal)`` as checked per-axis tuples."""
    grid = tuple(grid) if isinstance(grid, (list, tuple)) else (grid,)
    rank = len(grid)
    axes = (
        grid,
        expand_axes("kernel", kernel, rank, caller),
        expand_axes("dilation", dilation, rank, caller),
        expand_axes("stride", stride, rank, caller),
        expand_axes("causal", causal, rank, caller),
    )
    check_neighborhood_args(caller, *axes)
    return axes


def check_sequence(caller: str, q_len: int, kv_len: int, grid: Sequence[int]) -> int:
    """The number of extra (global) tokens ``E = N - prod(grid)``; raises unless the
    queries and keys are one sequence at least as long as the grid."""
    if q_len != kv_len:
        raise ValueError(
            f"{caller}: neighbourhood attention is self-attention on one token grid; q has "
            f"{q_len} tokens but k has {kv_len}"
        )
    cells = math.prod(grid)
    if q_len < cells:
        raise ValueError(
            f"{caller}: the sequence has {q_len} tokens, fewer than the grid "
            f"{tuple(grid)!r} holds ({cells}); the sequence must be E extra tokens followed "
            f"by the grid's tokens in row-major order"
        )
    return q_len - cells


def _axis_visible(length, kernel, dilation, stride, causal, device) -> torch.Tensor:
    """Boolean ``[length, length]`` pattern along one axis of the full grid."""
    visible = torch.zeros(length, length, dtype=torch.bool, device=device)
    for r in range(min(dilation, length)):
        n = sub_axis_length(length, dilation, r)
        lo, hi = axis_window_bounds(n, kernel, stride, causal, device=device)
        j = torch.arange(n, device=device)
        sub = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [n, n]
        visible[r::dilation, r::dilation] = sub
    return visible


def neighborhood_visible(
    n: int,
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean ``[N, N]``: which keys each query sees (before any padding mask).

    The first ``E = N - prod(grid)`` tokens are extra (CLS, registers): they see every
    key and every query sees them. Grid tokens follow in row-major order; grid key
    ``y`` is seen by grid query ``x`` iff ``y`` is in ``x``'s window on every axis
    (see :mod:`attnopt.kernels.neighborhood.geometry`). Arguments are per-axis tuples.
    """
    extra = n - math.prod(grid)
    pattern = torch.ones(1, 1, dtype=torch.bool, device=device)
    for axis in zip(grid, kernel, dilation, stride, causal):
        a = _axis_visible(*axis, device)
        # Row-major grid: the new axis varies fastest (Kronecker product of patterns).
        pattern = (pattern[:, None, :, None] & a[None, :, None, :]).reshape(
            pattern.shape[0] * a.shape[0], -1
        )
    visible = torch.ones(n, n, dtype=torch.bool, device=device)
    visible[extra:, extra:] = pattern
    return visible


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    grid: Sequence[int],
    kernel: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    causal: bool | Sequence[bool] = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Neighbourhood attention over a token grid with extra global tokens (O(N²), exact).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``, ``H % Hkv == 0``;
            the sequence is ``E`` extra tokens followed by the ``prod(grid)`` grid tokens.
        kv_mask: optional bool broadcastable to ``[B, H, N]``; False keys are never seen.
        grid: the token grid, 1 to 3 axes, e.g. ``(H, W)`` or ``(T, H, W)``.
        kernel, dilation, stride, causal: per axis (a single value applies to every
            axis); see :mod:`attnopt.kernels.neighborhood.geometry`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1 + 6 * 5, 8) for _ in range(3))
        >>> neighborhood_attention_reference(q, k, v, grid=(6, 5), kernel=3).shape
        torch.Size([1, 2, 31, 8])
    """
    caller = "neighborhood_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    axes = neighborhood_axes(grid, kernel, dilation, stride, causal, caller)
    check_sequence(caller, shapes.q_len, shapes.kv_len, axes[0])
    visible = neighborhood_visible(shapes.q_len, *axes, device=q.device)
    if kv_mask is not None:
        visible = visible & kv_mask.unsqueeze(-2)  # [.., N, N]
    return masked_attention(q, k, v, visible, scale=scale)
