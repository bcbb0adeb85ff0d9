"""Neighbourhood attention on CPU in O(N·window) time and memory, forward and backward.

The queries of a grid are cut into tiles (``4 × 8`` for a 2-D 13×13 kernel). Along each
axis the windows of consecutive queries only move forward, so the keys a tile can
see form one rectangle: on each axis, from the first query's window start to the
last query's window end (Faster Neighborhood Attention's and GNA's tile-level
view). Every tile's rectangle is given the same size (the largest tile's, shifted
inward at the borders), so a block of tiles is one batched matmul: the tiles'
queries against their gathered rectangle keys, plus the extra (global) tokens, which
every tile sees. Which rectangle key a query sees is separable by axis, so the exact
per-query windows come from small ``[tile, rect]`` masks per axis (tiles away from
the ends of an axis share one), summed into a block's few distinct tile masks; those
are copied into the scores, the matmul accumulates onto them, then one in-place
softmax. No ``[N, N]`` tensor is ever built.

Dilation ``δ`` splits each axis into ``δ`` interleaved sub-grids that never see each
other, so each residue class of positions is an undilated problem on its own
(strided) sub-grid. The extra tokens' own rows (CLS, registers) see every key: they
are a small ``[E, N]`` dense attention, run a few heads at a time.

The backward recomputes each block's weights ``P`` and applies the softmax
gradient ``dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))``; key and value gradients of
overlapping rectangles are summed back into place with ``index_add_``.

Memory: besides the output, the forward allocates a workspace of at most
``_WORKSPACE_BYTES`` (1.5 MiB) whatever the problem size, plus per-axis geometry of a
few KiB; the backward, which also holds a block's gradients, up to about 2.6 times
that. Tiles are processed in blocks (a run of tiles along one axis for one kv head
for large grids, whole sub-grids of several heads for small ones) whose gathered keys
(then values, in the same buffer), scores, queries and window masks fit that budget.
The buffers are reused from block to block; each block's queries are read from, and
its results written to, strided views of the ``[B, H, N, D]`` tensors, so no input
is copied whole (no padded, permuted, contiguous or compute-dtype copy).
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
# Workspace of one block of tiles (forward): gathered keys or values, scores, queries
# or outputs, key index and window masks. A block this small stays in the L2 cache
# between the op that writes its keys or scores and the matmul or softmax that reads
# them, so each op runs faster per tile than on ~12 MiB blocks; that pays for the
# per-op overhead of more blocks. Fewer than ~8 tiles a block makes that overhead
# show: on the benchmark problems (B=1, H=8, D=64, fp32, N=16384; 8-tile blocks)
# 1.5 MiB runs as fast as ~12 MiB blocks did single-threaded (2-D 13×13: 255 vs 255
# ms, 3-D 3×7×7: 310 vs 321 ms thread time), and 1 MiB (4-6 tiles) 0-5% slower.
_WORKSPACE_BYTES = 1536 * 1024
# Queries per tile. Measured on CPU (fp32, D=64): 32 query rows per tile is where the
# batched matmuls stay efficient while the rectangle (tile + kernel - 1 per axis)
# wastes least. With the earlier ~12 MiB blocks, 4×8 tiles ran 13×13 windows ~1.6x
# faster than 8×8 or 4×4; with the current blocks, 4×8 and 8×8 tie, 4×4 and 2×8 are
# 7% and 19% slower, and for 3×7×7, 2×4×4 beats 1×4×4 by 10% and 2×4×8 by 25%.
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
        max_scores: score elements per block of tiles (bounds the extra memory; the
            gathered keys take about ``D / (H/Hkv · queries per tile)`` times as much);
            default: as many as fit a workspace of about 1.5 MiB.

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
    offset: torch.Tensor  # [tiles, rect] int64: this axis's term of each key's sequence index
    # The window mask along the axis, additive (0 where the query sees the key, else
    # -inf): the distinct [tile, rect] masks, and which one each tile has (tiles away
    # from the ends share one).
    patterns: torch.Tensor  # [distinct, tile, rect]
    pattern: tuple[int, ...]  # [tiles]


def _tile_axis(n, residue, dilation, kernel, stride, causal, tile, step, ct, device) -> _Axis:
    """Axis of ``n`` sub-axis positions ``residue + dilation·i`` whose grid coordinate
    moves the sequence index by ``step``."""
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
    patterns, pattern = torch.unique(bias.flatten(1), dim=0, return_inverse=True)
    offset = (residue + dilation * cols) * step
    return _Axis(
        n=n,
        tile=T,
        tiles=tiles,
        rect=rect,
        offset=offset,
        patterns=patterns.view(-1, T, rect),
        pattern=tuple(pattern.tolist()),
    )


@dataclasses.dataclass(frozen=True)
class _Sub:
    """One dilation residue class: the sub-grid of positions ``r_a + δ_a·i_a``."""

    residue: tuple[int, ...]
    axes: tuple[_Axis, ...]
    extra: int  # E: every tile sees the extra tokens after its rectangle keys

    @property
    def rank(self) -> int:
        return len(self.axes)

    @property
    def tile_queries(self) -> int:
        return math.prod(a.tile for a in self.axes)

    @property
    def rect_keys(self) -> int:
        return math.prod(a.rect for a in self.axes)

    @property
    def keys(self) -> int:
        return self.rect_keys + self.extra

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
    max_scores: int | None
    flat_heads: bool  # k and v rows of one batch entry form one [Hkv·N, X] matrix
    key_bias: torch.Tensor | None  # [Bm, Hm, N] additive: padding keys -inf


def _plan(q, k, v, kv_mask, *, grid, kernel, dilation, stride, causal, scale, tile, max_scores):
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    ct = compute_dtype(q.dtype)
    dev = q.device
    E = N - math.prod(grid)
    tile = tile or default_tile(grid, kernel, dilation)
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
        flat_heads=B > 0 and k[0].is_contiguous() and v[0].is_contiguous(),
        key_bias=key_bias,
    )


# Tile geometry depends only on the grid, the parameters and E; a model calls the op
# with the same ones in every layer, so it is built once (a few small tensors per axis).
_SUBS: dict[tuple, tuple[_Sub, ...]] = {}
_SUBS_CACHED = 32


def _subgrids(grid, kernel, dilation, stride, causal, tile, E, ct, dev) -> tuple[_Sub, ...]:
    steps = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    subs = []
    residues = itertools.product(*(range(min(d, g)) for d, g in zip(dilation, grid)))
    for residue in residues:
        axes = [
            _tile_axis(
                sub_axis_length(grid[a], dilation[a], residue[a]),
                residue[a],
                dilation[a],
                kernel[a],
                stride[a],
                causal[a],
                tile[a],
                steps[a],
                ct,
                dev,
            )
            for a in range(len(grid))
        ]
        # The grid starts after the E extra tokens: fold that into the first axis's term.
        axes[0] = dataclasses.replace(axes[0], offset=axes[0].offset + E)
        subs.append(_Sub(residue, tuple(axes), E))
    return tuple(subs)


class _Workspace:
    """Buffers reused from block to block (a fresh tensor per block costs allocator
    calls and, for large ones, a page fault per 4 KiB page)."""

    def __init__(self, device: torch.device) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._device = device

    def get(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, numel: int = 0
    ) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``key``, which holds at least ``numel``
        elements (so views of several shapes can take turns in one buffer)."""
        need = max(math.prod(shape), numel)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            buf = self._buffers.pop(key, None)
            del buf  # free the old buffer before allocating its replacement
            buf = torch.empty(need, dtype=dtype, device=self._device)
            self._buffers[key] = buf
        return buf[: math.prod(shape)].view(shape)


