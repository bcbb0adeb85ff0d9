"""Sliding-window attention as Triton kernels: FlashAttention-style forward and backward.

Semantics are exactly those of
:func:`~attnopt.kernels.sliding_window.reference.sliding_window_attention_reference`
(window, sinks, dilation, causal or bidirectional, ``kv_mask`` padding, grouped-query
attention, ``M != N`` bottom-right alignment, rows with no visible key return 0).

Tiling. One program owns a tile of ``BLOCK_M`` queries of one (batch, head) and keeps
its output in registers while it streams key tiles through an online softmax, so the
``[N, M]`` scores never reach memory. Only the key tiles that can hold a visible key
are loaded: the band of the window around the query tile, plus the sink tiles.

Dilation ``d``: a query at position ``p`` only sees window keys ``j ≡ p (mod d)``. A
query tile therefore holds queries of one residue class (rows ``r, r + d, r + 2d, …``)
and its window pass loads only the keys of the matching residue class (rows
``c, c + d, …``): in those strided coordinates the problem is an undilated window, so
no key tile is loaded whose keys the tile cannot see (an undilated kernel would read
``d`` times the keys and discard all but one in ``d``).

Sinks: keys ``j < sinks`` are scored in their own pass over contiguous key rows; the
window pass hides them, so no key is counted twice.

The forward saves the log-sum-exp (base 2, ``+inf`` for empty rows) for the backward,
which recomputes the weights tile by tile: one kernel gives ``dK, dV`` per key tile
(looping over the queries that see it and, for grouped-query attention, over the
query heads sharing the key head, so ``dK``/``dV`` need no atomics and K/V are never
repeated), another gives ``dQ`` per query tile (the forward's loop order).

Kernel → launcher (checks, allocation, launch with keyword arguments). Launchers pick
block sizes from the head dim and the device (``triton.autotune`` does not run under
the interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels._triton import interpreting, triton_runs_on

__all__ = [
    "MAX_HEAD_DIM",
    "sliding_window_backward_triton",
    "sliding_window_forward_triton",
    "triton_supports",
]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _dim_ok(offs, dim, EVEN: tl.constexpr):
    """Which head-dim lanes are real. When the head dim fills its power-of-two tile the
    mask is a constant, so row loads stay vectorised (a runtime lane mask would make
    every element its own masked load, and every pointer its own register)."""
    return tl.full(offs.shape, 1, tl.int1) if EVEN else offs < dim


@triton.jit
def _visible(p, j, key_ok, span, sinks, SINK_PASS: tl.constexpr, CAUSAL: tl.constexpr):
    """Which (query position ``p``, key ``j``) pairs of a tile are seen. ``p`` and ``j``
    come pre-broadcast to the tile's orientation. Dilation is implied: the window pass
    only ever pairs queries and keys of matching residue classes."""
    delta = p - j
    if SINK_PASS:
        vis = j < sinks
        if CAUSAL:
            vis = vis & (delta >= 0)
    else:
        vis = j >= sinks
        if CAUSAL:
            vis = vis & (delta >= 0) & (delta < span)
        else:
            vis = vis & (delta < span) & (delta > -span)
    return vis & key_ok


@triton.jit
def _fwd_pass(
    acc,
    m_i,
    l_i,
    q,
    p,
    k_ptr,
    v_ptr,
    km_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    key_start,
    key_step,
    s_lo,
    s_hi,
    M,
    span,
    sinks,
    qk_scale,
    offs_d,
    offs_dv,
    d_ok,
    dv_ok,
    SINK_PASS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online softmax over key rows ``key_start + key_step * s`` for ``s`` in
    ``[s_lo, s_hi)``; scores are in base 2 (``qk_scale`` includes ``log2(e)``)."""
    for s0 in range(s_lo, s_hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        j = key_start + key_step * s
        key_ok = (s < s_hi) & (j < M)
        k = tl.load(
            k_ptr + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        vis = _visible(p[:, None], j[None, :], key_ok[None, :], span, sinks, SINK_PASS, CAUSAL)
        if HAS_MASK:
            km = tl.load(km_ptr + j * stride_mm, mask=key_ok, other=0)
            vis = vis & (km != 0)[None, :]
        scores = tl.where(vis, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no key yet has max -inf; subtracting 0 keeps its weights 0
        # instead of NaN (exp2(-inf - -inf)).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(
            v_ptr + j[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=key_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _pmod(a, d):
    """``a mod d`` in ``[0, d)`` for negative ``a`` too (Triton's ``%`` truncates)."""
    return ((a % d) + d) % d


@triton.jit
def _query_tile(pid0, N, M, window, sinks, dilation, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The queries of program ``pid0`` (rows ``r + d * t`` of one residue class ``r``), the
    residue class ``c`` of the keys their window sees, and the window's key range
    ``[s_lo, s_hi)`` in that class's strided coordinates (sinks excluded)."""
    r = pid0 % dilation
    t0 = (pid0 // dilation) * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M)
    i = r + dilation * t
    row_ok = i < N
    off = M - N
    p = i + off
    c = _pmod(r + off, dilation)
    e = (r + off - c) // dilation  # exact: query row t sits at key row t + e of class c
    n_r = (N - r + dilation - 1) // dilation
    t_last = tl.minimum(t0 + BLOCK_M, n_r) - 1
    s_lo = t0 + e - window + 1
    s_hi = t_last + e + 1 if CAUSAL else t_last + e + window
    s_lo = tl.maximum(s_lo, (tl.maximum(sinks - c, 0) + dilation - 1) // dilation)
    s_hi = tl.minimum(s_hi, tl.maximum((M - c + dilation - 1) // dilation, 0))
    # Sink keys: contiguous rows [0, sinks); causal queries see only those at or before
    # the tile's last position.
    sink_hi = tl.minimum(sinks, M)
    if CAUSAL:
        sink_hi = tl.minimum(sink_hi, tl.maximum(r + dilation * t_last + off + 1, 0))
    return i, row_ok, p, c, s_lo, s_hi, sink_hi


@triton.jit
def _sliding_window_fwd_kernel(
    Q,
    K,
    V,
    KVM,
    Out,
    LSE,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    group,
    N,
    M,
    D,
    DV,
    qk_scale,
    window,
    sinks,
    dilation,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h can pass 2**31
    b = tl.program_id(2).to(tl.int64)
    hk = h // group
    H = tl.num_programs(1)
    i, row_ok, p, c, s_lo, s_hi, sink_hi = _query_tile(
        tl.program_id(0), N, M, window, sinks, dilation, BLOCK_M, CAUSAL
    )
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_ok(offs_d, D, EVEN_D)
    dv_ok = _dim_ok(offs_dv, DV, EVEN_DV)
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + hk * stride_kh
    v_ptr = V + b * stride_vb + hk * stride_vh
    km_ptr = KVM + b * stride_mb + h * stride_mh
    # The query tile is read once and stays in registers for the whole key loop.
    q = tl.load(
        q_ptr + i[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    span = window * dilation
    acc, m_i, l_i = _fwd_pass(
        acc, m_i, l_i, q, p, k_ptr, v_ptr, km_ptr,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        0, 1, 0, sink_hi, M, span, sinks, qk_scale, offs_d, offs_dv, d_ok, dv_ok,
        True, CAUSAL, HAS_MASK, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_pass(
        acc, m_i, l_i, q, p, k_ptr, v_ptr, km_ptr,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        c, dilation, s_lo, s_hi, M, span, sinks, qk_scale, offs_d, offs_dv, d_ok, dv_ok,
        False, CAUSAL, HAS_MASK, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = Out + b * stride_ob + h * stride_oh
    tl.store(
        o_ptr + i[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    # +inf for empty rows makes every recomputed weight exp2(s - lse) exactly 0.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (b * H + h) * N + i, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    Out,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    N,
    DV,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_DV: tl.constexpr,
):
    """``delta = rowsum(dO ∘ O)`` in fp32, the softmax-gradient term of every row: one
    read of O and dO instead of one per key tile in the backward loops."""
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h can pass 2**31
    b = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(1)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_DV)
    mask = (i < N)[:, None] & _dim_ok(offs, DV, EVEN_DV)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + i[:, None] * stride_on + offs[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + i[:, None] * stride_gn + offs[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * N + i, delta, mask=i < N)


@triton.jit
def _dq_pass(
    dq,
    q,
    do,
    lse,
    delta,
    p,
    k_ptr,
    v_ptr,
    km_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    key_start,
    key_step,
    s_lo,
    s_hi,
    M,
    span,
    sinks,
    qk_scale,
    offs_d,
    offs_dv,
    d_ok,
    dv_ok,
    SINK_PASS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """``dQ += dS · K`` over the key rows of one pass (the forward's loop), with
    ``dS = P ∘ (dO·Vᵀ − delta)`` and ``P`` recomputed from the saved log-sum-exp."""
    for s0 in range(s_lo, s_hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        j = key_start + key_step * s
        key_ok = (s < s_hi) & (j < M)
        k = tl.load(
            k_ptr + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_ptr + j[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=key_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        vis = _visible(p[:, None], j[None, :], key_ok[None, :], span, sinks, SINK_PASS, CAUSAL)
        if HAS_MASK:
            km = tl.load(km_ptr + j * stride_mm, mask=key_ok, other=0)
            vis = vis & (km != 0)[None, :]
        pr = tl.where(vis, tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        ds = pr * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _sliding_window_bwd_dq_kernel(
    Q,
    K,
    V,
    KVM,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    group,
    N,
    M,
    D,
    DV,
    scale,
    qk_scale,
    window,
    sinks,
    dilation,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h can pass 2**31
    b = tl.program_id(2).to(tl.int64)
    hk = h // group
    H = tl.num_programs(1)
    i, row_ok, p, c, s_lo, s_hi, sink_hi = _query_tile(
        tl.program_id(0), N, M, window, sinks, dilation, BLOCK_M, CAUSAL
    )
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_ok(offs_d, D, EVEN_D)
    dv_ok = _dim_ok(offs_dv, DV, EVEN_DV)
    k_ptr = K + b * stride_kb + hk * stride_kh
    v_ptr = V + b * stride_vb + hk * stride_vh
    km_ptr = KVM + b * stride_mb + h * stride_mh
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + i[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + i[:, None] * stride_gn + offs_dv[None, :] * stride_gd,
        mask=row_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_DV]
    lse = tl.load(LSE + (b * H + h) * N + i, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * N + i, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    span = window * dilation
    dq = _dq_pass(
        dq, q, do, lse, delta, p, k_ptr, v_ptr, km_ptr,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        0, 1, 0, sink_hi, M, span, sinks, qk_scale, offs_d, offs_dv, d_ok, dv_ok,
        True, CAUSAL, HAS_MASK, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dq = _dq_pass(
        dq, q, do, lse, delta, p, k_ptr, v_ptr, km_ptr,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        c, dilation, s_lo, s_hi, M, span, sinks, qk_scale, offs_d, offs_dv, d_ok, dv_ok,
        False, CAUSAL, HAS_MASK, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    tl.store(
        DQ
        + b * stride_dqb
        + h * stride_dqh
        + i[:, None] * stride_dqn
        + offs_d[None, :] * stride_dqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _sliding_window_bwd_dkdv_kernel(
    Q,
    K,
    V,
    KVM,
    DO,
    LSE,
    DELTA,
    DK,
    DV_OUT,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    H,
    group,
    N,
    M,
    D,
    DV,
    scale,
    qk_scale,
    window,
    sinks,
    dilation,
    sink_programs,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """``dK``, ``dV`` of one key tile. The first ``sink_programs`` programs own the sink
    keys (contiguous rows, seen by every query); the rest own window keys of one residue
    class (sinks hidden) and loop only over the query rows whose window reaches them."""
    pid0 = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    off = M - N
    span = window * dilation
    # Scalar selects rather than a branch: both kinds of program share one loop.
    sink_pass = pid0 < sink_programs
    w = tl.maximum(pid0 - sink_programs, 0)
    c = w % dilation
    r = _pmod(c - off, dilation)  # the query residue class whose window holds class c
    e = (r + off - c) // dilation  # query row t of class r sits at key row t + e of class c
    sw = (w // dilation) * BLOCK_N
    t_lo_w = sw - e if CAUSAL else sw - e - window + 1
    t_hi_w = tl.minimum(sw + BLOCK_N - e + window - 1, (N - r + dilation - 1) // dilation)
    s0 = tl.where(sink_pass, pid0 * BLOCK_N, sw)
    key_start = tl.where(sink_pass, 0, c)
    key_step = tl.where(sink_pass, 1, dilation)
    q_start = tl.where(sink_pass, 0, r)
    q_step = tl.where(sink_pass, 1, dilation)
    # Causal: queries before the tile's first key see none of it.
    t_lo_s = tl.maximum(s0 - off, 0) if CAUSAL else 0
    t_lo = tl.maximum(tl.where(sink_pass, t_lo_s, t_lo_w), 0)
    t_hi = tl.where(sink_pass, N, t_hi_w)
    s = s0 + tl.arange(0, BLOCK_N)
    j = key_start + key_step * s
    key_ok = (j < M) & tl.where(sink_pass, j < sinks, j >= sinks)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_ok(offs_d, D, EVEN_D)
    dv_ok = _dim_ok(offs_dv, DV, EVEN_DV)
    # The key tile is read once and stays in registers for every query head of the group.
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=key_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + j[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=key_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )  # [BLOCK_N, BLOCK_DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_gb + h * stride_gh
        row_ptr = (b * H + h) * N
        key_vis = key_ok
        if HAS_MASK:
            km = tl.load(KVM + b * stride_mb + h * stride_mh + j * stride_mm, mask=key_ok, other=0)
            key_vis = key_vis & (km != 0)
        for t0 in range(t_lo, t_hi, BLOCK_M):
            t = t0 + tl.arange(0, BLOCK_M)
            i = q_start + q_step * t
            row_ok = (t < t_hi) & (i < N)
            q = tl.load(
                q_ptr + i[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_D]
            do = tl.load(
                do_ptr + i[:, None] * stride_gn + offs_dv[None, :] * stride_gd,
                mask=row_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_DV]
            lse = tl.load(LSE + row_ptr + i, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + row_ptr + i, mask=row_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M] so dV and dK come out of plain dots.
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
            p_row = (i + off)[None, :]
            vis = tl.where(
                sink_pass,
                _visible(p_row, j[:, None], key_vis[:, None], span, sinks, True, CAUSAL),
                _visible(p_row, j[:, None], key_vis[:, None], span, sinks, False, CAUSAL),
            )
            vis = vis & row_ok[None, :]
            p_t = tl.where(vis, tl.exp2(qk_t * qk_scale - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(
        DK
        + b * stride_dkb
        + hk * stride_dkh
        + j[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=key_ok[:, None] & d_ok[None, :],
    )
    tl.store(
        DV_OUT
        + b * stride_dvb
        + hk * stride_dvh
        + j[:, None] * stride_dvn
        + offs_dv[None, :] * stride_dvd,
        dv.to(DV_OUT.dtype.element_ty),
        mask=key_ok[:, None] & dv_ok[None, :],
    )


# -- launchers ----------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """``None`` when the Triton kernels take these inputs, else a one-line reason."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16, float32)"
    if not (0 < q.shape[-1] <= MAX_HEAD_DIM and 0 < v.shape[-1] <= MAX_HEAD_DIM):
        return (
            f"head dims D={q.shape[-1]}, Dv={v.shape[-1]} (the Triton kernels take 1 to "
            f"{MAX_HEAD_DIM})"
        )
    if not triton_runs_on(q.device):
        return f"device {q.device} (Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
    return None


def _check(caller, q, k, v, kv_mask, window, sinks, dilation):
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_window_args(caller, window, sinks, dilation)
    if q.dtype not in _DTYPES:
        raise ValueError(f"{caller}: q must be float16, bfloat16 or float32, got dtype {q.dtype}")
    for name, dim in (("q/k head dim D", shapes.head_dim), ("v head dim Dv", shapes.value_dim)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{caller}: {name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: q must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), "
            f"got device {q.device}"
        )
    return shapes


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # Rows are read as contiguous head-dim vectors; any other last-dim stride would turn
    # each row load into a gather, so such inputs are copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_arg(kv_mask, B, H, M, device):
    """The mask as a [B, H, M] uint8 view (broadcast dims get stride 0, nothing is copied)
    and its strides, or a dummy pointer when there is no mask."""
    if kv_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), (0, 0, 0)
    m = kv_mask.expand(B, H, M).view(torch.uint8)
    return m, m.stride()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dot products (no TF32), so fp32 results stay fp32-accurate.
    return "ieee" if dtype == torch.float32 else "tf32"


# fp32 inputs take IEEE fp32 dots (no tensor cores): small tiles, one stage, so the
# operand tiles fit in shared memory on every GPU (fp32 is the accuracy path, not the fast
# one).
_FP32_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


# fp16/bf16 launch settings per head-dim bucket, chosen so the sm_90 build keeps every
# accumulator in registers without spilling (checked with cuobjdump's resource usage of
# bf16 builds compiled ahead of time; not yet timed on a GPU).
def _fwd_config(head_dim: int, rows: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch settings of the forward kernel."""
    if interpreting():
        return dict(BLOCK_M=min(32, _pow2(rows)), BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(_FP32_CONFIG)
    if head_dim <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], _pow2(rows))
    return cfg


def _bwd_configs(head_dim: int, rows: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Launch settings of the dQ kernel (a query tile in registers, key tiles streamed)
    and of the dK/dV kernel (a key tile and two accumulators in registers, query tiles
    streamed)."""
    if interpreting():
        cfg = dict(BLOCK_M=min(32, _pow2(rows)), BLOCK_N=32, num_warps=4, num_stages=1)
        return cfg, dict(cfg)
    if dtype == torch.float32:
        return dict(_FP32_CONFIG), dict(_FP32_CONFIG)
    if head_dim <= 64:
        dq = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
        dkdv = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)
    elif head_dim <= 128:
        dq = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
        dkdv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    else:
        dq = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
        dkdv = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
    dq["BLOCK_M"] = min(dq["BLOCK_M"], _pow2(rows))
    return dq, dkdv


def _override(config: dict, block_m: int | None, block_n: int | None, caller: str) -> dict:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{caller}: {name} must be a power of two >= 16, got {value!r}")
    if block_m is not None:
        config["BLOCK_M"] = block_m
    if block_n is not None:
        config["BLOCK_N"] = block_n
    return config


def sliding_window_forward_triton(
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
    block_m: int | None = None,
    block_n: int | None = None,
    debug_nan: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention forward on Triton; returns ``(out, lse)``.

    Same semantics as
    :func:`~attnopt.kernels.sliding_window.reference.sliding_window_attention_reference`.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``;
            float16, bfloat16 or float32, head dims up to 256 (any size: padded with a
            mask to a power of two), on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        window, sinks, dilation, causal: as in the reference.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        block_m, block_n: override the query / key tile sizes (powers of two >= 16).
        debug_nan: fill the output with NaN before the launch (tests: an element the
            kernel fails to write stays NaN).

    Returns:
        ``out [B, H, N, Dv]`` in ``q.dtype`` (rows with no visible key are 0) and
        ``lse [B, H, N]`` float32, the base-2 log-sum-exp of each row's scaled scores
        (``+inf`` for empty rows), which the backward takes.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 100, 64, device="cuda") for _ in range(3))
        >>> out, lse = sliding_window_forward_triton(q, k, v, window=16, causal=True)
    """
    caller = "sliding_window_forward_triton"
    sh = _check(caller, q, k, v, kv_mask, window, sinks, dilation)
    B, H, N, D, M, DV = sh.batch, sh.heads, sh.q_len, sh.head_dim, sh.kv_len, sh.value_dim
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    fill = float("nan") if debug_nan else 0.0
    out = torch.full((B, H, N, DV), fill, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, N), fill, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if DV == 0:
        # Nothing to write but the log-sum-exp; a zero-width tile cannot be launched.
        raise ValueError(f"{caller}: v head dim Dv must be positive, got v {tuple(v.shape)}")
    mask, (smb, smh, smm) = _mask_arg(kv_mask, B, H, M, q.device)
    rows = triton.cdiv(N, dilation)
    cfg = _override(_fwd_config(max(D, DV), rows, q.dtype), block_m, block_n, caller)
    grid = (dilation * triton.cdiv(rows, cfg["BLOCK_M"]), H, B)
    _sliding_window_fwd_kernel[grid](
        Q=q, K=k, V=v, KVM=mask, Out=out, LSE=lse,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_mb=smb, stride_mh=smh, stride_mm=smm,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_od=out.stride(3),
        group=H // sh.kv_heads, N=N, M=M, D=D, DV=DV, qk_scale=scale * _LOG2E,
        window=window, sinks=sinks, dilation=dilation,
        CAUSAL=bool(causal), HAS_MASK=kv_mask is not None,
        BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), EVEN_D=_pow2(D) == D, EVEN_DV=_pow2(DV) == DV,
        DOT_PREC=_dot_precision(q.dtype),
        **cfg,
    )  # fmt: skip
    return out, lse


def sliding_window_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    window: int,
    sinks: int = 0,
    dilation: int = 1,
    scale: float | None = None,
    causal: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    debug_nan: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sliding_window_forward_triton` for ``q``, ``k`` and ``v``.

    Args:
        grad_out: ``[B, H, N, Dv]``, the gradient of ``out``.
        q, k, v, kv_mask, window, sinks, dilation, scale, causal: as in the forward.
        out, lse: the forward's two results.
        block_m, block_n: override the query / key tile sizes (powers of two >= 16).
        debug_nan: fill the gradients with NaN before the launch.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    caller = "sliding_window_backward_triton"
    sh = _check(caller, q, k, v, kv_mask, window, sinks, dilation)
    B, H, N, D, M, DV = sh.batch, sh.heads, sh.q_len, sh.head_dim, sh.kv_len, sh.value_dim
    Hkv = sh.kv_heads
    for name, t, shape, dtype in (
        ("grad_out", grad_out, (B, H, N, DV), q.dtype),
        ("out", out, (B, H, N, DV), q.dtype),
        ("lse", lse, (B, H, N), torch.float32),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{caller}: {name} must have shape {list(shape)}, got {got}")
        if t.dtype != dtype or t.device != q.device:
            raise ValueError(
                f"{caller}: {name} must be {dtype} on {q.device}, got {t.dtype} on {t.device}"
            )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    grad_out, out, lse = _row_major(grad_out), _row_major(out), lse.contiguous()
    fill = float("nan") if debug_nan else 0.0
    dq = torch.full(q.shape, fill, dtype=q.dtype, device=q.device)
    dk = torch.full(k.shape, fill, dtype=k.dtype, device=q.device)
    dv = torch.full(v.shape, fill, dtype=v.dtype, device=q.device)
    if N == 0 or M == 0 or B == 0 or H == 0 or D == 0 or DV == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask, (smb, smh, smm) = _mask_arg(kv_mask, B, H, M, q.device)
    common = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_mb=smb, stride_mh=smh, stride_mm=smm,
        stride_gb=grad_out.stride(0), stride_gh=grad_out.stride(1),
        stride_gn=grad_out.stride(2), stride_gd=grad_out.stride(3),
        group=H // Hkv, N=N, M=M, D=D, DV=DV, scale=scale, qk_scale=scale * _LOG2E,
        window=window, sinks=sinks, dilation=dilation,
        CAUSAL=bool(causal), HAS_MASK=kv_mask is not None,
        BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), EVEN_D=_pow2(D) == D, EVEN_DV=_pow2(DV) == DV,
        DOT_PREC=_dot_precision(q.dtype),
    )  # fmt: skip

    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_rows = 64 if DV <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(N, block_rows), H, B)](
        Out=out, DO=grad_out, DELTA=delta,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_od=out.stride(3),
        stride_gb=grad_out.stride(0), stride_gh=grad_out.stride(1),
        stride_gn=grad_out.stride(2), stride_gd=grad_out.stride(3),
        N=N, DV=DV, BLOCK_M=block_rows, BLOCK_DV=_pow2(DV), EVEN_DV=_pow2(DV) == DV,
    )  # fmt: skip

    rows = triton.cdiv(N, dilation)
    dq_cfg, dkdv_cfg = _bwd_configs(max(D, DV), rows, q.dtype)
    cfg = _override(dq_cfg, block_m, block_n, caller)
    _sliding_window_bwd_dq_kernel[(dilation * triton.cdiv(rows, cfg["BLOCK_M"]), H, B)](
        Q=q, K=k, V=v, KVM=mask, DO=grad_out, LSE=lse, DELTA=delta, DQ=dq,
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqn=dq.stride(2),
        stride_dqd=dq.stride(3),
        **common, **cfg,
    )  # fmt: skip

    # Sink key tiles come first in the grid: each loops over every query, so starting them
    # early keeps them off the tail of the launch.
    cfg = _override(dkdv_cfg, block_m, block_n, caller)
    sink_programs = triton.cdiv(min(sinks, M), cfg["BLOCK_N"])
    window_programs = dilation * triton.cdiv(triton.cdiv(M, dilation), cfg["BLOCK_N"])
    _sliding_window_bwd_dkdv_kernel[(sink_programs + window_programs, Hkv, B)](
        Q=q, K=k, V=v, KVM=mask, DO=grad_out, LSE=lse, DELTA=delta, DK=dk, DV_OUT=dv,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2),
        stride_dkd=dk.stride(3),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2),
        stride_dvd=dv.stride(3),
        H=H, sink_programs=sink_programs,
        **common, **cfg,
    )  # fmt: skip
    return dq, dk, dv
