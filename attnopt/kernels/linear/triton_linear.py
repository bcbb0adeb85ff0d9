"""Linear attention in Triton: causal chunked (Lightning Attention-2) and bidirectional,
forward and backward, with the elementwise feature maps fused into the kernels.

Semantics are those of
:func:`~attnopt.kernels.linear.reference.linear_attention_reference`: query ``i`` sits
at key position ``p = i + M − N`` and outputs ``Σ_j a_ij v_j / (Σ_j a_ij + eps)`` with
``a_ij = φ(q_i)·φ(k_j)·λ^(p−j)`` over the keys it sees (causal: ``j <= p``; padding keys
never, decay counting positions, padding included).

Every program owns one query head ``(b, h)`` and walks the sequence once, so a query
head's whole state stays in registers; grouped-query heads read the kv head ``h // R``
(K/V are never repeated) and a per-head ``kv_mask`` needs no special case. Their key
gradients are written per query head and summed over the group afterwards.

Causal forward, per chunk of ``C`` positions ``[P, P + C)`` (queries and keys of one
chunk share positions because both are bottom-right aligned)::

    A      = (φQ φKᵀ) ⊙ W                   W[r, s] = λ^(r−s) for s <= r, else 0
    out    = (A V + λ^(r+1) φQ S) / (rowsum A + λ^(r+1) φQ·z + eps)
    S, z  <- λ^C S + (λ^(C−1−s) φK)ᵀ V,  λ^C z + Σ_s λ^(C−1−s) φK

Keys before the first query's position (``M > N``) are folded into ``S, z`` first, in
blocks that end exactly at it. The backward uses ``g_i = dO_i / den_i`` and
``c_i = −(dO_i·o_i) / den_i`` (the gradient of ``a_ij`` is ``g_i·v_j + c_i``):

* ``dφq`` runs forward in time like the forward, with ``S`` and ``z`` again;
* ``dφk`` and ``dv`` run backward in time with the reverse states
  ``U = Σ_i λ^(p_i−P) φq_i gᵢᵀ`` and ``u = Σ_i λ^(p_i−P) c_i φq_i``.

Three backward kernels (dq, dk, dv) each keep one state and split the feature or the
value axis over programs, so no program holds a ``[F, Dv]`` state plus its transpose.

Bidirectional attention is the same kernels with the whole key sequence folded into
the state first (no intra-chunk part; no decay, which is causal only).

Feature maps: ``elu`` (``elu + 1``) and ``relu`` are applied to the loaded tiles (and
their derivatives in the backward); ``softmax_rf`` and ``hedgehog`` mix the head dim,
so they are computed in PyTorch first (``apply_feature_map``, fp32) and the kernels run
on the features, autograd carrying the gradient back through the map.

Numerics: tiles are loaded and accumulated in fp32 with IEEE fp32 dot products, so
fp16/bf16 inputs are computed in fp32 and rounded once, as on CPU. Every decay factor
is a power of ``λ <= 1`` with a non-negative exponent, so nothing overflows.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import triton_runs_on
from attnopt.kernels.dense.reference import compute_dtype
from attnopt.kernels.linear.feature_maps import apply_feature_map, check_feature_tensors
from attnopt.kernels.linear.reference import check_linear_args, decay_per_head

__all__ = [
    "MAX_TRITON_DIM",
    "linear_attention_triton",
    "linear_backward_triton",
    "linear_forward_triton",
    "triton_supports",
]

# Feature and value dims a program holds whole (its state tile is [F, BV] or [BK, Dv]);
# larger dims would spill registers, and the op falls back to the PyTorch path.
MAX_TRITON_DIM = 256
# Positions per chunk of the causal kernels at most: the intra-chunk scores are a
# [C, C] register tile.
MAX_CHUNK = 128
# Elementwise feature maps fused into the kernels (0: the inputs are already features).
_FMAP = {"elu": 1, "relu": 2}


def _alloc(shape, *, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (the tests fill it with NaN to catch an
    element a kernel never writes)."""
    return torch.empty(shape, dtype=dtype, device=device)


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _tile(base, rows, row_ok, cols, col_ok, s_row, s_col):
    """``[rows, cols]`` tile in fp32, 0 outside the masks."""
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _phi(x, ok, FMAP: tl.constexpr):
    """Feature map of a loaded tile; 0 outside ``ok`` (elu+1 of a padded 0 would be 1)."""
    if FMAP == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FMAP == 2:
        x = tl.maximum(x, 0.0)
    return tl.where(ok, x, 0.0)


