"""Neighbourhood attention on CPU in O(N·window) time and memory, forward and backward.

The queries of a grid are cut into tiles (``4 × 8`` for a 2-D 13×13 kernel). Along each
axis the windows of consecutive queries only move forward, so the keys a tile can
see form one rectangle: on each axis, from the first query's window start to the
last query's window end (Faster Neighborhood Attention's and GNA's tile-level
view). Every tile's rectangle is given the same size (the largest tile's, shifted
inward at the borders), so all tiles are one batched matmul: the tile's queries
against the gathered rectangle keys, plus the extra (global) tokens, which every
tile sees. Which rectangle key a query sees is separable by axis, so the exact
per-query windows come from one small ``[tile, rect]`` mask per axis and tile row,
combined once per group of tile rows into the additive mask the scores start from
(the matmul accumulates onto it, then one fused softmax); no ``[N, N]`` tensor is
ever built.

Dilation ``δ`` splits each axis into ``δ`` interleaved sub-grids that never see each
other, so each residue class of positions is an undilated problem on its own
(strided) sub-grid. The extra tokens' own rows (CLS, registers) see every key: they
are a small ``[E, N]`` dense attention.

The backward recomputes each group's weights ``P`` and applies the softmax
gradient ``dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))``; key and value gradients of
overlapping rectangles are summed back into place with ``index_add_``.

Memory: tiles are processed in groups (several heads' whole grids for small
problems, else a few tile rows along the first axis of one head) whose scores hold
about ``max_scores`` elements; besides the results only one group's scores,
gathered keys and values, and query copies are alive at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import compute_dtype, masked_attention
from attnopt.kernels.neighborhood.geometry import axis_window_bounds, sub_axis_length
from attnopt.kernels.neighborhood.reference import check_sequence, neighborhood_axes

__all__ = [
    "neighborhood_attention_tiled",
    "neighborhood_backward",
    "neighborhood_forward",
]

_NEG_INF = float("-inf")
# Score elements per group (2 MiB in fp32; the gathered keys and values take about
# four times that). Fewer, larger groups mean fewer ops (small ops stall when the CPU
# is shared) but more memory; 2**21 measured no faster single-threaded (13×13 window,
# 128×128 grid) and needs ~3x the extra memory.
_MAX_SCORES = 1 << 19
# Queries per tile. Measured on CPU (fp32, D=64): 32 query rows per tile is where the
# batched matmuls stay efficient while the rectangle (tile + kernel - 1 per axis)
# wastes least; e.g. 4×8 tiles run 13×13 windows ~1.6x faster than 8×8 or 4×4.
_TILE_QUERIES = 32


def default_tile(grid, kernel, dilation) -> tuple[int, ...]:
    """Per-axis tile sizes: powers of two with ``_TILE_QUERIES`` queries per tile (or as
    many as the grid has) whose rectangle of keys is smallest; ties go to the longest
    last axis (contiguous keys)."""
    lengths = [-(-g // d) for g, d in zip(grid, dilation)]
    options = [[t for t in (1, 2, 4, 8, 16, 32) if t == 1 or t // 2 < n] for n in lengths]
    best = None
    for tile in itertools.product(*options):
        queries = math.prod(tile)
        if queries > _TILE_QUERIES:
            continue
        rect = math.prod(min(t + w - 1, n) for t, w, n in zip(tile, kernel, lengths))
        score = (-queries, rect, tuple(-t for t in reversed(tile)))
        if best is None or score < best[0]:
            best = (score, tile)
    return best[1]


def neighborhood_attention_tiled(
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
    tile: int | Sequence[int] | None = None,
    max_scores: int | None = None,
) -> torch.Tensor:
    """Neighbourhood attention without materialising an ``[N, N]`` tensor.

    Same semantics as
    :func:`~attnopt.kernels.neighborhood.reference.neighborhood_attention_reference`.
    Differentiable once (q, k and v) with the tiled backward.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``, ``H % Hkv == 0``;
            ``E = N - prod(grid)`` extra tokens first, then the grid in row-major order.
        kv_mask: optional bool broadcastable to ``[B, H, N]``; False keys are never seen.
        grid, kernel, dilation, stride, causal: see
            :mod:`attnopt.kernels.neighborhood.geometry`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        tile: queries per tile along each axis; default: 32 queries per tile, shaped
            to make the rectangle of keys smallest (4×8 for a 13×13 kernel).
        max_scores: score elements per group of tiles (bounds the extra memory);
            default ``2**19``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1 + 32 * 32, 16) for _ in range(3))
        >>> neighborhood_attention_tiled(q, k, v, grid=(32, 32), kernel=7).shape
        torch.Size([1, 2, 1025, 16])
    """
    caller = "neighborhood_attention_tiled"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    axes = neighborhood_axes(grid, kernel, dilation, stride, causal, caller)
    check_sequence(caller, shapes.q_len, shapes.kv_len, axes[0])
    if tile is not None:
        tile = tuple(tile) if isinstance(tile, (list, tuple)) else (tile,) * len(axes[0])
        if len(tile) != len(axes[0]) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile
        ):
            raise ValueError(
                f"{caller}: tile must be a positive int or one per grid axis, got {tile!r}"
            )
    if max_scores is not None and (not isinstance(max_scores, int) or max_scores < 1):
        raise ValueError(f"{caller}: max_scores must be a positive int or None, got {max_scores!r}")
    kw = dict(
        grid=axes[0],
        kernel=axes[1],
        dilation=axes[2],
        stride=axes[3],
        causal=axes[4],
        scale=scale,
        tile=tile,
        max_scores=max_scores,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _TiledAttention.apply(q, k, v, kv_mask, kw)
    return neighborhood_forward(q, k, v, kv_mask, **kw)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_mask, kw):
        ctx.save_for_backward(q, k, v, kv_mask)
        ctx.kw = kw
        return neighborhood_forward(q, k, v, kv_mask, **kw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, kv_mask = ctx.saved_tensors
        dq, dk, dv = neighborhood_backward(grad_out, q, k, v, kv_mask, **ctx.kw)
        return dq, dk, dv, None, None


# -- geometry of one call -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Axis:
    """One axis of one dilation residue class, cut into tiles."""

    n: int  # positions on the sub-axis
    tile: int  # queries per tile
    tiles: int  # tiles along the axis
    rect: int  # keys per tile (the rectangle's extent)
    key_pos: torch.Tensor  # [tiles, rect] full-grid coordinate of each rectangle key
    bias: torch.Tensor  # [tiles, tile, rect] additive: 0 where the query sees the key


def _tile_axis(n, residue, dilation, kernel, stride, causal, tile, ct, device) -> _Axis:
    lo, hi = axis_window_bounds(n, kernel, stride, causal, device=device)
    T = min(tile, n)
    tiles = -(-n // T)
    first = torch.arange(tiles, device=device) * T
    last = (first + T).clamp(max=n) - 1
    rect = int((hi[last] - lo[first]).max())
    start = lo[first].clamp(max=n - rect)  # same size everywhere: shift inward at the end
    cols = start[:, None] + torch.arange(rect, device=device)  # [tiles, rect] sub-axis coords
    rows = first[:, None] + torch.arange(T, device=device)  # [tiles, T]
    valid = rows < n
    rows = rows.clamp(max=n - 1)
    seen = (cols[:, None, :] >= lo[rows][:, :, None]) & (cols[:, None, :] < hi[rows][:, :, None])
    # Padding rows (past the axis end) see the whole rectangle, so no row is empty
    # for the wrong reason; their outputs are never stored.
    seen |= ~valid[:, :, None]
    bias = torch.zeros(seen.shape, dtype=ct, device=device).masked_fill_(~seen, _NEG_INF)
    return _Axis(n=n, tile=T, tiles=tiles, rect=rect, key_pos=residue + dilation * cols, bias=bias)


@dataclasses.dataclass(frozen=True)
class _Sub:
    """One dilation residue class: the sub-grid of positions ``r_a + δ_a·i_a``."""

    residue: tuple[int, ...]
    axes: tuple[_Axis, ...]
    key_index: torch.Tensor  # [tiles (all axes), rect keys + E] into the sequence

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def tile_queries(self) -> int:
        return math.prod(a.tile for a in self.axes)

    @property
    def keys(self) -> int:
        return self.key_index.shape[1]

    @property
    def rect_keys(self) -> int:
        return math.prod(a.rect for a in self.axes)

    @property
    def row_tiles(self) -> int:
        """Tiles in one row along the first axis (all other axes)."""
        return math.prod(a.tiles for a in self.axes[1:])

    def sub_view(self, t: torch.Tensor, grid: Sequence[int], dilation: Sequence[int]):
        """``t [..., E + prod(grid), X]`` → strided view ``[..., n_1, .., n_r, X]`` of the
        sub-grid's tokens."""
        lead = t.dim() - 2
        extra = t.shape[lead] - math.prod(grid)
        g = t.narrow(lead, extra, math.prod(grid)).unflatten(lead, tuple(grid))
        index = (slice(None),) * lead + tuple(
            slice(r, None, d) for r, d in zip(self.residue, dilation)
        )
        return g[index]