# -- blocks of tiles ---------------------------------------------------------------------------


class _Block:
    """Tiles ``ranges[a] = (start, stop)`` along each axis of one sub-grid: one tile on
    the axes before the split axis, a run of tiles on it, every tile on the axes after
    it. Everything here is shared by the block's groups (batch entries × kv heads)."""

    def __init__(self, plan: _Plan, sub: _Sub, ranges: Sequence[tuple[int, int]]):
        r = sub.rank
        self.sub = sub
        self.ranges = tuple(ranges)
        self.counts = tuple(b - a for a, b in ranges)  # tiles per axis
        self.G = math.prod(self.counts)  # tiles per head
        self.T = sub.tile_queries
        self.K = sub.keys
        self.R = plan.R
        self.tile_sizes = tuple(ax.tile for ax in sub.axes)
        self.rects = tuple(ax.rect for ax in sub.axes)
        # Sub-grid coordinates of the block's queries, and their extent in whole tiles.
        self.region = tuple(
            slice(a * ax.tile, min(b * ax.tile, ax.n)) for (a, b), ax in zip(ranges, sub.axes)
        )
        self.select = (slice(None), *self.region)  # [h·R, n_1, .., X] → the region
        self.padded = tuple(c * t for c, t in zip(self.counts, self.tile_sizes))
        self.whole = all(s.stop - s.start == p for s, p in zip(self.region, self.padded))
        # [c_1, T_1, .., c_r, T_r], and the permutation from grid order
        # [h, R, c_1, T_1, .., c_r, T_r, X] to tile order [h, c_1, .., c_r, R, T_1, .., T_r, X].
        self.split_dims = [d for c, t in zip(self.counts, self.tile_sizes) for d in (c, t)]
        to_tiles = [0, *(2 + 2 * a for a in range(r)), 1, *(3 + 2 * a for a in range(r)), 2 * r + 2]
        self.to_tiles = to_tiles
        self.back = [to_tiles.index(i) for i in range(len(to_tiles))]
        # The distinct window masks of the block's tiles: per axis, the distinct masks of
        # its tiles there; tile g (row-major) has combination combo[g] of them.
        self.distinct = []
        which = []
        for ax, (a, b) in zip(sub.axes, ranges):
            ids = sorted(set(ax.pattern[a:b]))
            self.distinct.append(tuple(ids))
            which.append([ids.index(p) for p in ax.pattern[a:b]])
        self.U = math.prod(len(u) for u in self.distinct)
        sizes = [len(u) for u in self.distinct]
        self.combo = [
            sum(c * math.prod(sizes[a + 1 :]) for a, c in enumerate(cs))
            for cs in itertools.product(*which)
        ]

    def key_index(self, out: torch.Tensor) -> torch.Tensor:
        """``out [G·K]`` ← the sequence index of every tile's keys (its rectangle's, then
        the extra tokens): the per-axis terms summed by broadcasting."""
        sub, r = self.sub, self.sub.rank
        idx = out.view(self.G, self.K)
        rect = idx[:, : sub.rect_keys].view(*self.counts, *self.rects)
        for a, (ax, (start, stop)) in enumerate(zip(sub.axes, self.ranges)):
            shape = [1] * (2 * r)
            shape[a], shape[r + a] = stop - start, ax.rect
            term = ax.offset[start:stop].view(shape)
            if a == 0:
                rect.copy_(term.expand(rect.shape))
            else:
                rect.add_(term)
        if sub.extra:
            idx[:, sub.rect_keys :].copy_(torch.arange(sub.extra, device=out.device))
        return out

    def mask_table(self, out: torch.Tensor) -> torch.Tensor:
        """``out [U, T, K]`` ← the block's ``U`` distinct window masks (additive: ``-inf``
        where a query does not see a rectangle key, else 0; 0 for the extra tokens), the
        per-axis masks summed by broadcasting; tile ``g`` has mask ``combo[g]``."""
        sub, r = self.sub, self.sub.rank
        full = out.view(*(len(u) for u in self.distinct), *self.tile_sizes, self.K)
        if sub.extra:
            full[..., sub.rect_keys :].zero_()
        rect = full[..., : sub.rect_keys].unflatten(-1, self.rects)
        terms = []
        for a, (ax, ids) in enumerate(zip(sub.axes, self.distinct)):
            shape = [1] * (3 * r)
            shape[a], shape[r + a], shape[2 * r + a] = len(ids), ax.tile, ax.rect
            pats = ax.patterns[ids[0] : ids[0] + 1] if len(ids) == 1 else ax.patterns[list(ids)]
            terms.append(pats.view(shape))
        if len(terms) == 1:
            rect.copy_(terms[0])
        else:
            torch.add(terms[0].expand(rect.shape), terms[1], out=rect)
            for t in terms[2:]:
                rect.add_(t)
        return out


