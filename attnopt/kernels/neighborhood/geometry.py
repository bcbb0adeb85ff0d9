"""Where each query's neighbourhood lies: argument checks and per-axis window bounds.

Neighbourhood attention is separable: a grid key is seen iff, on every axis, its
coordinate lies in the query's window on that axis. So the whole pattern follows
from one rule along one axis, :func:`axis_window_bounds`, which the reference, the
tiled kernel and the config all share. The test suite checks it against a naive
per-query loop written from the definition.

One axis of length ``L`` with kernel ``w``, dilation ``δ``, stride ``s``:

* dilation: the axis splits into ``δ`` interleaved sub-axes (positions ``r, r+δ, ...``
  for ``r < δ``); a query only sees keys of its own sub-axis, and the window is
  taken in sub-axis coordinates (neighbours ``i ± δ·k``);
* non-causal: the window is ``w`` consecutive sub-axis positions centred on the
  query (``w // 2`` before it), shifted to stay inside the sub-axis near its ends,
  so every query sees exactly ``min(w, length)`` positions; with stride ``s``, the
  queries ``g·s .. g·s+s-1`` share the window of the group's centre ``g·s + s//2``
  (``s == w`` gives non-overlapping blocks, Swin-style windows without shift);
* causal: the window is the query and the ``w - 1`` positions before it (fewer
  near the start); causal axes take stride 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "axis_window_bounds",
    "check_neighborhood_args",
    "expand_axes",
    "sub_axis_length",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expand_axes(name: str, value: object, rank: int, caller: str) -> tuple:
    """``value`` as a ``rank``-tuple: a scalar is repeated, a sequence must have ``rank``
    entries (raises ``ValueError`` naming ``name`` otherwise)."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(
                f"{caller}: {name} has {len(value)} axes ({tuple(value)!r}) but the grid has "
                f"{rank}; give one value per grid axis or a single value for all"
            )
        return tuple(value)
    return (value,) * rank


def check_neighborhood_args(
    caller: str,
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
) -> None:
    """Check per-axis neighbourhood parameters (already expanded to the grid's rank)."""
    grid = tuple(grid)
    if not 1 <= len(grid) <= 3 or not all(_is_int(g) and g >= 1 for g in grid):
        raise ValueError(
            f"{caller}: grid must be 1 to 3 positive ints (the token grid, e.g. (H, W) or "
            f"(T, H, W)), got {grid!r}"
        )
    rank = len(grid)
    for name, values in (("kernel", kernel), ("dilation", dilation), ("stride", stride)):
        values = tuple(values)
        if len(values) != rank or not all(_is_int(x) and x >= 1 for x in values):
            raise ValueError(
                f"{caller}: {name} must be {rank} positive int(s), one per grid axis, "
                f"got {values!r}"
            )
    causal = tuple(causal)
    if len(causal) != rank or not all(isinstance(c, bool) for c in causal):
        raise ValueError(
            f"{caller}: causal must be {rank} bool(s), one per grid axis, got {causal!r}"
        )
    for axis, (w, s, c) in enumerate(zip(kernel, stride, causal)):
        if s > w:
            raise ValueError(
                f"{caller}: stride must not exceed kernel on any axis (a query outside its "
                f"shared window), got stride {tuple(stride)!r} with kernel {tuple(kernel)!r} "
                f"on axis {axis}"
            )
        if c and s != 1:
            raise ValueError(
                f"{caller}: causal axes take stride 1, got stride {tuple(stride)!r} with "
                f"causal {causal!r} on axis {axis}"
            )


def sub_axis_length(length: int, dilation: int, residue: int) -> int:
    """Positions ``residue, residue + dilation, ...`` below ``length``."""
    return max(0, math.ceil((length - residue) / dilation))


def axis_window_bounds(
    length: int,
    kernel: int,
    stride: int,
    causal: bool,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ``[lo, hi)`` of every query along one undilated (sub-)axis.

    Args:
        length: positions on the axis (after splitting off dilation).
        kernel, stride, causal: the axis's parameters (see the module docstring).

    Returns:
        ``lo``, ``hi``: int64 ``[length]``; query ``i`` sees positions ``lo[i] <= j < hi[i]``.
        Both are non-decreasing in ``i``, so a run of queries sees one interval.
    """
    i = torch.arange(length, device=device)
    if causal:
        return (i - kernel + 1).clamp(min=0), i + 1
    span = min(kernel, length)
    centre = (i // stride) * stride + stride // 2
    lo = (centre - kernel // 2).clamp(min=0, max=length - span)
    return lo, lo + span