@dataclasses.dataclass(frozen=True)
class _Plan:
    B: int
    H: int
    Hkv: int
    R: int
    N: int
    E: int
    D: int
    Dv: int
    ct: torch.dtype
    scale: float
    grid: tuple[int, ...]
    dilation: tuple[int, ...]
    subs: tuple[_Sub, ...]
    max_scores: int
    key_bias: torch.Tensor | None  # [Bm, Hm, N] additive: padding keys -inf


def _plan(q, k, v, kv_mask, *, grid, kernel, dilation, stride, causal, scale, tile, max_scores):
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    ct = compute_dtype(q.dtype)
    dev = q.device
    E = N - math.prod(grid)
    tile = tile or default_tile(grid, kernel, dilation)
    if max_scores is None:
        max_scores = _MAX_SCORES
    key = (
        tuple(grid),
        tuple(kernel),
        tuple(dilation),
        tuple(stride),
        tuple(causal),
        tuple(tile),
        E,
        ct,
        dev,
    )
    subs = _SUBS.get(key)
    if subs is None:
        subs = _subgrids(grid, kernel, dilation, stride, causal, tile, E, ct, dev)
        if len(_SUBS) >= _SUBS_CACHED:
            _SUBS.pop(next(iter(_SUBS)))
        _SUBS[key] = subs
    key_bias = None
    if kv_mask is not None:
        km = kv_mask.to(dev)
        km = km.reshape((1,) * (3 - km.dim()) + tuple(km.shape))
        km = km.expand(km.shape[0], km.shape[1], N)
        key_bias = torch.zeros(km.shape, dtype=ct, device=dev).masked_fill_(~km, _NEG_INF)
    return _Plan(
        B=B,
        H=H,
        Hkv=Hkv,
        R=H // Hkv,
        N=N,
        E=E,
        D=D,
        Dv=Dv,
        ct=ct,
        scale=1.0 / math.sqrt(D) if scale is None else float(scale),
        grid=tuple(grid),
        dilation=tuple(dilation),
        subs=subs,
        max_scores=max_scores,
        key_bias=key_bias,
    )


