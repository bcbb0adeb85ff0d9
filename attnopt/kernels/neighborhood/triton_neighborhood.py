"""Neighbourhood attention forward in Triton, for 1-, 2- and 3-D token grids.

Semantics are those of
:func:`~attnopt.kernels.neighborhood.reference.neighborhood_attention_reference`: the
sequence is ``E`` extra (global) tokens followed by the grid in row-major order; grid
queries see the extra tokens and, on every axis, the keys in their window (dilation,
stride, per-axis causality, windows shifted inward at the borders); extra tokens see
every key; padding keys are never seen; a row with no visible key is 0.

Tile-level window skipping (as Faster Neighborhood Attention and GNA describe): a
program takes a query tile, a ``T0 × T1 × T2`` box of one dilation class's sub-grid
(lower-rank grids get leading axes of length 1). Along each axis the windows of
consecutive queries only move forward, so the union of the tile's windows is one box,
from the first query's window start to the last query's window end, and the program
visits only the key tiles (boxes of the same shape) that intersect it. Inside a key
tile, the exact per-query window is the product of one comparison per axis; the
softmax is FlashAttention's online softmax in fp32 (``exp2`` with the scale folded
into q), with IEEE fp32 dot products. The extra tokens are one more run of key
blocks for every tile, and their own query rows a dense pass over all keys.

Dilation ``δ`` splits an axis into ``δ`` interleaved sub-axes that never see each
other; programs are laid out over (dilation class, tile), and a class shorter than the
longest (``L % δ != 0``) leaves its last tiles without queries (they do no work).

Forward only: the op's backward keeps the tiled PyTorch backward on every device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import triton_runs_on
from attnopt.kernels.neighborhood.reference import check_sequence, neighborhood_axes

__all__ = ["MAX_HEAD_DIM", "neighborhood_attention_triton", "neighborhood_forward_triton"]

# Head dims a program holds whole ([tile, D] query and key tiles).
MAX_HEAD_DIM = 256
# Queries (and keys) per tile: 64 keeps a [64, 64] score tile and [64, D] operands in
# registers for D up to 128.
_TILE = 64
_LOG2E = 1.4426950408889634


def _alloc(shape, *, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (the tests fill it with NaN to catch an
    element a kernel never writes)."""
    return torch.empty(shape, dtype=dtype, device=device)


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _axis_bounds(i, n, w, s, CAUSAL: tl.constexpr):
    """Window ``[lo, hi)`` of sub-axis positions ``i`` (``0 <= i < n``), exactly as
    ``geometry.axis_window_bounds``."""
    if CAUSAL:
        lo = tl.maximum(i - w + 1, 0)
        hi = i + 1
    else:
        span = tl.minimum(n * 0 + w, n)
        centre = (i // s) * s + s // 2
        lo = tl.minimum(tl.maximum(centre - w // 2, 0), n - span)
        hi = lo + span
    return lo, hi


@triton.jit
def _attend(q, m_i, l_i, acc, k_base, v_base, kidx, kok, seen, dc, d_ok, ec, e_ok,
            skn, skd, svn, svd):  # fmt: skip
    """Online-softmax update of ``(m_i, l_i, acc)`` with the keys at sequence indices
    ``kidx`` (``kok``: they exist and are not padding; ``seen [BM, BN]``: the query
    sees the key). ``q`` carries ``scale·log2(e)``."""
    kt = tl.load(
        k_base + kidx[:, None] * skn + dc[None, :] * skd,
        mask=kok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    vt = tl.load(
        v_base + kidx[:, None] * svn + ec[None, :] * svd,
        mask=kok[:, None] & e_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    s = tl.dot(q, tl.trans(kt), input_precision="ieee")
    s = tl.where(seen & kok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet keeps m = -inf; subtracting 0 keeps its p at 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _mask_ok(MASK, b, h, kidx, ok, smb, smh, smn, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        keep = tl.load(MASK + b * smb + h * smh + kidx * smn, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _grid_kernel(
    Q, K, V, Out, MASK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, smb, smh, smn,
    H, R, E, D, DV, qk_scale,
    L0, L1, L2, W0, W1, W2, S0, S1, S2, DL0, DL1, DL2, RD1, RD2, NT0, NT1, NT2,
    CA0: tl.constexpr, CA1: tl.constexpr, CA2: tl.constexpr, HAS_MASK: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """One query tile of one dilation class of query head ``bh``."""
    BM: tl.constexpr = T0 * T1 * T2
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    t2 = pid % NT2
    rest = pid // NT2
    t1 = rest % NT1
    rest = rest // NT1
    t0 = rest % NT0
    rest = rest // NT0
    r2 = rest % RD2
    rest = rest // RD2
    r1 = rest % RD1
    r0 = rest // RD1
    n0 = tl.cdiv(L0 - r0, DL0)  # this class's sub-axis lengths
    n1 = tl.cdiv(L1 - r1, DL1)
    n2 = tl.cdiv(L2 - r2, DL2)
    active = (t0 * T0 < n0) & (t1 * T1 < n1) & (t2 * T2 < n2)

    m = tl.arange(0, BM)
    l0 = m // (T1 * T2)
    l1 = (m // T2) % T1
    l2 = m % T2
    i0 = t0 * T0 + l0
    i1 = t1 * T1 + l1
    i2 = t2 * T2 + l2
    q_ok = (i0 < n0) & (i1 < n1) & (i2 < n2)
    lo0, hi0 = _axis_bounds(tl.minimum(i0, n0 - 1), n0, W0, S0, CA0)
    lo1, hi1 = _axis_bounds(tl.minimum(i1, n1 - 1), n1, W1, S1, CA1)
    lo2, hi2 = _axis_bounds(tl.minimum(i2, n2 - 1), n2, W2, S2, CA2)
    qidx = E + ((r0 + DL0 * i0) * L1 + (r1 + DL1 * i1)) * L2 + (r2 + DL2 * i2)

    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    d_ok = dc < D
    e_ok = ec < DV
    q = tl.load(
        Q + b * sqb + h * sqh + qidx[:, None] * sqn + dc[None, :] * sqd,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * qk_scale
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)

    # The extra (global) tokens: every grid query sees them.
    n_extra = tl.where(active, E, 0)
    for e0 in range(0, n_extra, BM):
        kidx = e0 + m
        kok = _mask_ok(MASK, b, h, kidx, kidx < E, smb, smh, smn, HAS_MASK)
        seen = q_ok[:, None] & kok[None, :]
        m_i, l_i, acc = _attend(
            q, m_i, l_i, acc, k_base, v_base, kidx, kok, seen, dc, d_ok, ec, e_ok,
            skn, skd, svn, svd,
        )  # fmt: skip

    # The union of the tile's windows, per axis: first query's start to last query's end.
    f0 = tl.minimum(t0 * T0, n0 - 1)
    f1 = tl.minimum(t1 * T1, n1 - 1)
    f2 = tl.minimum(t2 * T2, n2 - 1)
    klo0, _ = _axis_bounds(f0, n0, W0, S0, CA0)
    klo1, _ = _axis_bounds(f1, n1, W1, S1, CA1)
    klo2, _ = _axis_bounds(f2, n2, W2, S2, CA2)
    _, khi0 = _axis_bounds(tl.minimum(f0 + T0, n0) - 1, n0, W0, S0, CA0)
    _, khi1 = _axis_bounds(tl.minimum(f1 + T1, n1) - 1, n1, W1, S1, CA1)
    _, khi2 = _axis_bounds(tl.minimum(f2 + T2, n2) - 1, n2, W2, S2, CA2)
    kt0_end = tl.where(active, (khi0 - 1) // T0 + 1, klo0 // T0)
    for kt0 in range(klo0 // T0, kt0_end):
        j0 = kt0 * T0 + l0
        seen0 = (j0[None, :] >= lo0[:, None]) & (j0[None, :] < hi0[:, None])
        for kt1 in range(klo1 // T1, (khi1 - 1) // T1 + 1):
            j1 = kt1 * T1 + l1
            seen01 = seen0 & (j1[None, :] >= lo1[:, None]) & (j1[None, :] < hi1[:, None])
            for kt2 in range(klo2 // T2, (khi2 - 1) // T2 + 1):
                j2 = kt2 * T2 + l2
                seen = seen01 & (j2[None, :] >= lo2[:, None]) & (j2[None, :] < hi2[:, None])
                k_in = (j0 < n0) & (j1 < n1) & (j2 < n2)
                kidx = E + ((r0 + DL0 * j0) * L1 + (r1 + DL1 * j1)) * L2 + (r2 + DL2 * j2)
                kok = _mask_ok(MASK, b, h, kidx, k_in, smb, smh, smn, HAS_MASK)
                m_i, l_i, acc = _attend(
                    q, m_i, l_i, acc, k_base, v_base, kidx, kok, seen, dc, d_ok, ec, e_ok,
                    skn, skd, svn, svd,
                )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * sob + h * soh + qidx[:, None] * son + ec[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None] & e_ok[None, :])


@triton.jit
def _extra_rows_kernel(
    Q, K, V, Out, MASK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, smb, smh, smn,
    H, R, E, N, D, DV, qk_scale,
    HAS_MASK: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid·BM, +BM)`` of the ``E`` extra tokens: dense attention over all keys."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    m = tl.arange(0, BM)
    rows = pid * BM + m
    r_ok = rows < E
    dc = tl.arange(0, BD)
    ec = tl.arange(0, BDV)
    d_ok = dc < D
    e_ok = ec < DV
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqn + dc[None, :] * sqd,
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * qk_scale
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for k0 in range(0, N, BM):
        kidx = k0 + m
        kok = _mask_ok(MASK, b, h, kidx, kidx < N, smb, smh, smn, HAS_MASK)
        seen = r_ok[:, None] & kok[None, :]
        m_i, l_i, acc = _attend(
            q, m_i, l_i, acc, k_base, v_base, kidx, kok, seen, dc, d_ok, ec, e_ok,
            skn, skd, svn, svd,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * sob + h * soh + rows[:, None] * son + ec[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & e_ok[None, :])


# -- launcher -----------------------------------------------------------------------------------


def _pow2_up(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def tile_shape(lengths: Sequence[int], kernel: Sequence[int], target: int = _TILE) -> tuple:
    """Per-axis power-of-two tile extents (queries and keys) for sub-axes of
    ``lengths`` with windows ``kernel``: ``target`` lanes per tile (fewer when the grid
    is smaller, never under the 16 ``tl.dot`` needs), shaped to visit the fewest key
    tiles over the whole grid; ties go to the longest last axis (contiguous keys)."""
    lanes = max(16, min(target, math.prod(_pow2_up(n) for n in lengths)))
    best = None
    options = [[1 << e for e in range(int(math.log2(lanes)) + 1)] for _ in lengths]
    for tile in itertools.product(*options):
        if math.prod(tile) != lanes:
            continue
        # Wider than the axis only on the last axis, and only to reach 16 lanes.
        if any(t > _pow2_up(n) for t, n in zip(tile[:-1], lengths[:-1])):
            continue
        cost = 1
        for t, n, w in zip(tile, lengths, kernel):
            tiles = -(-n // t)
            span = min(w, n)
            cost *= tiles * min(tiles, -(-(t + span - 2) // t) + 1)
        key = (cost, tuple(-t for t in reversed(tile)))
        if best is None or key < best[0]:
            best = (key, tile)
    return best[1]


def neighborhood_forward_triton(
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
) -> torch.Tensor:
    """The forward on checked inputs with per-axis arguments (the op's CUDA kernel).

    ``tile``: per-axis power-of-two query/key tile extents (default :func:`tile_shape`).
    """
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    E = N - math.prod(grid)
    pad = 3 - len(grid)
    grid3 = (1,) * pad + tuple(grid)
    kernel3 = (1,) * pad + tuple(kernel)
    dil3 = (1,) * pad + tuple(dilation)
    stride3 = (1,) * pad + tuple(stride)
    causal3 = (False,) * pad + tuple(bool(c) for c in causal)
    residues = [min(d, g) for d, g in zip(dil3, grid3)]
    lengths = [-(-g // d) for g, d in zip(grid3, dil3)]  # the longest class per axis
    tile3 = tile_shape(lengths, kernel3) if tile is None else (1,) * pad + tuple(tile)
    n_tiles = [-(-n // t) for n, t in zip(lengths, tile3)]
    out = _alloc((B, H, N, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
        mask = km.to(device=q.device, dtype=torch.int8)
        ms = tuple(0 if mask.shape[d] == 1 else mask.stride(d) for d in range(3))
    else:
        mask, ms = q, (0, 0, 0)
    BD, BDV = max(16, _pow2_up(D)), max(16, _pow2_up(Dv))
    common = dict(
        sqb=q.stride(0), sqh=q.stride(1), sqn=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2), svd=v.stride(3),
        sob=out.stride(0), soh=out.stride(1), son=out.stride(2), sod=out.stride(3),
        smb=ms[0], smh=ms[1], smn=ms[2],
        H=H, R=H // Hkv, E=E, D=D, DV=Dv, qk_scale=scale * _LOG2E,
        HAS_MASK=kv_mask is not None, BD=BD, BDV=BDV,
        # Eight warps once a [64, D] fp32 operand passes 64×64 elements, so a thread
        # keeps at most 32 of each (a guess from the sizes: autotune runs on CUDA only).
        num_warps=8 if _TILE * max(BD, BDV) > 4096 else 4,
    )  # fmt: skip
    programs = math.prod(residues) * math.prod(n_tiles)
    _grid_kernel[(programs, B * H)](
        q, k, v, out, mask,
        L0=grid3[0], L1=grid3[1], L2=grid3[2],
        W0=kernel3[0], W1=kernel3[1], W2=kernel3[2],
        S0=stride3[0], S1=stride3[1], S2=stride3[2],
        DL0=dil3[0], DL1=dil3[1], DL2=dil3[2],
        RD1=residues[1], RD2=residues[2],
        NT0=n_tiles[0], NT1=n_tiles[1], NT2=n_tiles[2],
        CA0=causal3[0], CA1=causal3[1], CA2=causal3[2],
        T0=tile3[0], T1=tile3[1], T2=tile3[2],
        **common,
    )  # fmt: skip
    if E:
        BM = max(16, min(_TILE, _pow2_up(E)))
        _extra_rows_kernel[(triton.cdiv(E, BM), B * H)](q, k, v, out, mask, N=N, BM=BM, **common)
    return out


def neighborhood_attention_triton(
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
) -> torch.Tensor:
    """Neighbourhood attention forward through the Triton kernel (no autograd).

    Same semantics as
    :func:`~attnopt.kernels.neighborhood.reference.neighborhood_attention_reference`.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``, ``H % Hkv == 0``,
            on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); ``E = N - prod(grid)``
            extra tokens first, then the grid in row-major order.
        kv_mask: optional bool broadcastable to ``[B, H, N]``; False keys are never seen.
        grid, kernel, dilation, stride, causal: see
            :mod:`attnopt.kernels.neighborhood.geometry`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        tile: power-of-two query/key tile extent per axis (or one for all); default
            :func:`tile_shape` (64 lanes).

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example (on a GPU):
        >>> q, k, v = (torch.randn(1, 2, 1 + 32 * 32, 64, device="cuda") for _ in range(3))
        >>> neighborhood_attention_triton(q, k, v, grid=(32, 32), kernel=7).shape  # doctest: +SKIP
        torch.Size([1, 2, 1025, 64])
    """
    caller = "neighborhood_attention_triton"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    axes = neighborhood_axes(grid, kernel, dilation, stride, causal, caller)
    check_sequence(caller, shapes.q_len, shapes.kv_len, axes[0])
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: Triton kernels take CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got q on {q.device}"
        )
    if max(shapes.head_dim, shapes.value_dim) > MAX_HEAD_DIM:
        raise ValueError(
            f"{caller}: head dims must be at most {MAX_HEAD_DIM}, got D = {shapes.head_dim}, "
            f"Dv = {shapes.value_dim}"
        )
    rank = len(axes[0])
    if tile is not None:
        tile = tuple(tile) if isinstance(tile, (list, tuple)) else (tile,) * rank
        ok = len(tile) == rank and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 1 and t & (t - 1) == 0
            for t in tile
        )
        if not ok or math.prod(tile) < 16:
            raise ValueError(
                f"{caller}: tile must be one power of two per grid axis ({rank}) whose "
                f"product is at least 16, got {tile!r}"
            )
    grid, kernel, dilation, stride, causal = axes
    return neighborhood_forward_triton(
        q, k, v, kv_mask, grid=grid, kernel=kernel, dilation=dilation, stride=stride,
        causal=causal, scale=scale, tile=tile,
    )  # fmt: skip
