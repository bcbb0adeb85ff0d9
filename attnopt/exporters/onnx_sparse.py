"""ONNX translations of the sparse and grid attention ops, into standard ONNX operators.

An exporter that lowers ``attnopt::block_sparse_attention`` to dense attention keeps
the answer and loses the point: the file would cost O(N²) again. These translations
keep each variant's math *and* its cost, so the ONNX graph holds no ``[N, N]`` tensor:

* ``block_sparse_attention``: the same block selection as the op (pooled Q and K
  scores + ``TopK``, or a sorted ``CumSum`` of the pooled softmax mass for
  ``threshold``; the static patterns from ``Range`` arithmetic), then ``Gather`` of
  the kept key blocks and attention of each query block to them only:
  ``[B, H, N/block, block, kept·block]`` scores.
* ``neighborhood_attention``: the grid is an op attribute, so every query's window is
  known at export time; the key indices ``[P, W]`` (``W`` = window size) are constant
  initializers, the keys are gathered and attended: ``[B, H, P, W]`` scores.
* ``agent_attention``: mean pooling of the queries into ``n`` agents (a constant
  ``[n, P]`` pooling matrix on a grid, a ``[n, N]`` one built from ``Range`` over a
  sequence) and two small softmax attentions (``[B, H, n, N]`` and ``[B, H, N, n]``).

:data:`SPARSE_TRANSLATIONS` maps each op to its translation, for
``torch.onnx.export(..., dynamo=True, custom_translation_table=SPARSE_TRANSLATIONS)``
(merge it with the other tables of :mod:`attnopt.exporters`).

How the exporter calls a translation: the traced function gets the op's arguments in
schema order; tensors arrive as symbolic ONNX values (``.shape`` / ``.dtype`` hold
what export knows), ``None`` stays ``None`` and every other argument (``scale``,
``block``, ``grid`` lists, ``pattern``) arrives as the plain Python value, so it is
baked into the graph. Head counts and head dims must be static; batch and sequence
lengths may be dynamic (the grid ops need a static grid, which is an attribute).

Semantics are those of the PyTorch references (``attnopt/kernels/*/reference.py``):
softmax over the visible keys only, rows with no visible key give 0, everything
computed in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

# (Importing the kernel packages also registers the torch.ops.attnopt.* ops used below.)
from attnopt.kernels.agent.reference import agent_grid, check_agent_args
from attnopt.kernels.block_sparse.selection import (
    BlockLayout,
    check_block_sparse_args,
    pattern_blocks,
)
from attnopt.kernels.neighborhood.geometry import (
    axis_window_bounds,
    check_neighborhood_args,
    sub_axis_length,
)

__all__ = [
    "SPARSE_TRANSLATIONS",
    "agent_attention",
    "block_sparse_attention",
    "neighborhood_attention",
    "neighborhood_tables",
]

_INF = float("inf")
_END = np.iinfo(np.int64).max  # Slice end meaning "to the end of the axis"
_FLOAT = ir.DataType.FLOAT
# Radial bands are unrolled at export time for any sequence length: band k starts at
# distance local_blocks·2^(k-1); bands starting at or beyond this many blocks are left
# out (2^24 blocks is far beyond any sequence).
_RADIAL_MAX_BLOCKS = 1 << 24


# -- small graph helpers -------------------------------------------------------------------------


def _i64(values: Sequence[int] | int):
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def _f32(value: float):
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32)))


def _dim(x, axis: int):
    """``x.shape[axis]`` as an int64 ``[1]`` tensor."""
    return op.Shape(x, start=axis, end=axis + 1)


def _static(caller: str, name: str, x, axis: int, what: str) -> int:
    d = x.shape[axis] if x.shape is not None else None
    if not isinstance(d, int):
        raise ValueError(
            f"{caller}: {name}.shape[{axis}] ({what}) must be static for ONNX export, got "
            f"{d!r}; export with that dimension fixed (only batch and sequence lengths may "
            f"be dynamic)"
        )
    return d


def _heads(caller: str, q, k, v) -> tuple[int, int, int, int]:
    """``(H, Hkv, D, Dv)``, all static."""
    H = _static(caller, "q", q, 1, "query heads")
    Hkv = _static(caller, "k", k, 1, "key/value heads")
    D = _static(caller, "q", q, 3, "head dim")
    Dv = _static(caller, "v", v, 3, "value head dim")
    if Hkv < 1 or H % Hkv:
        raise ValueError(
            f"{caller}: q heads ({H}) must be a multiple of k/v heads ({Hkv}) (grouped-query "
            f"attention)"
        )
    return H, Hkv, D, Dv


def _no_bias(caller: str, bias) -> None:
    if bias is not None:
        raise ValueError(f"{caller}: bias must be None (the op takes masks only as kv_mask)")


def _compute(x):
    """``x`` in fp32, the dtype the translations compute in (the op computes fp16/bf16 in
    fp32 too; fp64 is computed in fp32 here), and the dtype to return."""
    dtype = x.dtype
    return (x if dtype == _FLOAT else op.Cast(x, to=_FLOAT)), dtype


def _cast_back(x, dtype):
    return x if dtype in (None, _FLOAT) else op.Cast(x, to=dtype)


def _mask3(caller: str, kv_mask, H: int):
    """``kv_mask`` (broadcastable to ``[B, H, M]``) as bool ``[B|1, H|1, M]`` and its
    static head count (1 or ``H``)."""
    rank = len(kv_mask.shape)
    if not 1 <= rank <= 3:
        raise ValueError(
            f"{caller}: kv_mask must be broadcastable to [B, H, M] (rank 1 to 3), got rank {rank}"
        )
    m = kv_mask
    if rank < 3:
        m = op.Unsqueeze(m, _i64(list(range(3 - rank))))
    h = kv_mask.shape[-2] if rank >= 2 else 1
    if not isinstance(h, int) or h not in (1, H):
        raise ValueError(
            f"{caller}: kv_mask's head dim must be static 1 or {H} for ONNX export, got {h!r}"
        )
    return m, h


def _mask5(caller: str, kv_mask, H: int, Hkv: int):
    """``kv_mask`` as bool ``[B|1, Hkv|1, H/Hkv|1, M]`` (query heads split by kv head)."""
    m, h = _mask3(caller, kv_mask, H)
    if h == 1:
        return op.Unsqueeze(m, _i64([2]))
    return op.Reshape(m, _i64([0, Hkv, H // Hkv, -1]))


def _where_visible(scores, visible):
    return scores if visible is None else op.Where(visible, scores, _f32(-_INF))


def _row_max(scores):
    """Row max over the last axis, 0 for rows that are all ``-inf`` (so their weights
    stay exactly 0 instead of NaN)."""
    m = op.ReduceMax(scores, _i64([-1]), keepdims=1)
    return op.Where(op.IsInf(m, detect_positive=0), _f32(0.0), m)


def _safe_divide(num, den):
    return op.Div(num, op.Where(op.Greater(den, _f32(0.0)), den, _f32(1.0)))


def _attend(q, k, v, visible, scale: float, rank: int):
    """``softmax(q·kᵀ·scale)·v`` over the ``visible`` keys (broadcasting batch dims;
    ``rank`` is k's); rows with no visible key are 0."""
    scores = op.Mul(op.MatMul(q, _transpose_last(k, rank)), _f32(scale))
    scores = _where_visible(scores, visible)
    e = op.Exp(op.Sub(scores, _row_max(scores)))
    den = op.ReduceSum(e, _i64([-1]), keepdims=1)
    return _safe_divide(op.MatMul(e, v), den)


def _transpose_last(x, rank: int):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return op.Transpose(x, perm=perm)


# -- neighborhood --------------------------------------------------------------------------------


def _axis_table(length: int, kernel: int, dilation: int, stride: int, causal: bool):
    """Per position of one grid axis, the positions it sees: ``index [L, W]`` int64 and
    ``valid [L, W]`` bool (``W`` the largest window on the axis)."""
    lows, counts = [], []
    for x in range(length):
        r, i = x % dilation, x // dilation
        n = sub_axis_length(length, dilation, r)
        lo, hi = axis_window_bounds(n, kernel, stride, causal)
        lows.append(int(lo[i]))
        counts.append(int(hi[i] - lo[i]))
    width = max(counts)
    t = np.arange(width)[None, :]
    lo = np.asarray(lows)[:, None]
    res = (np.arange(length) % dilation)[:, None]
    valid = t < np.asarray(counts)[:, None]
    index = np.where(valid, (lo + t) * dilation + res, 0)
    return index.astype(np.int64), valid


def neighborhood_tables(
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Which grid keys each grid query sees, as gather tables.

    Args:
        grid, kernel, dilation, stride, causal: per-axis values, as the op takes them.

    Returns:
        ``index [P, W]`` int64 (row-major grid cell of each key; 0 in unused slots) and
        ``valid [P, W]`` bool, ``P = prod(grid)``, ``W`` the product of the per-axis
        largest windows. Queries near borders (causal axes, dilation classes of unequal
        length) see fewer keys; their extra slots are invalid.

    Example:
        >>> index, valid = neighborhood_tables((4, 5), (3, 3), (1, 1), (1, 1), (False, False))
        >>> index.shape, bool(valid.all())
        ((20, 9), True)
    """
    rank = len(grid)
    tables = [_axis_table(*axis) for axis in zip(grid, kernel, dilation, stride, causal)]
    strides = [math.prod(grid[a + 1 :]) for a in range(rank)]
    index = np.zeros((1,) * (2 * rank), dtype=np.int64)
    valid = np.ones((1,) * (2 * rank), dtype=bool)
    for a, (ia, va) in enumerate(tables):
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = ia.shape
        index = index + ia.reshape(shape) * strides[a]
        valid = valid & va.reshape(shape)
    cells = math.prod(grid)
    index, valid = index.reshape(cells, -1), valid.reshape(cells, -1)
    return np.where(valid, index, 0), valid


def neighborhood_attention(
    q,
    k,
    v,
    kv_mask,
    bias,
    scale: float,
    grid: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    causal: Sequence[bool],
):
    """ONNX translation of ``attnopt::neighborhood_attention`` (same arguments).

    Grid queries attend to the extra tokens plus their window, gathered through the
    constant ``[P, W]`` tables of :func:`neighborhood_tables`; extra queries attend to
    every key (``[E, N]`` scores). Cost O(N·(W + E)).
    """
    caller = "attnopt::neighborhood_attention (ONNX)"
    _no_bias(caller, bias)
    grid, kernel, dilation = list(grid), list(kernel), list(dilation)
    stride, causal = list(stride), list(causal)
    check_neighborhood_args(caller, grid, kernel, dilation, stride, causal)
    H, Hkv, D, Dv = _heads(caller, q, k, v)
    rep = H // Hkv
    P = math.prod(grid)
    n = q.shape[2]
    extra = n - P if isinstance(n, int) else None  # None: read at run time
    if extra is not None and extra < 0:
        raise ValueError(
            f"{caller}: the sequence has {n} tokens, fewer than the grid {tuple(grid)!r} holds "
            f"({P})"
        )
    index, valid = neighborhood_tables(grid, kernel, dilation, stride, causal)
    W = index.shape[1]
    q, dtype = _compute(q)
    k, _ = _compute(k)
    v, _ = _compute(v)

    def grid_part(x, axis):
        return op.Slice(x, _i64([-P]), _i64([_END]), _i64([axis]))

    def extra_part(x, axis):
        return op.Slice(x, _i64([0]), _i64([-P]), _i64([axis]))

    idx = op.Constant(value=ir.tensor(index))  # [P, W]
    q5 = op.Reshape(q, _i64([0, Hkv, rep, -1, D]))  # [B, Hkv, R, N, D]
    qg = op.Transpose(grid_part(q5, 3), perm=[0, 1, 3, 2, 4])  # [B, Hkv, P, R, D]
    kw = op.Gather(grid_part(k, 2), idx, axis=2)  # [B, Hkv, P, W, D]
    vw = op.Gather(grid_part(v, 2), idx, axis=2)  # [B, Hkv, P, W, Dv]
    s_win = op.Mul(op.MatMul(qg, _transpose_last(kw, 5)), _f32(scale))  # [B, Hkv, P, R, W]
    vis_win = op.Constant(value=ir.tensor(valid.reshape(P, 1, W)))
    m5 = None
    if kv_mask is not None:
        m5 = _mask5(caller, kv_mask, H, Hkv)  # [b, hk, r, N]
        mw = op.Gather(grid_part(m5, 3), idx, axis=3)  # [b, hk, r, P, W]
        vis_win = op.And(vis_win, op.Transpose(mw, perm=[0, 1, 3, 2, 4]))
    s_win = _where_visible(s_win, vis_win)
    if extra == 0:
        e = op.Exp(op.Sub(s_win, _row_max(s_win)))
        den = op.ReduceSum(e, _i64([-1]), keepdims=1)
        out_grid = _safe_divide(op.MatMul(e, vw), den)  # [B, Hkv, P, R, Dv]
        out = op.Transpose(out_grid, perm=[0, 1, 3, 2, 4])
        return _cast_back(op.Reshape(out, _i64([0, H, -1, Dv])), dtype)

    # Extra (global) tokens: every grid query sees them, they see every key.
    ke = op.Unsqueeze(extra_part(k, 2), _i64([2]))  # [B, Hkv, 1, E, D]
    ve = op.Unsqueeze(extra_part(v, 2), _i64([2]))  # [B, Hkv, 1, E, Dv]
    s_ext = op.Mul(op.MatMul(qg, _transpose_last(ke, 5)), _f32(scale))  # [B, Hkv, P, R, E]
    if m5 is not None:
        me = op.Unsqueeze(extra_part(m5, 3), _i64([2]))  # [b, hk, 1, r, E]
        s_ext = _where_visible(s_ext, me)
    # One softmax over both key sets: a shared row max, summed numerators and weights.
    row_max = _row_max(op.Concat(s_ext, s_win, axis=-1))
    e_ext = op.Exp(op.Sub(s_ext, row_max))
    e_win = op.Exp(op.Sub(s_win, row_max))
    den = op.Add(
        op.ReduceSum(e_ext, _i64([-1]), keepdims=1), op.ReduceSum(e_win, _i64([-1]), keepdims=1)
    )
    num = op.Add(op.MatMul(e_ext, ve), op.MatMul(e_win, vw))
    out_grid = op.Transpose(_safe_divide(num, den), perm=[0, 1, 3, 2, 4])  # [B, Hkv, R, P, Dv]
    k5 = op.Unsqueeze(k, _i64([2]))  # [B, Hkv, 1, N, D]
    v5 = op.Unsqueeze(v, _i64([2]))
    vis_ext = None if m5 is None else op.Unsqueeze(m5, _i64([3]))  # [b, hk, r, 1, N]
    out_ext = _attend(extra_part(q5, 3), k5, v5, vis_ext, scale, 5)  # [B, Hkv, R, E, Dv]
    out = op.Concat(out_ext, out_grid, axis=3)  # [B, Hkv, R, N, Dv]
    return _cast_back(op.Reshape(out, _i64([0, H, -1, Dv])), dtype)


# -- block-sparse --------------------------------------------------------------------------------


def _block_geometry(
    nq_blocks, nk_blocks, first, *, causal, pattern, local_blocks, sink_blocks, radial_far
):
    """``(kept, allowed)`` bool ``[nQ, nK]`` (kept: the static pattern's blocks, for
    ``dynamic`` the forced ones), as in ``selection.pattern_blocks``."""
    r = op.Unsqueeze(op.Add(op.Range(_i64(0), nq_blocks, _i64(1)), first), _i64([1]))
    c = op.Unsqueeze(op.Range(_i64(0), nk_blocks, _i64(1)), _i64([0]))
    d = op.Sub(r, c)  # [nQ, nK]
    if causal:
        allowed = op.GreaterOrEqual(d, _i64(0))
        dist = d
    else:
        allowed = None
        dist = op.Abs(d)
    kept = op.Or(op.Less(dist, _i64(local_blocks)), op.Less(c, _i64(sink_blocks)))
    if pattern == "radial":
        band = 1
        while local_blocks * 2 ** (band - 1) < min(radial_far, _RADIAL_MAX_BLOCKS):
            lo, hi, step = local_blocks * 2 ** (band - 1), local_blocks * 2**band, 2**band
            in_band = op.And(op.GreaterOrEqual(dist, _i64(lo)), op.Less(dist, _i64(hi)))
            on_step = op.Equal(op.Mod(op.Sub(dist, _i64(lo)), _i64(step)), _i64(0))
            kept = op.Or(kept, op.And(in_band, on_step))
            band += 1
    if allowed is not None:
        kept = op.And(kept, allowed)
    return kept, allowed


def _pooled_keys(kb, wb):
    """Mean visible key per block ``[B, Hkv, 1|R, nK, D]`` and ``log(n_c)`` ``[b, hk, r, nK]``
    from key blocks ``kb [B, Hkv, nK, block, D]`` and 0/1 weights ``wb [b, hk, r, nK, block]``."""
    weighted = op.Mul(op.Unsqueeze(kb, _i64([2])), op.Unsqueeze(wb, _i64([-1])))
    sums = op.ReduceSum(weighted, _i64([4]), keepdims=0)  # [B, Hkv, 1|R, nK, D]
    count = op.ReduceSum(wb, _i64([-1]), keepdims=0)  # [b, hk, r, nK]
    mean = op.Div(sums, op.Unsqueeze(op.Max(count, _f32(1.0)), _i64([-1])))
    return mean, op.Log(count)


def _topk_selection(logits, forced, allowed, topk: int, max_forced: int, nk_blocks):
    """``(index, keep)`` ``[.., nQ, K]``: the forced blocks plus the best candidates, as in
    ``selection._select_rows`` with ``topk``."""
    if allowed is not None:
        logits = op.Where(allowed, logits, _f32(-_INF))
    ranked = op.Where(forced, _f32(_INF), logits)
    nforced = op.ReduceSum(op.Cast(forced, to=ir.DataType.INT64), _i64([-1]), keepdims=1)
    budget = op.Max(nforced, _i64(topk))  # [nQ, 1]
    width = op.Min(_i64([max(topk, max_forced)]), nk_blocks)  # [1]
    vals, index = op.TopK(ranked, width, axis=-1, largest=1, sorted=1)
    slot = op.Range(_i64(0), op.Squeeze(width, _i64([0])), _i64(1))  # [K]
    keep = op.And(op.Less(slot, budget), op.Greater(vals, _f32(-_INF)))
    return index, keep


def _threshold_kept(logits, forced, allowed, threshold: float, nk_blocks):
    """Bool ``[.., nQ, nK]``: forced blocks plus candidates, taken by decreasing logit while
    the estimated mass is below ``threshold`` (``selection._select_rows``)."""
    if allowed is not None:
        logits = op.Where(allowed, logits, _f32(-_INF))
    e = op.Exp(op.Sub(logits, _row_max(logits)))
    p = _safe_divide(e, op.ReduceSum(e, _i64([-1]), keepdims=1))  # 0 for empty rows
    forced_f = op.Cast(forced, to=_FLOAT)
    forced_mass = op.ReduceSum(op.Mul(p, forced_f), _i64([-1]), keepdims=1)
    cand = op.Where(forced, _f32(-_INF), logits)
    vals, order = op.TopK(cand, nk_blocks, axis=-1, largest=1, sorted=1)  # a full sort
    keep = op.Greater(vals, _f32(-_INF))
    if threshold < 1.0:
        ps = op.GatherElements(p, order, axis=-1)
        before = op.Sub(op.CumSum(ps, _i64(-1)), ps)  # as the op: inclusive sum minus self
        keep = op.And(keep, op.Less(op.Add(forced_mass, before), _f32(threshold)))
    zeros = op.Mul(vals, _f32(0.0))  # [.., nQ, nK]
    scattered = op.ScatterElements(zeros, order, op.Cast(keep, to=_FLOAT), axis=-1)
    return op.Or(op.Greater(scattered, _f32(0.5)), forced)


def _kept_slots(kept):
    """``(index, keep)`` ``[.., nQ, K]`` of a bool ``[.., nQ, nK]`` block set, ``K`` the
    largest row count (at least 1)."""
    kept_f = op.Cast(kept, to=_FLOAT)
    count = op.ReduceSum(kept_f, _i64([-1]), keepdims=0)
    width = op.Max(
        op.Reshape(op.Cast(op.ReduceMax(count, keepdims=0), to=ir.DataType.INT64), _i64([1])),
        _i64([1]),
    )
    vals, index = op.TopK(kept_f, width, axis=-1, largest=1, sorted=1)
    return index, op.Greater(vals, _f32(0.5))


def _padded_layout(n: int, m: int, block: int, causal: bool) -> BlockLayout:
    """The block layout of the translation: query rows padded in front so that padded row
    0 starts row block ``first_block`` (negative when causal queries outnumber keys; those
    blocks see nothing)."""
    offset = m - n if causal else 0
    front = offset % block
    first = (offset - front) // block
    nq = -(-(n + front) // block)
    return BlockLayout(block, offset, 0, 0, first, nq, -(-m // block))


def _static_pattern_table(
    n: int, m: int, block: int, causal: bool, pattern: str, local_blocks: int, sink_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Kept key blocks of a static pattern at static lengths: ``index [nQ, K]`` int64 and
    ``used [nQ, K]`` bool, ``K`` the largest row count."""
    layout = _padded_layout(n, m, block, causal)
    kept, _ = pattern_blocks(
        layout, causal=causal, pattern=pattern, local_blocks=local_blocks, sink_blocks=sink_blocks
    )
    kept = kept.numpy()
    width = max(1, int(kept.sum(-1).max(initial=0)))
    index = np.zeros((kept.shape[0], width), dtype=np.int64)
    used = np.zeros((kept.shape[0], width), dtype=bool)
    for row, blocks in enumerate(kept):
        cols = np.flatnonzero(blocks)
        index[row, : len(cols)] = cols
        used[row, : len(cols)] = True
    return index, used


def block_sparse_attention(
    q,
    k,
    v,
    kv_mask,
    bias,
    scale: float,
    causal: bool,
    block: int,
    topk: int | None,
    threshold: float | None,
    local_blocks: int,
    sink_blocks: int,
    pattern: str,
):
    """ONNX translation of ``attnopt::block_sparse_attention`` (same arguments).

    Queries are padded to whole row blocks (bottom-right aligned when causal) and keys to
    whole blocks; the selection gives ``K`` key blocks per query block (``index`` and a
    slot mask); each query block attends to its gathered ``K·block`` keys with the
    token-level causal and padding masks. Scores are ``[B, H, nQ, block, K·block]``.
    """
    caller = "attnopt::block_sparse_attention (ONNX)"
    _no_bias(caller, bias)
    check_block_sparse_args(caller, block, topk, threshold, local_blocks, sink_blocks, pattern)
    H, Hkv, D, Dv = _heads(caller, q, k, v)
    rep = H // Hkv
    lengths = (q.shape[2], k.shape[2])  # ints when static (read before any cast)
    static = all(isinstance(x, int) for x in lengths)
    q, dtype = _compute(q)
    k, _ = _compute(k)
    v, _ = _compute(v)

    # Geometry (int64 [1] tensors; folded to constants when the lengths are static).
    n, m = _dim(q, 2), _dim(k, 2)
    nk_blocks = op.Div(op.Add(m, _i64(block - 1)), _i64(block))
    offset = op.Sub(m, n) if causal else _i64([0])
    front = op.Mod(offset, _i64(block))  # rows padded in front: python-style mod
    first = op.Div(op.Sub(offset, front), _i64(block))  # row block of padded row 0
    nq_blocks = op.Div(op.Add(op.Add(n, front), _i64(block - 1)), _i64(block))
    zero2 = _i64([0, 0])

    def pad_seq(x, before, after):  # pad axis 2 of a 4-D tensor
        return op.Pad(x, op.Concat(zero2, before, _i64([0]), zero2, after, _i64([0]), axis=0))

    back_q = op.Sub(op.Mul(nq_blocks, _i64(block)), op.Add(n, front))
    back_k = op.Sub(op.Mul(nk_blocks, _i64(block)), m)
    qb = op.Reshape(pad_seq(q, front, back_q), _i64([0, Hkv, rep, -1, block, D]))
    kb = op.Reshape(pad_seq(k, _i64([0]), back_k), _i64([0, Hkv, -1, block, D]))
    vb = op.Reshape(pad_seq(v, _i64([0]), back_k), _i64([0, Hkv, -1, block, Dv]))

    # Key weights: 1 for real, visible keys, 0 for padding and the block pad.
    if kv_mask is not None:
        w = op.Cast(_mask5(caller, kv_mask, H, Hkv), to=_FLOAT)  # [b, hk, r, M]
        w = op.Pad(w, op.Concat(_i64([0] * 7), back_k, axis=0))
    else:
        w = op.Unsqueeze(
            op.Cast(
                op.Less(op.Range(_i64(0), op.Mul(nk_blocks, _i64(block)), _i64(1)), m), to=_FLOAT
            ),
            _i64([0, 1, 2]),
        )
    wb = op.Reshape(w, _i64([0, 0, 0, -1, block]))  # [b, hk, r, nK, block]

    nq_s = op.Squeeze(nq_blocks, _i64([0]))
    nk_s = op.Squeeze(nk_blocks, _i64([0]))
    first_s = op.Squeeze(first, _i64([0]))
    per_head = pattern == "dynamic"
    if per_head or not static:
        radial_far = _RADIAL_MAX_BLOCKS
        if static:
            lay = _padded_layout(*lengths, block, causal)
            radial_far = max(lay.num_k_blocks, lay.first_block + lay.num_q_blocks)
        forced, allowed = _block_geometry(
            nq_s,
            nk_s,
            first_s,
            causal=causal,
            pattern=pattern,
            local_blocks=local_blocks,
            sink_blocks=sink_blocks,
            radial_far=radial_far,
        )

    if per_head:
        pk, logn = _pooled_keys(kb, wb)  # [B, Hkv, 1|R, nK, D], [b, hk, r, nK]
        # Mean query per block over its real rows (pad rows are 0 and not counted).
        rows = op.Range(_i64(0), op.Mul(nq_s, _i64(block)), _i64(1))
        real = op.And(op.GreaterOrEqual(rows, front), op.Less(rows, op.Add(front, n)))
        qcount = op.ReduceSum(
            op.Reshape(op.Cast(real, to=_FLOAT), _i64([-1, block])), _i64([-1]), keepdims=1
        )  # [nQ, 1]
        pq = op.Div(op.ReduceSum(qb, _i64([4]), keepdims=0), op.Max(qcount, _f32(1.0)))
        logits = op.Mul(op.MatMul(pq, _transpose_last(pk, 5)), _f32(scale))
        logits = op.Add(logits, op.Unsqueeze(logn, _i64([3])))  # [B, Hkv, R, nQ, nK]
        if topk is not None:
            max_forced = (local_blocks if causal else 2 * local_blocks - 1) + sink_blocks
            index, keep = _topk_selection(logits, forced, allowed, topk, max_forced, nk_blocks)
        else:
            kept = _threshold_kept(logits, forced, allowed, float(threshold), nk_blocks)
            index, keep = _kept_slots(kept)
        # Per query head: gather blocks with batch dims (B, Hkv) for keys, (B, Hkv, R)
        # for the per-head weights.
        flat = op.Unsqueeze(op.Reshape(index, _i64([0, 0, -1])), _i64([-1]))  # [B,Hkv,R·nQ·K,1]
        kg = op.GatherND(kb, flat, batch_dims=2)  # [B, Hkv, R·nQ·K, block, D]
        vg = op.GatherND(vb, flat, batch_dims=2)
        shape6 = op.Concat(_i64([0, 0, rep]), nq_blocks, _i64([-1]), axis=0)
        kg = op.Reshape(kg, op.Concat(shape6, _i64([D]), axis=0))  # [B, Hkv, R, nQ, K·bl, D]
        vg = op.Reshape(vg, op.Concat(shape6, _i64([Dv]), axis=0))
        full = op.Concat(op.Shape(index, start=0, end=3), op.Shape(wb, start=3), axis=0)
        wg = op.GatherND(
            op.Expand(wb, full),
            op.Unsqueeze(op.Reshape(index, _i64([0, 0, 0, -1])), _i64([-1])),
            batch_dims=3,
        )
        wg = op.Reshape(wg, op.Concat(_i64([0, 0, 0]), nq_blocks, _i64([-1, block]), axis=0))
    else:
        if static:  # a fixed gather: the table is an initializer
            table, used = _static_pattern_table(
                *lengths, block, causal, pattern, local_blocks, sink_blocks
            )
            index = op.Constant(value=ir.tensor(table))
            keep = op.Constant(value=ir.tensor(used))
        else:
            index, keep = _kept_slots(forced)  # [nQ, K], the same for every head
        kg = op.Unsqueeze(
            op.Reshape(op.Gather(kb, index, axis=2), _i64([0, 0, 0, -1, D])), _i64([2])
        )  # [B, Hkv, 1, nQ, K·bl, D]
        vg = op.Unsqueeze(
            op.Reshape(op.Gather(vb, index, axis=2), _i64([0, 0, 0, -1, Dv])), _i64([2])
        )
        wg = op.Gather(wb, index, axis=3)  # [b, hk, r, nQ, K, block]

    # Token-level visibility of the gathered keys: kept slot, real and visible key, and
    # (causal) at or before the query's row position.
    key_ok = op.Mul(wg, op.Unsqueeze(op.Cast(keep, to=_FLOAT), _i64([-1])))  # [.., nQ, K, bl]
    key_ok = op.Greater(op.Reshape(key_ok, _i64([0, 0, 0, 0, -1])), _f32(0.5))  # [.., nQ, K·bl]
    visible = op.Unsqueeze(key_ok, _i64([-2]))  # [.., nQ, 1, K·bl]
    if causal:
        t = op.Range(_i64(0), _i64(block), _i64(1))
        kpos = op.Add(op.Unsqueeze(op.Mul(index, _i64(block)), _i64([-1])), t)  # [.., nQ, K, bl]
        kpos = op.Unsqueeze(
            op.Reshape(kpos, op.Concat(op.Shape(index, end=-1), _i64([-1]), axis=0)), _i64([-2])
        )
        qpos = op.Add(
            op.Mul(first_s, _i64(block)), op.Range(_i64(0), op.Mul(nq_s, _i64(block)), _i64(1))
        )
        qpos = op.Reshape(qpos, _i64([-1, block, 1]))  # [nQ, bl, 1]
        visible = op.And(visible, op.LessOrEqual(kpos, qpos))
    out = _attend(qb, kg, vg, visible, scale, 6)  # [B, Hkv, R, nQ, bl, Dv]
    out = op.Reshape(out, _i64([0, H, -1, Dv]))  # [B, H, nQ·bl, Dv]
    out = op.Slice(out, front, op.Add(front, n), _i64([2]))
    return _cast_back(out, dtype)


# -- agent ---------------------------------------------------------------------------------------


def _segments(length: int, parts: int) -> np.ndarray:
    """``[parts, length]`` 0/1 adaptive-average-pooling segments."""
    seg = np.zeros((parts, length), dtype=np.float32)
    for o in range(parts):
        lo, hi = (o * length) // parts, -((-(o + 1) * length) // parts)
        seg[o, lo:hi] = 1.0
    return seg


def agent_attention(q, k, v, kv_mask, bias, scale: float, num_agents: int, grid: Sequence[int]):
    """ONNX translation of ``attnopt::agent_attention`` (same arguments).

    Agents are (weighted) means of the queries over ``num_agents`` segments (a constant
    pooling matrix over a static grid, one built from ``Range`` over a dynamic sequence);
    ``V_A = softmax(A·Kᵀ·s)·V`` and ``O = softmax(Q·Aᵀ·s)·V_A`` over the visible keys and
    the agents with tokens. Cost O(N·n).
    """
    caller = "attnopt::agent_attention (ONNX)"
    _no_bias(caller, bias)
    grid = list(grid)
    check_agent_args(caller, num_agents, grid)
    H, Hkv, D, Dv = _heads(caller, q, k, v)
    rep = H // Hkv
    q, dtype = _compute(q)
    k, _ = _compute(k)
    v, _ = _compute(v)
    if grid:
        P = math.prod(grid)
        pool = np.ones((1, 1), dtype=np.float32)
        for side, length in zip(agent_grid(num_agents, len(grid)), grid):
            pool = np.kron(pool, _segments(length, side))  # row-major: new axis fastest
        pool = op.Constant(value=ir.tensor(pool.astype(np.float32)))  # [n, P]
        tokens = op.Slice(q, _i64([-P]), _i64([_END]), _i64([2]))  # [B, H, P, D]
    else:
        n = _dim(q, 2)
        o = op.Unsqueeze(op.Range(_i64(0), _i64(num_agents), _i64(1)), _i64([1]))  # [n, 1]
        i = op.Unsqueeze(op.Range(_i64(0), op.Squeeze(n, _i64([0])), _i64(1)), _i64([0]))
        lo = op.Div(op.Mul(o, n), _i64(num_agents))
        hi = op.Div(op.Add(op.Mul(op.Add(o, _i64(1)), n), _i64(num_agents - 1)), _i64(num_agents))
        pool = op.Cast(op.And(op.GreaterOrEqual(i, lo), op.Less(i, hi)), to=_FLOAT)  # [n, N]
        tokens = q
    m5 = None
    if kv_mask is None:
        total = op.ReduceSum(pool, _i64([-1]), keepdims=0)  # [n]
        summed = op.MatMul(pool, tokens)  # [B, H, n, D]
    else:
        m3, _ = _mask3(caller, kv_mask, H)
        m5 = _mask5(caller, kv_mask, H, Hkv)
        w = op.Cast(m3, to=_FLOAT)  # [b, h, N]
        if grid:
            w = op.Slice(w, _i64([-P]), _i64([_END]), _i64([2]))
        total = op.MatMul(w, op.Transpose(pool, perm=[1, 0]))  # [b, h, n]
        summed = op.MatMul(pool, op.Mul(tokens, op.Unsqueeze(w, _i64([-1]))))
    present = op.Greater(total, _f32(0.0))
    agents = _safe_divide(summed, op.Unsqueeze(total, _i64([-1])))  # [B, H, n, D]
    # Aggregation: agents (grouped by kv head) attend to the visible keys.
    a5 = op.Reshape(agents, _i64([0, Hkv, rep, num_agents, D]))
    vis = None if m5 is None else op.Unsqueeze(m5, _i64([3]))  # [b, hk, r, 1, N]
    agent_values = _attend(
        a5, op.Unsqueeze(k, _i64([2])), op.Unsqueeze(v, _i64([2])), vis, scale, 5
    )  # [B, Hkv, R, n, Dv]
    agent_values = op.Reshape(agent_values, _i64([0, H, num_agents, Dv]))
    # Broadcast: queries attend to the agents that hold tokens.
    out = _attend(q, agents, agent_values, op.Unsqueeze(present, _i64([-2])), scale, 4)
    return _cast_back(out, dtype)


SPARSE_TRANSLATIONS: dict[Any, Any] = {
    torch.ops.attnopt.block_sparse_attention.default: block_sparse_attention,
    torch.ops.attnopt.neighborhood_attention.default: neighborhood_attention,
    torch.ops.attnopt.agent_attention.default: agent_attention,
}
"""``torch.ops.attnopt.<op>.default`` → ONNX translation, for ``custom_translation_table``."""