# Tile geometry depends only on the grid, the parameters and E; a model calls the op
# with the same ones in every layer, so it is built once (a few dozen small tensors).
_SUBS: dict[tuple, tuple[_Sub, ...]] = {}
_SUBS_CACHED = 32


def _subgrids(grid, kernel, dilation, stride, causal, tile, E, ct, dev) -> tuple[_Sub, ...]:
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    subs = []
    residues = itertools.product(*(range(min(d, g)) for d, g in zip(dilation, grid)))
    for residue in residues:
        axes = tuple(
            _tile_axis(
                sub_axis_length(grid[a], dilation[a], residue[a]),
                residue[a],
                dilation[a],
                kernel[a],
                stride[a],
                causal[a],
                tile[a],
                ct,
                dev,
            )
            for a in range(len(grid))
        )
        # Sequence index of rectangle key (k_1..k_r) of tile (t_1..t_r): broadcast the
        # per-axis coordinates over [t_1, .., t_r, k_1, .., k_r].
        rank = len(axes)
        flat = torch.full((1,) * (2 * rank), E, dtype=torch.long, device=dev)
        for a, ax in enumerate(axes):
            shape = [1] * (2 * rank)
            shape[a], shape[rank + a] = ax.tiles, ax.rect
            flat = flat + (ax.key_pos * strides[a]).view(shape)
        tiles = math.prod(ax.tiles for ax in axes)
        rect_index = flat.reshape(tiles, -1)
        extra_index = torch.arange(E, device=dev).expand(tiles, E)
        subs.append(_Sub(residue, axes, torch.cat([rect_index, extra_index], dim=1)))
    return tuple(subs)