@triton.jit
def _dphi(x, FMAP: tl.constexpr):
    """dφ/dx of the fused map (as torch's elu and relu backward define it at 0)."""
    if FMAP == 1:
        d = tl.where(x > 0, 1.0, tl.exp(x))
    elif FMAP == 2:
        d = tl.where(x > 0, 1.0, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _keys_ok(MASK, b, h, j, ok, smb, smh, smn, HAS_MASK: tl.constexpr):
    """Keys at positions ``j`` that exist (``ok``) and are not padding."""
    if HAS_MASK:
        keep = tl.load(MASK + b * smb + h * smh + j * smn, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _log_decay(LOGD, h, HAS_DECAY: tl.constexpr):
    if HAS_DECAY:  # noqa: SIM108 (a constexpr if-block compiles one branch only)
        ld = tl.load(LOGD + h).to(tl.float32)
    else:
        ld = 0.0
    return ld


@triton.jit
def _pre_blocks(M, N, CAUSAL: tl.constexpr, BC: tl.constexpr):
    """``(count, first position)`` of the state-only blocks of ``BC`` keys: causal, the
    keys before the first query's position, in blocks ending exactly at it;
    bidirectional, every key."""
    if CAUSAL:
        off = M - N
        count = tl.cdiv(tl.maximum(off, 0), BC)
        first = off - count * BC
    else:
        count = tl.cdiv(M, BC)
        first = M * 0
    return count, first


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, DEN, MASK, LOGD,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, son, sod, smb, smh, smn,
    H, R, N, M, F, DV, CHUNK, eps,
    CAUSAL: tl.constexpr, FMAP: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr, WRITE_DEN: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Output columns ``[pid_v·BV, +BV)`` of query head ``bh``; ``DEN`` gets the
    normaliser (``+ eps``) when asked."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    o_base = Out + b * sob + h * soh
    rc = tl.arange(0, BC)
    fc = tl.arange(0, BF)
    vc = pid_v * BV + tl.arange(0, BV)
    f_ok = fc < F
    v_ok = vc < DV
    ld = _log_decay(LOGD, h, HAS_DECAY)
    off = M - N

    S = tl.zeros([BF, BV], dtype=tl.float32)  # Σ λ^(t−1−j) φ(k_j) v_jᵀ
    z = tl.zeros([BF], dtype=tl.float32)  # Σ λ^(t−1−j) φ(k_j)
    n_pre, pre0 = _pre_blocks(M, N, CAUSAL, BC)
    pre_kw = tl.exp(ld * (BC - 1 - rc).to(tl.float32))
    pre_cw = tl.exp(ld * BC)
    for t in range(n_pre):
        j = pre0 + t * BC + rc
        ok = _keys_ok(MASK, b, h, j, (j >= 0) & (j < M), smb, smh, smn, HAS_MASK)
        kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
        vv = _tile(v_base, j, ok, vc, v_ok, svn, svd)
        kw = kf * pre_kw[:, None]
        S = S * pre_cw + tl.dot(tl.trans(kw), vv, input_precision="ieee")
        z = z * pre_cw + tl.sum(kw, 0)

    r_ok = rc < CHUNK
    q_w = tl.exp(ld * (rc + 1).to(tl.float32))  # λ^(r+1): the state is one step behind
    k_w = tl.exp(ld * tl.maximum(CHUNK - 1 - rc, 0).to(tl.float32))
    c_w = tl.exp(ld * CHUNK)
    diff = rc[:, None] - rc[None, :]
    intra = tl.where(
        (diff >= 0) & r_ok[None, :], tl.exp(ld * tl.maximum(diff, 0).to(tl.float32)), 0.0
    )
    for t in range(tl.cdiv(N, CHUNK)):
        i = t * CHUNK + rc
        i_ok = r_ok & (i < N)
        qf = _phi(_tile(q_base, i, i_ok, fc, f_ok, sqn, sqd), i_ok[:, None] & f_ok[None, :], FMAP)
        if CAUSAL:
            j = off + i
            ok = _keys_ok(MASK, b, h, j, r_ok & (j >= 0) & (j < M), smb, smh, smn, HAS_MASK)
            kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
            vv = _tile(v_base, j, ok, vc, v_ok, svn, svd)
            a = tl.dot(qf, tl.trans(kf), input_precision="ieee") * intra  # [C, C]
            num = tl.dot(a, vv, input_precision="ieee")
            num += tl.dot(qf, S, input_precision="ieee") * q_w[:, None]
            den = tl.sum(a, 1) + tl.sum(qf * z[None, :], 1) * q_w + eps
            kw = kf * k_w[:, None]
            S = S * c_w + tl.dot(tl.trans(kw), vv, input_precision="ieee")
            z = z * c_w + tl.sum(kw, 0)
        else:
            num = tl.dot(qf, S, input_precision="ieee")
            den = tl.sum(qf * z[None, :], 1) + eps
        out = num / den[:, None]
        o_ptrs = o_base + i[:, None] * son + vc[None, :] * sod
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=i_ok[:, None] & v_ok[None, :])
        if WRITE_DEN:
            tl.store(DEN + bh * N + i, den, mask=i_ok & (pid_v == 0))


@triton.jit
def _dq_kernel(
    Q, K, V, G, C, DQ, MASK, LOGD,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smn,
    H, R, N, M, F, DV, CHUNK,
    CAUSAL: tl.constexpr, FMAP: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """``dq`` columns ``[pid_f·BK, +BK)`` of query head ``bh`` (``G [B, H, N, Dv]`` and
    ``C [B, H, N]`` contiguous fp32; ``DQ [B, H, N, F]`` contiguous fp32)."""
    pid_f = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    g_base = G + bh * N * DV
    rc = tl.arange(0, BC)
    fc = pid_f * BK + tl.arange(0, BK)
    ec = tl.arange(0, BE)
    f_ok = fc < F
    e_ok = ec < DV
    ld = _log_decay(LOGD, h, HAS_DECAY)
    off = M - N

    S = tl.zeros([BK, BE], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    n_pre, pre0 = _pre_blocks(M, N, CAUSAL, BC)
    pre_kw = tl.exp(ld * (BC - 1 - rc).to(tl.float32))
    pre_cw = tl.exp(ld * BC)
    for t in range(n_pre):
        j = pre0 + t * BC + rc
        ok = _keys_ok(MASK, b, h, j, (j >= 0) & (j < M), smb, smh, smn, HAS_MASK)
        kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
        vv = _tile(v_base, j, ok, ec, e_ok, svn, svd)
        kw = kf * pre_kw[:, None]
        S = S * pre_cw + tl.dot(tl.trans(kw), vv, input_precision="ieee")
        z = z * pre_cw + tl.sum(kw, 0)

    r_ok = rc < CHUNK
    q_w = tl.exp(ld * (rc + 1).to(tl.float32))
    k_w = tl.exp(ld * tl.maximum(CHUNK - 1 - rc, 0).to(tl.float32))
    c_w = tl.exp(ld * CHUNK)
    diff = rc[:, None] - rc[None, :]
    intra = tl.where(
        (diff >= 0) & r_ok[None, :], tl.exp(ld * tl.maximum(diff, 0).to(tl.float32)), 0.0
    )
    for t in range(tl.cdiv(N, CHUNK)):
        i = t * CHUNK + rc
        i_ok = r_ok & (i < N)
        qx = _tile(q_base, i, i_ok, fc, f_ok, sqn, sqd)
        g = _tile(g_base, i, i_ok, ec, e_ok, DV, 1)
        c = tl.load(C + bh * N + i, mask=i_ok, other=0.0)
        # dφq_i = λ^(r+1) (S gᵢ + c_i z) + Σ_s W[r, s] (g_i·v_s + c_i) φk_s
        dqf = (tl.dot(g, tl.trans(S), input_precision="ieee") + c[:, None] * z[None, :]) * q_w[
            :, None
        ]
        if CAUSAL:
            j = off + i
            ok = _keys_ok(MASK, b, h, j, r_ok & (j >= 0) & (j < M), smb, smh, smn, HAS_MASK)
            kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
            vv = _tile(v_base, j, ok, ec, e_ok, svn, svd)
            da = (tl.dot(g, tl.trans(vv), input_precision="ieee") + c[:, None]) * intra
            dqf += tl.dot(da, kf, input_precision="ieee")
            kw = kf * k_w[:, None]
            S = S * c_w + tl.dot(tl.trans(kw), vv, input_precision="ieee")
            z = z * c_w + tl.sum(kw, 0)
        dq = dqf * _dphi(qx, FMAP)
        tl.store(
            DQ + bh * N * F + i[:, None] * F + fc[None, :], dq, mask=i_ok[:, None] & f_ok[None, :]
        )


@triton.jit
def _dk_kernel(
    Q, K, V, G, C, DK, MASK, LOGD,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smn,
    H, R, N, M, F, DV, CHUNK,
    CAUSAL: tl.constexpr, FMAP: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """``dk`` columns ``[pid_f·BK, +BK)`` of query head ``bh``'s keys, backward in time
    (``DK [B, H, M, F]`` contiguous fp32; summed over the group by the launcher)."""
    pid_f = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    g_base = G + bh * N * DV
    dk_base = DK + bh * M * F
    rc = tl.arange(0, BC)
    fc = pid_f * BK + tl.arange(0, BK)
    ec = tl.arange(0, BE)
    f_ok = fc < F
    e_ok = ec < DV
    ld = _log_decay(LOGD, h, HAS_DECAY)
    off = M - N

    U = tl.zeros([BK, BE], dtype=tl.float32)  # Σ_i λ^(p_i−P) φq_i gᵢᵀ
    u = tl.zeros([BK], dtype=tl.float32)  # Σ_i λ^(p_i−P) c_i φq_i
    if CAUSAL:
        r_ok = rc < CHUNK
        q_w = tl.exp(ld * rc.to(tl.float32))  # λ^r: query r relative to the chunk start
        k_w = tl.exp(ld * tl.maximum(CHUNK - rc, 0).to(tl.float32))  # key s to chunk end
        c_w = tl.exp(ld * CHUNK)
        diff = rc[:, None] - rc[None, :]
        intra = tl.where(
            (diff >= 0) & r_ok[None, :], tl.exp(ld * tl.maximum(diff, 0).to(tl.float32)), 0.0
        )
        n_q = tl.cdiv(N, CHUNK)
        for t in range(n_q):
            i = (n_q - 1 - t) * CHUNK + rc
            i_ok = r_ok & (i < N)
            qf = _phi(
                _tile(q_base, i, i_ok, fc, f_ok, sqn, sqd), i_ok[:, None] & f_ok[None, :], FMAP
            )
            g = _tile(g_base, i, i_ok, ec, e_ok, DV, 1)
            c = tl.load(C + bh * N + i, mask=i_ok, other=0.0)
            j = off + i
            in_seq = r_ok & (j >= 0) & (j < M)
            ok = _keys_ok(MASK, b, h, j, in_seq, smb, smh, smn, HAS_MASK)
            kx = _tile(k_base, j, ok, fc, f_ok, skn, skd)
            vv = _tile(v_base, j, ok, ec, e_ok, svn, svd)
            # dφk_s = λ^(C−s) (U v_s + u) + Σ_r W[r, s] (g_r·v_s + c_r) φq_r
            dat = (tl.dot(vv, tl.trans(g), input_precision="ieee") + c[None, :]) * tl.trans(intra)
            dkf = tl.dot(dat, qf, input_precision="ieee")
            dkf += (tl.dot(vv, tl.trans(U), input_precision="ieee") + u[None, :]) * k_w[:, None]
            dk = tl.where(ok[:, None], dkf * _dphi(kx, FMAP), 0.0)
            tl.store(
                dk_base + j[:, None] * F + fc[None, :], dk, mask=in_seq[:, None] & f_ok[None, :]
            )
            qw = qf * q_w[:, None]
            U = U * c_w + tl.dot(tl.trans(qw), g, input_precision="ieee")
            u = u * c_w + tl.sum(qw * c[:, None], 0)
    else:
        for t in range(tl.cdiv(N, BC)):
            i = t * BC + rc
            i_ok = i < N
            qf = _phi(
                _tile(q_base, i, i_ok, fc, f_ok, sqn, sqd), i_ok[:, None] & f_ok[None, :], FMAP
            )
            g = _tile(g_base, i, i_ok, ec, e_ok, DV, 1)
            c = tl.load(C + bh * N + i, mask=i_ok, other=0.0)
            U += tl.dot(tl.trans(qf), g, input_precision="ieee")
            u += tl.sum(qf * c[:, None], 0)
    # State-only keys (causal: before the first query; bidirectional: all), last first.
    n_pre, pre0 = _pre_blocks(M, N, CAUSAL, BC)
    if CAUSAL:  # noqa: SIM108 (a constexpr if-block compiles one branch only)
        pre_kw = tl.exp(ld * (BC - rc).to(tl.float32))
    else:
        pre_kw = tl.full([BC], 1.0, tl.float32)
    pre_cw = tl.exp(ld * BC)
    for t in range(n_pre):
        j = pre0 + (n_pre - 1 - t) * BC + rc
        in_seq = (j >= 0) & (j < M)
        ok = _keys_ok(MASK, b, h, j, in_seq, smb, smh, smn, HAS_MASK)
        kx = _tile(k_base, j, ok, fc, f_ok, skn, skd)
        vv = _tile(v_base, j, ok, ec, e_ok, svn, svd)
        dkf = (tl.dot(vv, tl.trans(U), input_precision="ieee") + u[None, :]) * pre_kw[:, None]
        dk = tl.where(ok[:, None], dkf * _dphi(kx, FMAP), 0.0)
        tl.store(dk_base + j[:, None] * F + fc[None, :], dk, mask=in_seq[:, None] & f_ok[None, :])
        U = U * pre_cw
        u = u * pre_cw


@triton.jit
def _dv_kernel(
    Q, K, G, DVO, MASK, LOGD,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn,
    H, R, N, M, F, DV, CHUNK,
    CAUSAL: tl.constexpr, FMAP: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DECAY: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """``dv`` columns ``[pid_v·BV, +BV)`` of query head ``bh``'s values, backward in time
    (``DVO [B, H, M, Dv]`` contiguous fp32; summed over the group by the launcher)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    g_base = G + bh * N * DV
    dv_base = DVO + bh * M * DV
    rc = tl.arange(0, BC)
    fc = tl.arange(0, BF)
    vc = pid_v * BV + tl.arange(0, BV)
    f_ok = fc < F
    v_ok = vc < DV
    ld = _log_decay(LOGD, h, HAS_DECAY)
    off = M - N

    U = tl.zeros([BF, BV], dtype=tl.float32)  # Σ_i λ^(p_i−P) φq_i gᵢᵀ
    if CAUSAL:
        r_ok = rc < CHUNK
        q_w = tl.exp(ld * rc.to(tl.float32))
        k_w = tl.exp(ld * tl.maximum(CHUNK - rc, 0).to(tl.float32))
        c_w = tl.exp(ld * CHUNK)
        diff = rc[:, None] - rc[None, :]
        intra = tl.where(
            (diff >= 0) & r_ok[None, :], tl.exp(ld * tl.maximum(diff, 0).to(tl.float32)), 0.0
        )
        n_q = tl.cdiv(N, CHUNK)
        for t in range(n_q):
            i = (n_q - 1 - t) * CHUNK + rc
            i_ok = r_ok & (i < N)
            qf = _phi(
                _tile(q_base, i, i_ok, fc, f_ok, sqn, sqd), i_ok[:, None] & f_ok[None, :], FMAP
            )
            g = _tile(g_base, i, i_ok, vc, v_ok, DV, 1)
            j = off + i
            in_seq = r_ok & (j >= 0) & (j < M)
            ok = _keys_ok(MASK, b, h, j, in_seq, smb, smh, smn, HAS_MASK)
            kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
            # dv_s = λ^(C−s) Uᵀ φk_s + Σ_r W[r, s] (φq_r·φk_s) g_r
            at = tl.dot(kf, tl.trans(qf), input_precision="ieee") * tl.trans(intra)
            dv = tl.dot(at, g, input_precision="ieee")
            dv += tl.dot(kf, U, input_precision="ieee") * k_w[:, None]
            tl.store(
                dv_base + j[:, None] * DV + vc[None, :], dv, mask=in_seq[:, None] & v_ok[None, :]
            )
            U = U * c_w + tl.dot(tl.trans(qf * q_w[:, None]), g, input_precision="ieee")
    else:
        for t in range(tl.cdiv(N, BC)):
            i = t * BC + rc
            i_ok = i < N
            qf = _phi(
                _tile(q_base, i, i_ok, fc, f_ok, sqn, sqd), i_ok[:, None] & f_ok[None, :], FMAP
            )
            g = _tile(g_base, i, i_ok, vc, v_ok, DV, 1)
            U += tl.dot(tl.trans(qf), g, input_precision="ieee")
    n_pre, pre0 = _pre_blocks(M, N, CAUSAL, BC)
    if CAUSAL:  # noqa: SIM108 (a constexpr if-block compiles one branch only)
        pre_kw = tl.exp(ld * (BC - rc).to(tl.float32))
    else:
        pre_kw = tl.full([BC], 1.0, tl.float32)
    pre_cw = tl.exp(ld * BC)
    for t in range(n_pre):
        j = pre0 + (n_pre - 1 - t) * BC + rc
        in_seq = (j >= 0) & (j < M)
        ok = _keys_ok(MASK, b, h, j, in_seq, smb, smh, smn, HAS_MASK)
        kf = _phi(_tile(k_base, j, ok, fc, f_ok, skn, skd), ok[:, None] & f_ok[None, :], FMAP)
        dv = tl.dot(kf, U, input_precision="ieee") * pre_kw[:, None]
        tl.store(dv_base + j[:, None] * DV + vc[None, :], dv, mask=in_seq[:, None] & v_ok[None, :])
        U = U * pre_cw


# -- launchers ----------------------------------------------------------------------------------


def _warps(*tiles: int) -> int:
    """Warps for a program whose largest fp32 register tiles hold ``tiles`` elements:
    eight once a tile passes 64×64, so each thread keeps at most 32 of its elements
    (a guess from the tile sizes, not a measurement: autotune only runs on CUDA)."""
    return 8 if max(tiles) > 4096 else 4


def _block(n: int, cap: int) -> int:
    """A power-of-two tile extent covering ``n`` (at least 16, which ``tl.dot`` needs)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


class _Launch:
    """Sizes, masks and decay of one call, shared by the forward and backward launches.

    ``qx``/``kx`` are the raw q/k with ``fmap`` fused (elu, relu) or the features
    (``fmap == 0``)."""

    def __init__(self, qx, kx, v, kv_mask, *, causal, fmap, chunk, decay, eps) -> None:
        self.B, self.H, self.N, self.F = qx.shape
        self.Hkv, self.M, self.Dv = kx.shape[1], kx.shape[2], v.shape[-1]
        self.R = self.H // self.Hkv
        self.causal, self.fmap, self.eps = causal, fmap, float(eps)
        self.qx, self.kx, self.v = qx, kx, v
        dev = qx.device
        if kv_mask is not None:
            km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
            self.mask = km.to(device=dev, dtype=torch.int8)  # [Bm, Hm, M|1]
            sb, sh, sn = (0 if km.shape[d] == 1 else self.mask.stride(d) for d in range(3))
            self.mask_strides = (sb, sh, sn)
        else:
            self.mask, self.mask_strides = None, (0, 0, 0)
        log_decay = decay_per_head(decay, self.H, torch.float32, dev)
        self.log_decay = log_decay
        # A chunk longer than the queries only wastes lanes (keys before the first query
        # go through the state-only blocks of BC keys, whatever the chunk).
        self.chunk = max(1, min(int(chunk), MAX_CHUNK, self.N)) if causal else 64
        self.BC = _block(self.chunk, MAX_CHUNK) if causal else _block(max(self.N, self.M), 64)
        if not causal:
            self.chunk = self.BC

    def common(self):
        dummy = self.qx
        return dict(
            MASK=self.mask if self.mask is not None else dummy,
            LOGD=self.log_decay if self.log_decay is not None else dummy,
            smb=self.mask_strides[0],
            smh=self.mask_strides[1],
            smn=self.mask_strides[2],
            H=self.H,
            R=self.R,
            N=self.N,
            M=self.M,
            F=self.F,
            DV=self.Dv,
            CHUNK=self.chunk,
            CAUSAL=self.causal,
            FMAP=self.fmap,
            HAS_MASK=self.mask is not None,
            HAS_DECAY=self.log_decay is not None,
            BC=self.BC,
        )

    def strides(self, names=("q", "k", "v")):
        out = {}
        for name in names:
            t = {"q": self.qx, "k": self.kx, "v": self.v}[name]
            for axis, s in zip("bhnd", t.stride()):
                out[f"s{name}{axis}"] = s
        return out

    def forward(self, out_dtype, want_den: bool):
        out = _alloc((self.B, self.H, self.N, self.Dv), dtype=out_dtype, device=self.qx.device)
        den = _alloc((self.B, self.H, self.N), dtype=torch.float32, device=self.qx.device)
        BV = _block(self.Dv, 64)
        BF = _block(self.F, MAX_TRITON_DIM)
        _fwd_kernel[(triton.cdiv(self.Dv, BV), self.B * self.H)](
            self.qx,
            self.kx,
            self.v,
            out,
            den,
            **self.strides(),
            sob=out.stride(0),
            soh=out.stride(1),
            son=out.stride(2),
            sod=out.stride(3),
            **self.common(),
            eps=self.eps,
            WRITE_DEN=want_den,
            BF=BF,
            BV=BV,
            num_warps=_warps(self.BC * BF, BF * BV),
        )
        return out, (den if want_den else None)

    def backward(self, grad_out, out, den):
        """``(dqx [B, H, N, F], dkx [B, Hkv, M, F], dv [B, Hkv, M, Dv])`` in fp32."""
        dev = self.qx.device
        go = grad_out.to(torch.float32)
        g = (go / den.unsqueeze(-1)).contiguous()  # [B, H, N, Dv]
        c = (-(go * out.to(torch.float32)).sum(-1) / den).contiguous()  # [B, H, N]
        B, H, N, M, F, Dv = self.B, self.H, self.N, self.M, self.F, self.Dv
        dq = _alloc((B, H, N, F), dtype=torch.float32, device=dev)
        dk = _alloc((B, H, M, F), dtype=torch.float32, device=dev)
        dv = _alloc((B, H, M, Dv), dtype=torch.float32, device=dev)
        common = self.common()
        BK = _block(F, 64)
        BE = _block(Dv, MAX_TRITON_DIM)
        args = (self.qx, self.kx, self.v, g, c)
        warps = _warps(self.BC * BE, BK * BE)
        _dq_kernel[(triton.cdiv(F, BK), B * H)](
            *args, dq, **self.strides(), **common, BK=BK, BE=BE, num_warps=warps
        )
        _dk_kernel[(triton.cdiv(F, BK), B * H)](
            *args, dk, **self.strides(), **common, BK=BK, BE=BE, num_warps=warps
        )
        BV = _block(Dv, 64)
        BF = _block(F, MAX_TRITON_DIM)
        _dv_kernel[(triton.cdiv(Dv, BV), B * H)](
            self.qx,
            self.kx,
            g,
            dv,
            **self.strides(("q", "k")),
            **common,
            BF=BF,
            BV=BV,
            num_warps=_warps(self.BC * BF, BF * BV),
        )
        if self.R > 1:  # grouped-query heads share their kv head's keys and values
            dk = dk.view(B, self.Hkv, self.R, M, F).sum(2)
            dv = dv.view(B, self.Hkv, self.R, M, Dv).sum(2)
        return dq, dk, dv


def _features(q, k, *, scale, feature_map, tensors):
    """``(qx, kx, fmap)``: the raw q/k for a fused map, else φ(q), φ(k) in fp32 (through
    autograd when grad mode is on)."""
    if feature_map in _FMAP:
        return q, k, _FMAP[feature_map]
    qw, qb, kw, kb = tensors
    ct = compute_dtype(q.dtype)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = apply_feature_map(q.to(ct), feature_map, weight=qw, bias=qb, scale=scale, query=True)
    kf = apply_feature_map(k.to(ct), feature_map, weight=kw, bias=kb, scale=scale)
    return qf, kf, 0


def triton_supports(q: torch.Tensor, v: torch.Tensor, feature_map: str, tensors) -> str | None:
    """None when the kernels take this call, else why not (feature or value dim too
    large for a register-resident state)."""
    F = q.shape[-1]
    if feature_map == "softmax_rf":
        F = tensors[0].shape[-1]
    elif feature_map == "hedgehog":
        F = 2 * tensors[0].shape[-1]
    if F > MAX_TRITON_DIM or v.shape[-1] > MAX_TRITON_DIM:
        return (
            f"feature dim {F} and value dim {v.shape[-1]} must be at most {MAX_TRITON_DIM} "
            f"for the Triton kernels"
        )
    return None


def _check(caller, q, k, v, kv_mask, *, causal, feature_map, chunk, decay, eps, tensors):
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_linear_args(
        caller,
        feature_map=feature_map,
        chunk=chunk,
        decay=decay,
        eps=eps,
        causal=causal,
        heads=shapes.heads,
    )
    check_feature_tensors(
        caller, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: Triton kernels take CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got q on {q.device}"
        )
    for name, t in zip(("q_weight", "q_bias", "k_weight", "k_bias"), tensors):
        if t is not None and t.device != q.device:
            raise ValueError(f"{caller}: {name} must be on q's device {q.device}, got {t.device}")
    reason = triton_supports(q, v, feature_map, tensors)
    if reason is not None:
        raise ValueError(f"{caller}: {reason}")


class _LinearFunction(torch.autograd.Function):
    """The kernels on ``(qx, kx, v)``; gradients flow back to q, k (and the feature-map
    tensors) through whatever produced ``qx``/``kx``."""

    @staticmethod
    def forward(ctx, qx, kx, v, kv_mask, settings, out_dtype):
        launch = _Launch(qx, kx, v, kv_mask, **settings)
        out, den = launch.forward(torch.float32, want_den=True)
        ctx.save_for_backward(qx, kx, v, kv_mask, out, den)
        ctx.settings = settings
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qx, kx, v, kv_mask, out, den = ctx.saved_tensors
        launch = _Launch(qx, kx, v, kv_mask, **ctx.settings)
        dq, dk, dv = launch.backward(grad_out, out, den)
        return dq.to(qx.dtype), dk.to(kx.dtype), dv.to(v.dtype), None, None, None


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    feature_map: str = "elu",
    chunk: int = 64,
    decay: float | tuple[float, ...] | None = None,
    eps: float = 1e-6,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear attention through the Triton kernels, differentiable (q, k, v and the
    feature-map tensors); semantics of
    :func:`~attnopt.kernels.linear.reference.linear_attention_reference`.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``,
            on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys contribute nothing.
        scale, causal, feature_map, decay, eps, q_weight, q_bias, k_weight, k_bias: as in
            the reference.
        chunk: positions per chunk of the causal kernel (capped at 128 and at N; the
            result does not depend on it beyond rounding).

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.

    Example (on a GPU):
        >>> q, k, v = (torch.randn(1, 2, 1000, 64, device="cuda") for _ in range(3))
        >>> linear_attention_triton(q, k, v, causal=True).shape  # doctest: +SKIP
        torch.Size([1, 2, 1000, 64])
    """
    tensors = (q_weight, q_bias, k_weight, k_bias)
    caller = "linear_attention_triton"
    _check(
        caller,
        q,
        k,
        v,
        kv_mask,
        causal=causal,
        feature_map=feature_map,
        chunk=chunk,
        decay=decay,
        eps=eps,
        tensors=tensors,
    )
    if q.shape[2] == 0:
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    qx, kx, fmap = _features(q, k, scale=scale, feature_map=feature_map, tensors=tensors)
    settings = dict(causal=causal, fmap=fmap, chunk=chunk, decay=decay, eps=eps)
    return _LinearFunction.apply(qx, kx, v, kv_mask, settings, q.dtype)


def linear_forward_triton(
    q, k, v, kv_mask, *, scale, causal, feature_map, chunk, decay, eps, tensors
) -> torch.Tensor:
    """The forward on checked inputs without autograd (the op's CUDA kernel)."""
    if q.shape[2] == 0:
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    with torch.no_grad():
        qx, kx, fmap = _features(q, k, scale=scale, feature_map=feature_map, tensors=tensors)
        launch = _Launch(
            qx, kx, v, kv_mask, causal=causal, fmap=fmap, chunk=chunk, decay=decay, eps=eps
        )
        out, _ = launch.forward(q.dtype, want_den=False)
    return out


def linear_backward_triton(
    grad_out, q, k, v, kv_mask, *, scale, causal, feature_map, chunk, decay, eps, tensors,
    tensor_grads,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Gradients ``(dq, dk, dv, dq_weight, dq_bias, dk_weight, dk_bias)`` on checked
    inputs (the backward op's CUDA kernel): the forward is recomputed for its output and
    normaliser; a feature-map gradient is an empty tensor when ``tensor_grads`` is False
    or the tensor is None."""
    empty = [q.new_empty(0) for _ in range(4)]
    present = [i for i, t in enumerate(tensors) if t is not None] if tensor_grads else []
    if q.shape[2] == 0:
        for i in present:
            empty[i] = torch.zeros_like(tensors[i])
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *empty

    def features(q_, k_, *ts):
        full = list(tensors)
        for i, t in zip(present, ts):
            full[i] = t
        qx, kx, _ = _features(q_, k_, scale=scale, feature_map=feature_map, tensors=full)
        return qx, kx

    fmap = _FMAP.get(feature_map, 0)
    if fmap:
        qx, kx, vjp = q, k, None
    else:
        # Custom-op bodies run below the autograd dispatch key; torch.func.vjp records
        # the feature map's graph regardless.
        (qx, kx), vjp = torch.func.vjp(features, q, k, *(tensors[i] for i in present))
    launch = _Launch(
        qx, kx, v, kv_mask, causal=causal, fmap=fmap, chunk=chunk, decay=decay, eps=eps
    )
    out, den = launch.forward(torch.float32, want_den=True)
    dqx, dkx, dv = launch.backward(grad_out, out, den)
    if vjp is None:  # fused map: the kernels already returned gradients of the raw q, k
        dq, dk, grads = dqx, dkx, []
    else:
        dq, dk, *grads = vjp((dqx, dkx))
    for i, g in zip(present, grads):
        empty[i] = g.contiguous()
    return (
        dq.to(q.dtype).contiguous(),
        dk.to(k.dtype).contiguous(),
        dv.to(v.dtype).contiguous(),
        *empty,
    )
