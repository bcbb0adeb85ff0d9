"""The ``neighborhood`` variant: each grid token sees the window of tokens around it.

Vision and video transformers lay their tokens out on a grid (ViT patches, DiT
latents, video frames × height × width). Neighbourhood attention (NA, and dilated
NA) restricts each query to a ``kernel``-sized window on that grid, shifted inward
at the borders so every query sees the same number of keys: cost O(N·window)
instead of O(N²), training-free on pretrained DiTs (GNA) and exact when the
window covers the grid. Stride (GNA) lets groups of queries share a window, down
to non-overlapping blocks; per-axis causality suits video (causal in time).
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, Variant, register_variant
from attnopt.kernels.neighborhood import op as _op  # noqa: F401  (registers the op)
from attnopt.kernels.neighborhood.geometry import check_neighborhood_args, expand_axes
from attnopt.kernels.neighborhood.reference import neighborhood_attention_reference
from attnopt.kernels.neighborhood.tiled import neighborhood_attention_tiled
from attnopt.site import AttentionSite, MaskKind

__all__ = [
    "Neighborhood",
    "neighborhood_attention_reference",
    "neighborhood_attention_tiled",
]

_AXES_FIELDS = ("kernel", "dilation", "stride", "causal")


@register_config
@dataclasses.dataclass(frozen=True)
class Neighborhood(AttentionConfig):
    """Neighbourhood attention (NA / DiNA / GNA) on a 1-, 2- or 3-D token grid.

    The sequence is ``E`` extra tokens (CLS, registers) followed by the grid's
    ``prod(grid)`` tokens in row-major order; ``E = N - prod(grid)`` is read at run
    time. Extra tokens are global: they see every key and every query sees them.
    A grid query sees a grid key iff, on every axis (sizes ``L``, ``w = kernel``,
    ``δ = dilation``, ``s = stride``):

    * the two lie in the same dilation class (``x ≡ y mod δ``); coordinates below
      are positions within that class (``x // δ``);
    * non-causal axis: ``y`` is in the window of ``w`` consecutive positions centred
      on the query (``w // 2`` before it), shifted inward near the ends of the axis,
      so the query sees ``min(w, length)`` positions; with stride ``s`` the queries
      ``g·s .. g·s + s - 1`` share the window of position ``g·s + s // 2``
      (``s == w``: non-overlapping blocks);
    * causal axis: ``x - w < y <= x`` (stride 1 only).

    Padding keys (``kv_mask`` False) are never seen. ``kernel >= grid`` on every
    axis with dilation 1 and no causal axis is exactly dense attention.

    Args:
        kernel: window size per axis, or one int for every axis (default ``(7, 7)``).
        dilation: step between window positions per axis (default 1).
        stride: queries per shared window along each axis, ``<= kernel`` (default 1).
        causal: per axis, or one bool for every axis (default False).
        grid: the token grid, e.g. ``(H, W)`` or ``(T, H, W)``; default: the site's
            grid, which attnopt reads from the model config (image / patch size).

    Example:
        >>> Neighborhood(kernel=(3, 7, 7), causal=(True, False, False)).describe()
        'Neighborhood(kernel=(3, 7, 7), causal=(True, False, False))'
    """

    variant = "neighborhood"

    kernel: int | tuple[int, ...] = (7, 7)
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    grid: tuple[int, ...] | None = None

    def validate(self) -> None:
        ranks = {len(getattr(self, f)) for f in _AXES_FIELDS if isinstance(getattr(self, f), tuple)}
        if self.grid is not None:
            if not isinstance(self.grid, tuple):
                raise ValueError(
                    f"Neighborhood: grid must be a tuple of 1 to 3 positive ints or None, "
                    f"got {self.grid!r}"
                )
            ranks.add(len(self.grid))
        for name in _AXES_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                raise ValueError(f"Neighborhood: {name} must be an int or a tuple, got {value!r}")
        if len(ranks) > 1:
            given = {f: getattr(self, f) for f in (*_AXES_FIELDS, "grid")}
            raise ValueError(
                f"Neighborhood: kernel, dilation, stride, causal and grid must agree on the "
                f"number of axes, got {given}"
            )
        rank = ranks.pop() if ranks else 2
        grid = self.grid if self.grid is not None else (1 << 30,) * rank
        self.axes(grid)

    def axes(self, grid: tuple[int, ...]) -> tuple[tuple, ...]:
        """``(kernel, dilation, stride, causal)`` as per-axis tuples for ``grid``
        (raises ``ValueError`` when a tuple's length is not the grid's rank)."""
        caller = "Neighborhood"
        rank = len(grid)
        axes = tuple(expand_axes(f, getattr(self, f), rank, caller) for f in _AXES_FIELDS)
        check_neighborhood_args(caller, grid, *axes)
        return axes


def _grid(config: Neighborhood, site: AttentionSite) -> tuple[int, ...] | None:
    return config.grid if config.grid is not None else site.grid


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    assert isinstance(config, Neighborhood)
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"neighborhood attention cannot honour an additive bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if site.cross:
        return (
            "neighborhood attention needs queries and keys on one token grid, but this is "
            "cross-attention; site left as dense attention"
        )
    if site.causal:
        return (
            "neighborhood attention does not combine with a token-order causal mask (use "
            "per-axis Neighborhood(causal=...)); site left as dense attention"
        )
    grid = _grid(config, site)
    if grid is None:
        return "neighborhood attention needs a token grid: pass Neighborhood(grid=(H, W))"
    try:
        config.axes(tuple(grid))
    except ValueError as err:
        return f"{err}; site left as dense attention"
    return None


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, Neighborhood)
    grid = tuple(_grid(config, site))
    kernel, dilation, stride, causal = config.axes(grid)
    return OpCall(
        torch.ops.attnopt.neighborhood_attention.default,
        (float(site.scale), list(grid), list(kernel), list(dilation), list(stride), list(causal)),
    )


register_variant(Variant(Neighborhood, supports=_supports, build=_build, accepts_bias=False))