class _Workspace:
    """Buffers reused from group to group (a fresh multi-MiB tensor per group costs a
    page fault per 4 KiB page, a large part of the run time)."""

    def __init__(self, device: torch.device) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._device = device
        self.cache: dict = {}  # the current tile rows' window mask (see _window_bias)

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self._device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


@dataclasses.dataclass(frozen=True)
class _Group:
    """Tile rows ``t0 .. t0 + g - 1`` (first axis) of one sub-grid, for the kv heads
    ``hk0 .. hk0 + nh - 1`` of batch ``b`` (small problems take many heads at once,
    large ones a few tile rows of one head)."""

    b: int
    hk0: int
    nh: int
    sub: _Sub
    t0: int
    g: int

    @property
    def tiles(self) -> int:
        """Tiles per head."""
        return self.g * self.sub.row_tiles

    @property
    def key_index(self) -> torch.Tensor:
        rt = self.sub.row_tiles
        return self.sub.key_index[self.t0 * rt : (self.t0 + self.g) * rt]  # [tiles, keys]

    @property
    def rows(self) -> slice:
        """Sub-grid rows (first axis) of the group's queries."""
        ax = self.sub.axes[0]
        return slice(self.t0 * ax.tile, min((self.t0 + self.g) * ax.tile, ax.n))

    def heads(self, R: int) -> slice:
        return slice(self.hk0 * R, (self.hk0 + self.nh) * R)


