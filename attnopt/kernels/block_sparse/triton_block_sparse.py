"""Block-sparse attention in Triton: FlashAttention-style tiles over the kept key blocks only.

The work is driven by a :class:`~attnopt.kernels.block_sparse.selection.BlockSelection`
(``index [B, H, nQ, K]``, ``count [B, H, nQ]``), with exactly the semantics of the CPU
gather kernel (:mod:`~attnopt.kernels.block_sparse.gather`) for the same selection:
query ``i`` (row position ``i + offset``, see
:func:`~attnopt.kernels.block_sparse.selection.block_layout`) sees key ``j`` iff ``j``'s
block is kept for ``i``'s block, ``j < M``, ``kv_mask`` allows it and, in causal
attention, ``j <= i + offset``. Rows that see no key return 0.

Three kernels, each one program per tile:

* forward, per (batch, head, query sub-tile): an online softmax over the ``count``
  kept key blocks, read straight from ``index`` (K/V of the query head's kv head:
  grouped-query attention never repeats K/V). It writes the output and the
  logsumexp ``lse [B, H, N]`` (natural log, fp32; ``+inf`` for rows that see no key,
  so that ``exp(s - lse)`` is 0 for them in the backward).
* backward dQ, per (batch, head, query sub-tile): the same loop, recomputing the
  weights from ``lse``: ``dS = P ∘ (dO·Vᵀ − Δ)``, ``dQ = scale·dS·K``, with
  ``Δ = rowsum(dO ∘ O)`` from a small preprocessing kernel.
* backward dK/dV, per (batch, kv head, key sub-tile): a loop over the query blocks
  that keep the key block, for every query head of the kv head, from the *transposed*
  selection (:func:`transpose_selection`: key block -> query blocks keeping it, built
  with one sort of the kept entries). Chosen over atomics because each key tile's
  gradients are summed in registers and written once: deterministic results, no
  fp32 scratch the size of K and V and no atomic contention on popular blocks (sinks
  and the diagonal are kept by every query block); the grouped-query sum over the
  heads of a kv head comes for free in the same loop.

A block of ``block`` positions is cut into sub-tiles of ``BLOCK_M`` queries and
``BLOCK_N`` keys (powers of two, at least 16 for ``tl.dot``); a query sub-tile never
straddles two query blocks, since they keep different key blocks. Block sizes are
picked from the shapes (no autotuning: it does not run under the interpreter). fp32
inputs use IEEE fp32 dot products (no TF32), so they match the fp32 reference to
rounding; fp16/bf16 accumulate in fp32 and feed the probabilities to the second
matmul in the input dtype, as FlashAttention does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnopt.kernels._triton import interpreting, triton_runs_on
from attnopt.kernels.block_sparse.selection import BlockLayout, BlockSelection, block_layout

__all__ = [
    "block_sparse_attention_triton",
    "block_sparse_backward_triton",
    "block_sparse_forward_triton",
    "transpose_selection",
]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# -- kernels -------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, IDX, CNT, KVM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh, sln,
    sib, sih, siq, sik,
    scb, sch, scq,
    smb, smh, smm,
    H, R, N, M, D, DV, offset, first_block, block, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, Q_SUB: tl.constexpr, K_SUB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // R
    j = pid_q // Q_SUB
    in_q = (pid_q % Q_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = (first_block + j) * block + in_q  # row positions, aligned with key positions
    rows = pos - offset
    row_ok = (in_q < block) & (rows >= 0) & (rows < N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = KVM + b * smb + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    cnt = tl.load(CNT + b * scb + h * sch + j * scq)
    idx_base = IDX + b * sib + h * sih + j * siq
    for t in range(0, cnt):
        c = tl.load(idx_base + t * sik)
        for ks in tl.static_range(K_SUB):
            in_k = ks * BLOCK_N + tl.arange(0, BLOCK_N)
            kpos = c * block + in_k
            k_ok = (in_k < block) & (kpos < M)
            # K loaded transposed, [BD, BN], so the score tile is one plain dot.
            kt = tl.load(
                k_base + kpos[None, :] * skn + offs_d[:, None] * skd,
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [BM, BN], log2 units
            if not EVEN_K:
                s = tl.where(k_ok[None, :], s, float("-inf"))
            if CAUSAL:
                s = tl.where(kpos[None, :] <= pos[:, None], s, float("-inf"))
            if HAS_MASK:
                seen = tl.load(m_base + kpos * smm, mask=k_ok, other=0) != 0
                s = tl.where(seen[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps
            # its weights exactly 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_base + kpos[:, None] * svn + offs_dv[None, :] * svd,
                mask=k_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            m_i = m_new

    seen_any = l_i > 0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    o_ptrs = OUT + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    lse = tl.where(seen_any, (m_i + tl.log2(tl.where(seen_any, l_i, 1.0))) / 1.4426950408889634,
                   float("inf"))  # fmt: skip
    tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=row_ok)


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA,
    sob, soh, son, sod,
    sgb, sgh, sgn, sgd,
    H, N, DV,
    BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``Δ = rowsum(dO ∘ O)`` in fp32, ``DELTA`` contiguous ``[B, H, N]``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows < N)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(OUT + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod,
                mask=ok, other=0.0)  # fmt: skip
    g = tl.load(DO + b * sgb + h * sgh + rows[:, None] * sgn + offs_dv[None, :] * sgd,
                mask=ok, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * N + rows, delta, mask=rows < N)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, KVM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sgb, sgh, sgn, sgd,
    sdb, sdh, sdn, sdd,
    sib, sih, siq, sik,
    scb, sch, scq,
    smb, smh, smm,
    H, R, N, M, D, DV, offset, first_block, block, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, Q_SUB: tl.constexpr, K_SUB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // R
    j = pid_q // Q_SUB
    in_q = (pid_q % Q_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = (first_block + j) * block + in_q
    rows = pos - offset
    row_ok = (in_q < block) & (rows >= 0) & (rows < N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + b * sgb + h * sgh + rows[:, None] * sgn + offs_dv[None, :] * sgd,
        mask=row_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    stat = (b * H + h) * N + rows
    lse2 = tl.load(LSE + stat, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = KVM + b * smb + h * smh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(CNT + b * scb + h * sch + j * scq)
    idx_base = IDX + b * sib + h * sih + j * siq
    for t in range(0, cnt):
        c = tl.load(idx_base + t * sik)
        for ks in tl.static_range(K_SUB):
            in_k = ks * BLOCK_N + tl.arange(0, BLOCK_N)
            kpos = c * block + in_k
            k_ok = (in_k < block) & (kpos < M)
            kk = tl.load(
                k_base + kpos[:, None] * skn + offs_d[None, :] * skd,
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [BN, BD]
            vt = tl.load(
                v_base + kpos[None, :] * svn + offs_dv[:, None] * svd,
                mask=k_ok[None, :] & dv_ok[:, None],
                other=0.0,
            )  # [BDV, BN]
            s = tl.dot(q, tl.trans(kk), input_precision="ieee") * qk_scale
            visible = row_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                visible = visible & (kpos[None, :] <= pos[:, None])
            if HAS_MASK:
                seen = tl.load(m_base + kpos * smm, mask=k_ok, other=0) != 0
                visible = visible & seen[None, :]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision="ieee")

    tl.store(
        DQ + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, LSE, DELTA, TIDX, TCNT, KVM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sgb, sgh, sgn, sgd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    stb, sth, stc, stt,
    scb, sch, scc,
    smb, smh, smm,
    H, HKV, R, N, M, D, DV, offset, first_block, block, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, Q_SUB: tl.constexpr, K_SUB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    c = pid_k // K_SUB
    in_k = (pid_k % K_SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos = c * block + in_k
    k_ok = (in_k < block) & (kpos < M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    kk = tl.load(
        K + b * skb + hk * skh + kpos[:, None] * skn + offs_d[None, :] * skd,
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BN, BD]
    vv = tl.load(
        V + b * svb + hk * svh + kpos[:, None] * svn + offs_dv[None, :] * svd,
        mask=k_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )  # [BN, BDV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for r in range(0, R):
        h = hk * R + r
        key_ok = k_ok
        if HAS_MASK:
            key_ok = key_ok & (
                tl.load(KVM + b * smb + h * smh + kpos * smm, mask=k_ok, other=0) != 0
            )
        cnt = tl.load(TCNT + b * scb + h * sch + c * scc)
        idx_base = TIDX + b * stb + h * sth + c * stc
        for t in range(0, cnt):
            j = tl.load(idx_base + t * stt)
            for qs in tl.static_range(Q_SUB):
                in_q = qs * BLOCK_M + tl.arange(0, BLOCK_M)
                pos = (first_block + j) * block + in_q
                rows = pos - offset
                row_ok = (in_q < block) & (rows >= 0) & (rows < N)
                q = tl.load(
                    Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )  # [BM, BD]
                do = tl.load(
                    DO + b * sgb + h * sgh + rows[:, None] * sgn + offs_dv[None, :] * sgd,
                    mask=row_ok[:, None] & dv_ok[None, :],
                    other=0.0,
                )  # [BM, BDV]
                stat = (b * H + h) * N + rows
                lse2 = tl.load(LSE + stat, mask=row_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
                # Transposed scores [BN, BM]: key rows, so dK and dV are plain dots.
                st = tl.dot(kk, tl.trans(q), input_precision="ieee") * qk_scale
                visible = key_ok[:, None] & row_ok[None, :]
                if CAUSAL:
                    visible = visible & (kpos[:, None] <= pos[None, :])
                pt = tl.where(visible, tl.exp2(st - lse2[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
                dpt = tl.dot(vv, tl.trans(do), input_precision="ieee")
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")

    tl.store(
        DK + b * sdkb + hk * sdkh + kpos[:, None] * sdkn + offs_d[None, :] * sdkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=k_ok[:, None] & d_ok[None, :],
    )
    tl.store(
        DV_ + b * sdvb + hk * sdvh + kpos[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV_.dtype.element_ty),
        mask=k_ok[:, None] & dv_ok[None, :],
    )


# -- launch geometry -----------------------------------------------------------------------------


def _tile(block: int, cap: int) -> int:
    """Sub-tile size for ``block`` positions: the largest power of two ``<= cap`` dividing
    ``block`` when that is at least 16 (no masked lanes), else ``cap`` or the next power
    of two above ``block`` (at least 16, ``tl.dot``'s minimum), whichever is smaller."""
    p = 1
    while p * 2 <= cap and block % (p * 2) == 0:
        p *= 2
    if p >= 16:
        return p
    return min(cap, max(16, triton.next_power_of_2(block)))


def _config(kernel: str, block: int, D: int, Dv: int) -> dict:
    """Tile sizes, warps and pipeline stages of one kernel, picked from the shapes.

    Query sub-tiles (``BLOCK_M``) may be as long as a whole block (up to 128 rows) in
    the forward; wide heads take smaller tiles to stay in registers and shared memory,
    and the backward, holding more accumulators, takes smaller ones still.
    """
    widest = max(D, Dv)
    if interpreting():
        cap_m, cap_n, warps, stages = 64, 64, 4, 1  # numpy: large tiles, few steps
    elif kernel == "fwd":
        cap_m, cap_n = (128, 64) if widest <= 128 else (64, 32)
        stages = 3 if widest <= 128 else 2
        warps = 4
    else:
        cap_m, cap_n = (64, 64) if widest <= 128 else (32, 32)
        stages = 2
        warps = 8 if widest > 64 else 4
    bm, bn = _tile(block, cap_m), _tile(block, cap_n)
    if not interpreting() and kernel == "fwd" and bm * widest >= 128 * 128:
        warps = 8
    return dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        Q_SUB=triton.cdiv(block, bm),
        K_SUB=triton.cdiv(block, bn),
        num_warps=warps,
        num_stages=stages,
    )