def _blocks(plan: _Plan, sub: _Sub) -> tuple[int, Iterator[_Block]]:
    """``(kv heads per group, blocks)`` of a sub-grid: the first axis whose later axes'
    tiles all fit a block is split into even runs of tiles, as long as a block fits
    ``max_scores`` score elements or by default the workspace budget."""
    R, T, K, X = plan.R, sub.tile_queries, sub.keys, max(plan.D, plan.Dv)
    es = torch.finfo(plan.ct).bits // 8
    tiles = [ax.tiles for ax in sub.axes]
    distinct = [len(set(ax.pattern)) for ax in sub.axes]

    def shape(units: int) -> tuple[int, int, int]:
        split = next(a for a in range(sub.rank) if math.prod(tiles[a + 1 :]) <= units)
        run = min(tiles[split], units // math.prod(tiles[split + 1 :]))
        run = -(-tiles[split] // -(-tiles[split] // run))  # even runs
        return split, run, run * math.prod(tiles[split + 1 :])

    if plan.max_scores is not None:
        units = max(1, plan.max_scores // (R * T * K))
    else:
        # Per tile and kv head: scores, keys or values, queries or outputs, key index;
        # per block: the distinct window masks.
        per_tile = es * (R * T * K + K * X + R * T * X) + 8 * K
        units = max(1, _WORKSPACE_BYTES // per_tile)
        while units > 1:
            split, run, G = shape(units)
            masks = min(G, min(run, distinct[split]) * math.prod(distinct[split + 1 :]))
            if G * per_tile + masks * es * T * K <= _WORKSPACE_BYTES:
                break
            units -= 1
    split, run, G = shape(units)
    heads = 1
    if run == tiles[split] and split == 0 and plan.flat_heads:  # whole sub-grids
        heads = max(1, min(plan.Hkv, units // G))

    def blocks() -> Iterator[_Block]:
        for prefix in itertools.product(*(range(t) for t in tiles[:split])):
            for start in range(0, tiles[split], run):
                ranges = [(p, p + 1) for p in prefix]
                ranges.append((start, min(start + run, tiles[split])))
                ranges += [(0, t) for t in tiles[split + 1 :]]
                yield _Block(plan, sub, ranges)

    return heads, blocks()


def _heads(plan: _Plan, t_sub: torch.Tensor, nh: int) -> list[list[torch.Tensor]]:
    """``t_sub [B, H, ...]`` → views ``[b][i]`` of the query heads of kv heads
    ``i·nh .. (i+1)·nh - 1`` (made once per call, not once per group)."""
    R = plan.R
    return [
        [t_sub[b, hk0 * R : min(hk0 + nh, plan.Hkv) * R] for hk0 in range(0, plan.Hkv, nh)]
        for b in range(plan.B)
    ]


class _Group:
    """Workspace views for groups of ``h`` kv heads (one batch entry) of blocks of one
    shape: the gathered keys and values, scores, queries and outputs in tile layout,
    and the moves between the grid and the tile layout. Made once per block shape and
    bound to each block in turn, so that a group costs only its ops (a block holds
    only a few tiles, so per-group Python overhead shows)."""

    def __init__(self, plan: _Plan, blk: _Block, h: int, ws: _Workspace, *, grads: bool):
        ct, R, G, K, T = plan.ct, plan.R, blk.G, blk.K, blk.T
        D, Dv, X = plan.D, plan.Dv, max(plan.D, plan.Dv)
        self.plan, self.blk, self.h, self.ws = plan, blk, h, ws
        rows, RT, HG = h * G * K, R * T, h * G
        self.rows = rows
        self.s = ws.get("s", (HG, RT, K), ct)
        self.s5 = self.s.view(h, G, R, T, K)
        # Forward: the keys, then the values, take turns in one buffer, and the outputs
        # take the queries'. The backward keeps them all.
        self.qg = ws.get("q", (HG, RT, D), ct, numel=HG * RT * X)
        self.k = ws.get("k" if grads else "kv", (rows, D), ct, numel=rows * X)
        self.v = ws.get("v" if grads else "kv", (rows, Dv), ct, numel=rows * X)
        self.kg, self.vg = self.k.view(HG, K, D), self.v.view(HG, K, Dv)
        self.kgT = self.kg.transpose(1, 2)
        self.o = ws.get("o" if grads else "q", (HG, RT, Dv), ct, numel=HG * RT * X)
        if grads:
            self.dog = ws.get("do", (HG, RT, Dv), ct)
            self.dqg = ws.get("o", (HG, RT, D), ct, numel=HG * RT * X)
            self.ds = ws.get("ds", (HG, RT, K), ct)
            self.dvg = ws.get("dkv", (HG, K, Dv), ct, numel=rows * X)
            self.dkg = ws.get("dkv", (HG, K, D), ct, numel=rows * X)
        # Grid order [h, R, c_1, T_1, .., c_r, T_r, X] (tiles split) per width X, and the
        # buffers seen in it (tile order permuted back).
        self.split = {x: [h, R, *blk.split_dims, x] for x in (D, Dv)}
        self.q_grid = self._grid(self.qg)
        self.o_grid = self._grid(self.o)
        if grads:
            self.do_grid, self.dq_grid = self._grid(self.dog), self._grid(self.dqg)
        self.masks = self.rows_mask = self.lanes = None
        self.s_rows = self.s.view(HG * R, T * K)

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """Tile-layout buffer ``t [h·G, R·T, X]`` seen in grid order."""
        split = self.split[t.shape[-1]]
        return t.view([split[p] for p in self.blk.to_tiles]).permute(self.blk.back)

    def bind(self, blk: _Block, masks: torch.Tensor, lanes: torch.Tensor) -> _Group:
        """Point the group at block ``blk`` (of this group's shape), its distinct window
        masks ``masks [U, T, K]`` and key lanes."""
        self.blk = blk
        self.lanes = lanes[: self.rows]
        self.masks = masks
        # One mask for every tile and a single query head: baddbmm adds q·kᵀ onto it
        # as its (broadcast) input, one pass over the scores. Otherwise each score row
        # first gets its tile's mask.
        self.rows_mask = None
        if blk.U > 1 or self.h * blk.R > 1:
            combo = torch.tensor(blk.combo, device=masks.device)
            self.rows_mask = combo[None, :, None].expand(self.h, blk.G, blk.R).reshape(-1)
        return self

    def load(self, grid: torch.Tensor, src: torch.Tensor) -> None:
        """Buffer ``grid`` (one of the ``*_grid`` views) ← the block's region
        ``src [h·R, n_1', .., X]`` of a grid view, in the compute dtype; padding rows 0."""
        blk = self.blk
        if blk.whole:  # one strided copy
            grid.copy_(src.view(self.split[src.shape[-1]]))
            return
        merged = self.ws.get("grid", (self.h, blk.R, *blk.padded, src.shape[-1]), grid.dtype)
        merged.zero_()
        inner = (slice(None), slice(None), *(slice(0, s) for s in src.shape[1:-1]))
        merged[inner].copy_(src.view(self.h, blk.R, *src.shape[1:]))
        grid.copy_(merged.view(grid.shape))

    def store(self, grid: torch.Tensor, dest: torch.Tensor) -> None:
        """The block's region ``dest [h·R, n_1', .., X]`` of a grid view ← buffer ``grid``."""
        blk = self.blk
        if blk.whole:  # one strided copy
            dest.view(self.split[dest.shape[-1]]).copy_(grid)
            return
        merged = self.ws.get("grid", grid.shape, grid.dtype)
        merged.copy_(grid)
        merged = merged.view(self.h, blk.R, *blk.padded, dest.shape[-1])
        inner = (slice(None), slice(None), *(slice(0, s) for s in dest.shape[1:-1]))
        dest.view(self.h, blk.R, *dest.shape[1:]).copy_(merged[inner])

    def gather(self, out: torch.Tensor, src: torch.Tensor) -> None:
        """``out [h·G·K, X]`` ← rows ``lanes`` of ``src`` (one kv head ``[N, X]``, or ``h``
        heads' ``[h·N, X]``) in the compute dtype."""
        if src.dtype == out.dtype:
            torch.index_select(src, 0, self.lanes, out=out)
        else:
            out.copy_(src.index_select(0, self.lanes))

    def weights(self, key_bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """Normalised weights ``p [h·G, R·T, K]`` of the loaded queries (unscaled) over
        the gathered keys; ``key_bias [h|1, R|1, N]`` adds the padding mask; rows with
        no visible key are 0."""
        s, scale = self.s, self.plan.scale
        if self.rows_mask is None:
            torch.baddbmm(self.masks, self.qg, self.kgT, alpha=scale, out=s)
        else:
            masks = self.masks.view(self.masks.shape[0], -1)
            torch.index_select(masks, 0, self.rows_mask, out=self.s_rows)
            s.baddbmm_(self.qg, self.kgT, alpha=scale)
        if key_bias is None:
            return torch.softmax(s, dim=-1, out=s)
        blk = self.blk
        kb = key_bias.index_select(2, index).view(*key_bias.shape[:2], blk.G, 1, blk.K)
        self.s5.add_(kb.transpose(1, 2))
        # Padding can hide every key of a row; softmax would give NaN there.
        empty = torch.isneginf(torch.amax(s, dim=-1, keepdim=True))
        if not bool(empty.any()):
            return torch.softmax(s, dim=-1, out=s)
        s.masked_fill_(empty, 0.0)
        return torch.softmax(s, dim=-1, out=s).masked_fill_(empty, 0.0)


def _sub_groups(plan: _Plan, sub: _Sub, ws: _Workspace, *, grads: bool):
    """``(nh, groups)``: kv heads per group, and an iterator over the sub-grid's groups
    ``(grp, index, b, i)`` — batch entry ``b``, kv heads ``i·nh ..`` — block by block
    (the batch entries and heads inner, so a block's key ``index [G·K]`` and window
    masks are built once), with ``grp`` bound to the block."""
    nh, blocks = _blocks(plan, sub)

    def groups():
        shapes: dict[tuple, _Group] = {}
        for blk in blocks:
            index = blk.key_index(ws.get("index", (blk.G * blk.K,), torch.long))
            lanes = _head_lanes(index, nh, plan.N)
            masks = blk.mask_table(ws.get("masks", (blk.U, blk.T, blk.K), plan.ct))
            for b in range(plan.B):
                for i, hk0 in enumerate(range(0, plan.Hkv, nh)):
                    h = min(nh, plan.Hkv - hk0)
                    grp = shapes.get((blk.counts, h))
                    if grp is None:
                        grp = shapes[blk.counts, h] = _Group(plan, blk, h, ws, grads=grads)
                    if grp.blk is not blk or grp.lanes is None:
                        grp.bind(blk, masks, lanes)
                    yield grp, index, b, i

    return nh, groups()


def _key_bias(plan: _Plan, b: int, hk0: int, h: int) -> torch.Tensor | None:
    """The padding mask of batch entry ``b``'s query heads of kv heads ``hk0 .. hk0 + h - 1``
    as ``[h|1, R|1, N]``."""
    if plan.key_bias is None:
        return None
    kb = plan.key_bias[b if plan.key_bias.shape[0] > 1 else 0]  # [H|1, N]
    if kb.shape[0] == 1:
        return kb.view(1, 1, plan.N)
    return kb[hk0 * plan.R : (hk0 + h) * plan.R].view(h, plan.R, plan.N)


def _head_lanes(index: torch.Tensor, heads: int, N: int) -> torch.Tensor:
    """``index [G·K]`` repeated for ``heads`` kv heads, each offset by its ``N`` rows."""
    if heads == 1:
        return index
    offsets = torch.arange(heads, device=index.device)[:, None] * N
    return (offsets + index).reshape(-1)


def _rows(t: torch.Tensor, nh: int) -> list[list[torch.Tensor]]:
    """``t [B, Hkv, N, X]`` → ``[b][i]``: kv head ``i`` as ``[N, X]``, or with ``nh > 1``
    the kv heads ``i·nh ..`` as one ``[h·N, X]`` matrix (``_Plan.flat_heads``)."""
    B, Hkv = t.shape[:2]
    if nh == 1:
        return [[t[b, hk] for hk in range(Hkv)] for b in range(B)]
    return [[t[b, hk : hk + nh].flatten(0, 1) for hk in range(0, Hkv, nh)] for b in range(B)]


# -- the extra tokens' rows --------------------------------------------------------------------


def _extra_chunks(plan: _Plan, dtype: torch.dtype, kv_mask):
    """``(batch entries, kv heads, query heads, visible)`` chunks for the extra tokens'
    own rows (dense attention of ``E`` queries over all keys): as many batch entries
    and kv heads at a time as keep its ``[E, N]`` scores (and compute-dtype copies of
    k and v) within the workspace budget."""
    es = torch.finfo(plan.ct).bits // 8
    per_head = es * (4 * plan.R * plan.E * plan.N)  # scores and their softmax temporaries
    if dtype != plan.ct:
        per_head += es * plan.N * (plan.D + plan.Dv)
    heads = max(1, min(plan.Hkv, _WORKSPACE_BYTES // per_head))
    batch = max(1, _WORKSPACE_BYTES // (per_head * plan.Hkv)) if heads == plan.Hkv else 1
    km = None
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))  # [Bm, Hm, N|1]
    for b0 in range(0, plan.B, batch):
        bs = slice(b0, min(b0 + batch, plan.B))
        for hk0 in range(0, plan.Hkv, heads):
            kvh = slice(hk0, min(hk0 + heads, plan.Hkv))
            qh = slice(kvh.start * plan.R, kvh.stop * plan.R)
            visible = None
            if km is not None:
                m = km[bs] if km.shape[0] > 1 else km
                m = m[:, qh] if m.shape[1] > 1 else m
                visible = m.unsqueeze(-2)  # [b|1, h|1, 1, N|1]
            yield bs, kvh, qh, visible


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
            for bs, kvh, qh, visible in _extra_chunks(plan, q.dtype, kv_mask):
                out[bs, qh, : plan.E] = masked_attention(
                    q[bs, qh, : plan.E], k[bs, kvh], v[bs, kvh], visible, scale=plan.scale
                )
        for sub in plan.subs:
            nh, groups = _sub_groups(plan, sub, ws, grads=False)
            q_heads = _heads(plan, sub.sub_view(q, plan.grid, plan.dilation), nh)
            out_heads = _heads(plan, sub.sub_view(out, plan.grid, plan.dilation), nh)
            k_rows, v_rows = _rows(k, nh), _rows(v, nh)
            for grp, index, b, i in groups:
                sel = grp.blk.select
                grp.load(grp.q_grid, q_heads[b][i][sel])
                grp.gather(grp.k, k_rows[b][i])
                p = grp.weights(_key_bias(plan, b, i * nh, grp.h), index)
                grp.gather(grp.v, v_rows[b][i])
                torch.bmm(p, grp.vg, out=grp.o)
                grp.store(grp.o_grid, out_heads[b][i][sel])
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

    Recomputes each block's weights ``P``; with ``O = P·V`` and ``Δ = rowsum(dO ∘ O)``:
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
    ct, D, Dv = plan.ct, plan.D, plan.Dv
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)  # summed over blocks, kept in ct
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    if q.numel() == 0 or grad_out.numel() == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if plan.E:
        for bs, kvh, qh, visible in _extra_chunks(plan, q.dtype, kv_mask):

            def attend(q_, k_, v_, visible=visible):
                return masked_attention(q_, k_, v_, visible, scale=plan.scale)

            _, vjp = torch.func.vjp(
                attend, q[bs, qh, : plan.E].to(ct), k[bs, kvh].to(ct), v[bs, kvh].to(ct)
            )
            dqe, dke, dve = vjp(grad_out[bs, qh, : plan.E].to(ct))
            dq[bs, qh, : plan.E] = dqe
            dk[bs, kvh] += dke
            dv[bs, kvh] += dve
    ws = _Workspace(q.device)
    with torch.no_grad():
        for sub in plan.subs:
            nh, groups = _sub_groups(plan, sub, ws, grads=True)
            q_heads, do_heads, dq_heads = (
                _heads(plan, sub.sub_view(t, plan.grid, plan.dilation), nh)
                for t in (q, grad_out, dq)
            )
            k_rows, v_rows, dk_rows, dv_rows = (_rows(t, nh) for t in (k, v, dk, dv))
            for grp, index, b, i in groups:
                sel = grp.blk.select
                qg, dog = grp.qg, grp.dog
                grp.load(grp.q_grid, q_heads[b][i][sel])
                grp.load(grp.do_grid, do_heads[b][i][sel])
                grp.gather(grp.k, k_rows[b][i])
                p = grp.weights(_key_bias(plan, b, i * nh, grp.h), index)
                grp.gather(grp.v, v_rows[b][i])
                o = torch.bmm(p, grp.vg, out=grp.o)
                delta = o.mul_(dog).sum(dim=-1, keepdim=True)  # [h*G, R*T, 1]
                dvg = torch.bmm(p.transpose(1, 2), dog, out=grp.dvg)
                dv_rows[b][i].index_add_(0, grp.lanes, dvg.view(-1, Dv))
                ds = torch.bmm(dog, grp.vg.transpose(1, 2), out=grp.ds)
                ds.sub_(delta).mul_(p)
                dkg = torch.bmm(ds.transpose(1, 2), qg, out=grp.dkg)  # dK = dSᵀ·(scale·Q)
                dk_rows[b][i].index_add_(0, grp.lanes, dkg.view(-1, D), alpha=plan.scale)
                torch.bmm(ds, grp.kg, out=grp.dqg).mul_(plan.scale)
                grp.store(grp.dq_grid, dq_heads[b][i][sel])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