def _groups(plan: _Plan) -> Iterator[_Group]:
    for sub in plan.subs:
        rows = sub.axes[0].tiles
        per_row = sub.row_tiles * plan.R * sub.tile_queries * sub.keys
        if per_row * rows <= plan.max_scores:
            nh, g = max(1, min(plan.Hkv, plan.max_scores // (per_row * rows))), rows
        else:
            nh, g = 1, max(1, plan.max_scores // per_row)
        # Tile rows outermost: consecutive groups share one window mask (_window_bias).
        for t0 in range(0, rows, g):
            for b in range(plan.B):
                for hk0 in range(0, plan.Hkv, nh):
                    yield _Group(b, hk0, min(nh, plan.Hkv - hk0), sub, t0, min(g, rows - t0))


# -- moving queries and outputs between the grid and the tile layout ---------------------------


def _tile_perm(rank: int) -> tuple[list[int], list[int]]:
    """Permutations between ``[h, R, t_1, T_1, .., t_r, T_r, X]`` (grid order, tiles split)
    and ``[h, t_1, .., t_r, R, T_1, .., T_r, X]`` (tile layout)."""
    to_tiles = [0] + [2 + 2 * a for a in range(rank)] + [1] + [3 + 2 * a for a in range(rank)]
    to_tiles.append(2 * rank + 2)
    back = [0] * len(to_tiles)
    for i, p in enumerate(to_tiles):
        back[p] = i
    return to_tiles, back


def _split(plan: _Plan, grp: _Group) -> list[int]:
    """``[h, R, t_1, T_1, .., t_r, T_r]``: the group's padded query grid, tiles split."""
    split = [grp.nh, plan.R]
    for i, ax in enumerate(grp.sub.axes):
        split += [grp.g if i == 0 else ax.tiles, ax.tile]
    return split


def _grid_view(plan: _Plan, grp: _Group, t: torch.Tensor) -> torch.Tensor:
    """``t [B, H, N, X]`` → strided view ``[h, R, rows, n_2, .., X]`` of the group's queries."""
    heads = t[grp.b, grp.heads(plan.R)].unflatten(0, (grp.nh, plan.R))  # [h, R, N, X]
    return grp.sub.sub_view(heads, plan.grid, plan.dilation)[:, :, grp.rows]


def _load(plan: _Plan, grp: _Group, src: torch.Tensor, ws: _Workspace, key: str):
    """Queries (or output gradients) of the group in tile layout ``[h*tiles, R*T, X]``,
    in the compute dtype; padding rows are 0."""
    sub = grp.sub
    X = src.shape[-1]
    view = _grid_view(plan, grp, src)
    split = _split(plan, grp)
    padded = [split[2 + 2 * a] * split[3 + 2 * a] for a in range(sub.rank)]
    to_tiles, _ = _tile_perm(sub.rank)
    out = ws.get(key, (grp.nh * grp.tiles, plan.R * sub.tile_queries, X), plan.ct)
    tiled = out.view(*[(split + [X])[p] for p in to_tiles])
    if list(view.shape[2:-1]) == padded:  # whole tiles: one strided copy
        tiled.copy_(view.reshape(*split, X).permute(to_tiles))
        return out
    buf = ws.get(key + "_grid", (grp.nh, plan.R, *padded, X), plan.ct)
    buf.zero_()
    buf[(slice(None), slice(None)) + tuple(slice(0, s) for s in view.shape[2:-1])].copy_(view)
    tiled.copy_(buf.view(*split, X).permute(to_tiles))
    return out


def _store(plan: _Plan, grp: _Group, dest: torch.Tensor, o: torch.Tensor, ws: _Workspace):
    """Write tile-layout rows ``o [h*tiles, R*T, X]`` back into ``dest [B, H, N, X]``."""
    sub = grp.sub
    X = o.shape[-1]
    split = _split(plan, grp)
    to_tiles, back = _tile_perm(sub.rank)
    tiled = o.view(*[(split + [X])[p] for p in to_tiles]).permute(back)  # [h, R, t1, T1, ..]
    padded = [split[2 + 2 * a] * split[3 + 2 * a] for a in range(sub.rank)]
    view = _grid_view(plan, grp, dest)
    if list(view.shape[2:-1]) == padded:  # whole tiles: one strided copy
        view.view(*split, X).copy_(tiled)
        return
    buf = ws.get("store", (*split, X), o.dtype)
    buf.copy_(tiled)
    merged = buf.view(grp.nh, plan.R, *padded, X)
    view.copy_(merged[(slice(None), slice(None)) + tuple(slice(0, s) for s in view.shape[2:-1])])


# -- one group's weights ------------------------------------------------------------------------


def _window_bias(plan: _Plan, grp: _Group, cache: dict) -> torch.Tensor:
    """Additive ``[tiles, T, keys]`` mask of the exact windows of the group's tile rows:
    the per-axis masks combined once (the extra tokens' columns are 0), then shared by
    every head and batch entry."""
    sub = grp.sub
    key = ("bias", id(sub), grp.t0, grp.g)
    if key not in cache:
        cache.clear()  # one group of tile rows at a time (groups come row by row)
        rank = sub.rank
        device = sub.key_index.device
        bias = torch.zeros(grp.tiles, sub.tile_queries, sub.keys, dtype=plan.ct, device=device)
        tiles_shape = [grp.g] + [ax.tiles for ax in sub.axes[1:]]
        rect = bias.view(*tiles_shape, *[ax.tile for ax in sub.axes], sub.keys)
        rect = rect[..., : sub.rect_keys].unflatten(-1, tuple(ax.rect for ax in sub.axes))
        for a, ax in enumerate(sub.axes):
            axis_bias = ax.bias[grp.t0 : grp.t0 + grp.g] if a == 0 else ax.bias
            shape = [1] * (3 * rank)
            shape[a], shape[rank + a], shape[2 * rank + a] = axis_bias.shape
            rect.add_(axis_bias.view(shape))
        cache[key] = bias
    return cache[key]


def _lanes(plan: _Plan, grp: _Group, cache: dict) -> torch.Tensor:
    """Indices of the group's rectangle keys into its heads' rows ``[h*N]``."""
    key = ("lanes", id(grp.sub), grp.t0, grp.g, grp.nh)
    if key not in cache:
        index = grp.key_index.reshape(-1)
        if grp.nh > 1:
            heads = torch.arange(grp.nh, device=index.device)[:, None] * plan.N
            index = (heads + index).reshape(-1)
        cache[key] = index
    return cache[key]


def _weights(plan: _Plan, grp: _Group, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ws):
    """Attention weights of the group's queries ``qg [h*tiles, R*T, D]`` (unscaled) over
    their rectangles plus the extra tokens: ``(p, kg, vg, lanes)`` with normalised
    weights ``p [h*tiles, R*T, keys]`` (rows with no visible key are 0) and ``lanes``
    gathering the keys from the group's heads' rows ``[h*N]``."""
    sub, ct = grp.sub, plan.ct
    h, G, K, N = grp.nh, grp.tiles, grp.sub.keys, plan.N
    index = grp.key_index.reshape(-1)
    lanes = _lanes(plan, grp, ws.cache)
    kh = k[grp.b, grp.hk0 : grp.hk0 + h].reshape(h * N, plan.D)  # k and v are contiguous
    vh = v[grp.b, grp.hk0 : grp.hk0 + h].reshape(h * N, plan.Dv)
    rows = h * G * K
    if kh.dtype == ct:
        kg = torch.index_select(kh, 0, lanes, out=ws.get("k", (rows, plan.D), ct))
        vg = torch.index_select(vh, 0, lanes, out=ws.get("v", (rows, plan.Dv), ct))
    else:
        kg = ws.get("k", (rows, plan.D), ct).copy_(kh.index_select(0, lanes))
        vg = ws.get("v", (rows, plan.Dv), ct).copy_(vh.index_select(0, lanes))
    kg, vg = kg.view(h * G, K, plan.D), vg.view(h * G, K, plan.Dv)

    # Scores start as the window mask, broadcast over heads, and the matmul adds
    # scale·q·kᵀ onto it (one pass over the scores instead of a matmul and an add).
    s = ws.get("s", (h * G, qg.shape[1], K), ct)
    bias = _window_bias(plan, grp, ws.cache)  # [tiles, T, keys]
    s.view(h, G, plan.R, sub.tile_queries, K).copy_(bias.view(1, G, 1, sub.tile_queries, K))
    s.baddbmm_(qg, kg.transpose(1, 2), alpha=plan.scale)
    empty = None
    if plan.key_bias is not None:
        kb = plan.key_bias[grp.b if plan.key_bias.shape[0] > 1 else 0]  # [H|1, N]
        per_head = kb.shape[0] > 1
        kb = kb[grp.heads(plan.R)].view(h, plan.R, N) if per_head else kb.view(1, 1, N)
        kb = kb.index_select(2, index).view(kb.shape[0], kb.shape[1], G, 1, K)
        s.view(h, G, plan.R, sub.tile_queries, K).add_(kb.transpose(1, 2))
        # Padding can hide every key of a row; softmax would give NaN there.
        empty = torch.isneginf(torch.amax(s, dim=-1, keepdim=True))
        if bool(empty.any()):
            s.masked_fill_(empty, 0.0)
        else:
            empty = None
    p = torch.softmax(s, dim=-1, out=s)
    if empty is not None:
        p.masked_fill_(empty, 0.0)
    return p, kg, vg, lanes


def _extra_rows(plan: _Plan, q, k, v, kv_mask):
    """The extra tokens' own rows: dense attention of ``E`` queries over all keys."""
    visible = None if kv_mask is None else kv_mask.unsqueeze(-2)  # [.., 1, N]
    return lambda q_, k_, v_: masked_attention(q_, k_, v_, visible, scale=plan.scale)


# -- forward and backward ----------------------------------------------------------------------


def neighborhood_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
    scale: float | None,
    tile: Sequence[int] | None = None,
    max_scores: int | None = None,
) -> torch.Tensor:
    """Tiled forward (no autograd); inputs must already be checked, arguments per axis."""
    plan = _plan(
        q,
        k,
        v,
        kv_mask,
        grid=grid,
        kernel=kernel,
        dilation=dilation,
        stride=stride,
        causal=causal,
        scale=scale,
        tile=tile,
        max_scores=max_scores,
    )
    out = q.new_empty(plan.B, plan.H, plan.N, plan.Dv)
    if out.numel() == 0:
        return out
    ws = _Workspace(q.device)
    with torch.no_grad():
        if plan.E:
            attend = _extra_rows(plan, q, k, v, kv_mask)
            out[:, :, : plan.E] = attend(q[:, :, : plan.E], k, v)
        # Gathering rectangles from several heads at once needs each batch's [Hkv*N]
        # rows flat (a no-op in the usual [B, H, N, D] layout).
        k, v = k.contiguous(), v.contiguous()
        for grp in _groups(plan):
            qg = _load(plan, grp, q, ws, "q")
            p, _, vg, _ = _weights(plan, grp, qg, k, v, ws)
            o = torch.bmm(p, vg, out=ws.get("o", (p.shape[0], qg.shape[1], plan.Dv), plan.ct))
            _store(plan, grp, out, o, ws)
    return out


def neighborhood_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
    scale: float | None,
    tile: Sequence[int] | None = None,
    max_scores: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`neighborhood_forward` for ``grad_out``.

    Recomputes each group's weights ``P``; with ``O = P·V`` and ``Δ = rowsum(dO ∘ O)``:
    ``dV = Pᵀ·dO``, ``dS = P ∘ (dO·Vᵀ − Δ)``, ``dQ = scale·dS·K``, ``dK = dSᵀ·(scale·Q)``.
    """
    plan = _plan(
        q,
        k,
        v,
        kv_mask,
        grid=grid,
        kernel=kernel,
        dilation=dilation,
        stride=stride,
        causal=causal,
        scale=scale,
        tile=tile,
        max_scores=max_scores,
    )
    ct = plan.ct
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)  # summed over groups, kept in ct
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    if q.numel() == 0 or grad_out.numel() == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if plan.E:
        attend = _extra_rows(plan, q, k, v, kv_mask)
        _, vjp = torch.func.vjp(attend, q[:, :, : plan.E].to(ct), k.to(ct), v.to(ct))
        dqe, dke, dve = vjp(grad_out[:, :, : plan.E].to(ct))
        dq[:, :, : plan.E] = dqe
        dk += dke
        dv += dve
    ws = _Workspace(q.device)
    k, v = k.contiguous(), v.contiguous()
    with torch.no_grad():
        for grp in _groups(plan):
            qg = _load(plan, grp, q, ws, "q")
            dog = _load(plan, grp, grad_out, ws, "do")
            p, kg, vg, index = _weights(plan, grp, qg, k, v, ws)
            G, rows, K = p.shape
            o = torch.bmm(p, vg, out=ws.get("o", (G, rows, plan.Dv), ct))
            delta = o.mul_(dog).sum(dim=-1, keepdim=True)  # [tiles, R*T, 1]
            dvg = torch.bmm(p.transpose(1, 2), dog, out=ws.get("dvg", (G, K, plan.Dv), ct))
            heads = slice(grp.hk0, grp.hk0 + grp.nh)
            dv[grp.b, heads].view(-1, plan.Dv).index_add_(0, index, dvg.view(-1, plan.Dv))
            ds = torch.bmm(dog, vg.transpose(1, 2), out=ws.get("ds", (G, rows, K), ct))
            ds.sub_(delta).mul_(p)
            dkg = torch.bmm(ds.transpose(1, 2), qg, out=ws.get("dkg", (G, K, plan.D), ct))
            dkg = dkg.view(-1, plan.D)  # dK = dSᵀ·(scale·Q)
            dk[grp.b, heads].view(-1, plan.D).index_add_(0, index, dkg, alpha=plan.scale)
            dqg = torch.bmm(ds, kg, out=ws.get("dqg", (G, rows, plan.D), ct))
            dqg.mul_(plan.scale)
            _store(plan, grp, dq, dqg, ws)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