def _mask_arg(kv_mask: torch.Tensor | None, B: int, H: int, M: int, device):
    """``kv_mask`` as a ``[B, H, M]`` (stride-0 broadcast) view, or a 1-element dummy."""
    if kv_mask is None:
        return torch.ones(1, 1, 1, dtype=torch.uint8, device=device), (0, 0, 0)
    km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape)).expand(B, H, M)
    # Bytes, not bool: the kernels read a plain uint8 pointer on every backend.
    km = km.view(torch.uint8)
    return km, tuple(km.stride())


def _check(caller, q, k, v, kv_mask, selection, block, layout: BlockLayout):
    """Launcher checks beyond :func:`check_attention_inputs` (done by the callers)."""
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: Triton kernels run on CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got tensors on {q.device}"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(f"{caller}: dtype must be one of {_DTYPES}, got {q.dtype}")
    for name, dim in (("head dim D", q.shape[-1]), ("value dim Dv", v.shape[-1])):
        if not 1 <= dim <= _MAX_HEAD_DIM:
            raise ValueError(
                f"{caller}: {name} must be in [1, {_MAX_HEAD_DIM}] for the Triton kernel, got {dim}"
            )
    if not isinstance(selection, tuple) or len(selection) != 2:
        raise ValueError(
            f"{caller}: selection must be a BlockSelection(index, count), got "
            f"{type(selection).__name__}"
        )
    index, count = selection
    B, H = q.shape[:2]
    nq = layout.num_q_blocks
    if index.dim() != 4 or tuple(index.shape[:3]) != (B, H, nq):
        raise ValueError(
            f"{caller}: selection.index must be [B, H, nQ, K] = [{B}, {H}, {nq}, K] for "
            f"block={block}, got shape {tuple(index.shape)}"
        )
    if tuple(count.shape) != (B, H, nq):
        raise ValueError(
            f"{caller}: selection.count must be [B, H, nQ] = [{B}, {H}, {nq}], got shape "
            f"{tuple(count.shape)}"
        )
    for name, t in (("index", index), ("count", count)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(
                f"{caller}: selection.{name} must be int32 on {q.device}, got {t.dtype} on "
                f"{t.device}"
            )


# -- launchers -----------------------------------------------------------------------------------


def block_sparse_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    selection: BlockSelection,
    *,
    block: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over the kept blocks of ``selection``; inputs checked by the caller with
    :func:`~attnopt.kernels._checks.check_attention_inputs` (any strides are taken).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``; fp16, bf16 or
            fp32, ``D, Dv <= 256``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``.
        selection: ``BlockSelection`` for ``block_layout(N, M, block, causal)``.
        block, scale, causal: as in :class:`~attnopt.kernels.block_sparse.BlockSparse`.

    Returns:
        ``(out [B, H, N, Dv]`` in ``q.dtype``, ``lse [B, H, N]`` fp32 natural-log
        logsumexp of each row's visible scores, ``+inf`` for rows that see none).
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    layout = block_layout(N, M, block, causal)
    _check("block_sparse_forward_triton", q, k, v, kv_mask, selection, block, layout)
    out = q.new_empty(B, H, N, Dv)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    # Causal queries before key 0 belong to no block: no program writes them.
    skipped = layout.row_start - layout.offset
    out[:, :, :skipped].zero_()
    lse[:, :, :skipped] = math.inf
    if layout.num_q_blocks == 0 or B * H == 0:
        return out, lse
    if layout.num_k_blocks == 0:  # no keys: every row is empty
        out.zero_()
        lse.fill_(math.inf)
        return out, lse
    cfg = _config("fwd", block, D, Dv)
    km, sm = _mask_arg(kv_mask, B, H, M, q.device)
    index, count = selection
    grid = (layout.num_q_blocks * cfg["Q_SUB"], B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, index, count, km,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *index.stride(), *count.stride(), *sm,
        H, H // Hkv, N, M, D, Dv, layout.offset, layout.first_block, block, scale * _LOG2E,
        CAUSAL=causal, HAS_MASK=kv_mask is not None,
        EVEN_K=block % cfg["BLOCK_N"] == 0 and M % block == 0, **cfg,
    )  # fmt: skip
    return out, lse


def transpose_selection(selection: BlockSelection, num_k_blocks: int) -> BlockSelection:
    """The selection read the other way: for each key block, the query blocks keeping it.

    Args:
        selection: ``index [B, H, nQ, K]``, ``count [B, H, nQ]``.
        num_k_blocks: ``nK``.

    Returns:
        ``BlockSelection(index [B, H, nK, W], count [B, H, nK])``, int32, query blocks in
        increasing order, ``W >= 1`` (entries past ``count`` are 0).
    """
    index, count = selection
    B, H, nq, K = index.shape
    dev = index.device
    slots = torch.arange(K, device=dev)
    valid = slots < count.unsqueeze(-1)  # [B, H, nQ, K]
    rows = torch.arange(B * H, device=dev).view(B, H, 1, 1)
    qblock = torch.arange(nq, device=dev).view(1, 1, nq, 1)
    # One int64 key per kept entry orders them by (batch·head, key block, query block).
    key = (rows * num_k_blocks + index.long()) * nq + qblock
    key = key.expand(B, H, nq, K)[valid].sort().values
    group = key // max(nq, 1)
    tcount = torch.bincount(group, minlength=B * H * num_k_blocks)
    start = tcount.cumsum(0) - tcount
    slot = torch.arange(key.numel(), device=dev) - start[group]
    width = max(1, int(tcount.max())) if tcount.numel() else 1
    tindex = torch.zeros(B * H * num_k_blocks, width, dtype=torch.int32, device=dev)
    tindex[group, slot] = (key % max(nq, 1)).int()
    return BlockSelection(
        tindex.view(B, H, num_k_blocks, width), tcount.int().view(B, H, num_k_blocks)
    )


def block_sparse_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    selection: BlockSelection,
    *,
    block: int,
    scale: float,
    causal: bool,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`block_sparse_forward_triton`, the selection held
    fixed.

    Args:
        grad_out: ``[B, H, N, Dv]``, gradient of the output.
        q, k, v, kv_mask, selection, block, scale, causal: as for the forward.
        out, lse: the forward's results; recomputed (one forward) when not given.

    Returns:
        ``dq [B, H, N, D]``, ``dk [B, Hkv, M, D]``, ``dv [B, Hkv, M, Dv]`` in the inputs'
        dtypes.
    """
    caller = "block_sparse_backward_triton"
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    layout = block_layout(N, M, block, causal)
    _check(caller, q, k, v, kv_mask, selection, block, layout)
    if grad_out.shape != (B, H, N, Dv) or grad_out.device != q.device:
        raise ValueError(
            f"{caller}: grad_out must be [B, H, N, Dv] = {[B, H, N, Dv]} on {q.device}, got "
            f"shape {tuple(grad_out.shape)} on {grad_out.device}"
        )
    if (out is None) != (lse is None):
        raise ValueError(f"{caller}: give both out and lse, or neither (they are recomputed)")
    if out is None:
        out, lse = block_sparse_forward_triton(
            q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
        )
    lse = lse.contiguous()
    # Contiguous whatever the inputs' strides: the ops' fake kernels promise that.
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq[:, :, : layout.row_start - layout.offset].zero_()  # rows in no block: no gradient
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    if B * H == 0 or nk == 0 or nq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = _config("bwd", block, D, Dv)
    km, sm = _mask_arg(kv_mask, B, H, M, q.device)
    index, count = selection
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    rows_per = 64
    _delta_kernel[(triton.cdiv(N, rows_per), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, N, Dv,
        BLOCK=rows_per, BLOCK_DV=cfg["BLOCK_DV"],
    )  # fmt: skip
    flags = dict(CAUSAL=causal, HAS_MASK=kv_mask is not None)
    _bwd_dq_kernel[(nq * cfg["Q_SUB"], B * H)](
        q, k, v, grad_out, dq, lse, delta, index, count, km,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *index.stride(), *count.stride(), *sm,
        H, H // Hkv, N, M, D, Dv, layout.offset, layout.first_block, block,
        scale * _LOG2E, scale,
        EVEN_K=block % cfg["BLOCK_N"] == 0 and M % block == 0, **flags, **cfg,
    )  # fmt: skip
    tindex, tcount = transpose_selection(selection, nk)
    _bwd_dkdv_kernel[(nk * cfg["K_SUB"], B * Hkv)](
        q, k, v, grad_out, dk, dv, lse, delta, tindex, tcount, km,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *tindex.stride(), *tcount.stride(), *sm,
        H, Hkv, H // Hkv, N, M, D, Dv, layout.offset, layout.first_block, block,
        scale * _LOG2E, scale, **flags, **cfg,
    )  # fmt: skip
    return dq, dk, dv


# -- autograd ------------------------------------------------------------------------------------


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_mask, index, count, block, scale, causal):
        selection = BlockSelection(index, count)
        out, lse = block_sparse_forward_triton(
            q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
        )
        ctx.save_for_backward(q, k, v, kv_mask, index, count, out, lse)
        ctx.geometry = (block, scale, causal)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, kv_mask, index, count, out, lse = ctx.saved_tensors
        block, scale, causal = ctx.geometry
        dq, dk, dv = block_sparse_backward_triton(
            grad_out,
            q,
            k,
            v,
            kv_mask,
            BlockSelection(index, count),
            block=block,
            scale=scale,
            causal=causal,
            out=out,
            lse=lse,
        )
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    selection: BlockSelection,
    *,
    block: int,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
):
    """Block-sparse attention over the blocks of ``selection``, differentiable in q, k, v.

    Same result as the CPU gather kernel
    (:func:`~attnopt.kernels.block_sparse.gather.block_sparse_forward`) for the same
    selection; the backward reuses the forward's output and logsumexp.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``;
            fp16, bf16 or fp32; CUDA (or CPU under ``TRITON_INTERPRET=1``).
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        selection: from :func:`~attnopt.kernels.block_sparse.selection.select_blocks` (or
            :func:`~attnopt.kernels.block_sparse.triton_selection.select_blocks_triton`)
            with the same ``block`` and ``causal``.
        block: positions per block.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` (at key position ``i + M - N``) sees only keys up to it.
        return_lse: also return the fp32 logsumexp ``[B, H, N]``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype`` (rows with no visible key are 0), and the
        logsumexp when ``return_lse``.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 100, 16, device="cuda") for _ in range(3))
        >>> sel = select_blocks(q, k, block=32, causal=True, scale=0.25, topk=2)
        >>> block_sparse_attention_triton(q, k, v, None, sel, block=32, causal=True).shape
        torch.Size([1, 2, 100, 16])
    """
    from attnopt.kernels._checks import check_attention_inputs

    check_attention_inputs("block_sparse_attention_triton", q, k, v, kv_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _TritonBlockSparse.apply(
        q, k, v, kv_mask, selection.index, selection.count, block, scale, causal
    )
    return (out, lse) if return_lse else out
