"""The decode step as Triton kernels: a few new queries against a key/value cache.

During generation each (batch, head) has one new query (or a few, with speculative
decoding) and ``M`` cached keys; for a sliding-window model the cache holds only the
sinks and the window, and ``kv_mask`` marks which slots are filled. The work is a
matrix-vector product, bound by reading K and V once, so the kernel is arranged around
that read:

* Grouped-query attention: one program serves every query head that shares a key
  head (``group * Nq`` query rows), so each K/V tile is read once per key head, not
  once per query head.
* Split-K ("flash-decoding"): with few (batch, head) pairs there are too few programs
  to keep the GPU's memory system busy, so the keys are cut into ``num_splits``
  chunks, each program runs an online softmax over one chunk and writes its partial
  output and log-sum-exp (fp32), and a second kernel merges the chunks of each row.

Kernel → launcher (checks, allocation, launch with keyword arguments).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels._triton import interpreting, triton_runs_on
from attnopt.kernels.sliding_window.triton_sliding_window import _dim_ok

__all__ = ["decode_attention_triton"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    KVM,
    O_PART,
    LSE_PART,
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
    group,
    NQ,
    M,
    D,
    DV,
    qk_scale,
    chunk,
    num_splits,
    row_blocks,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online softmax of ``BLOCK_R`` query rows (``row = g * NQ + n``: query ``n`` of the
    group's head ``g``) over one chunk of keys; writes the chunk's normalised output and
    base-2 log-sum-exp (``-inf`` when the chunk holds no visible key)."""
    pid0 = tl.program_id(0)
    split = pid0 // row_blocks
    rb = pid0 % row_blocks
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = group * NQ
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    g = r // NQ
    n = r % NQ
    h = hk * group + g  # [BLOCK_R] query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = _dim_ok(offs_d, D, EVEN_D)
    dv_ok = _dim_ok(offs_dv, DV, EVEN_DV)
    q = tl.load(
        Q + b * stride_qb + h[:, None] * stride_qh + n[:, None] * stride_qn
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # fmt: skip
    k_ptr = K + b * stride_kb + hk * stride_kh
    v_ptr = V + b * stride_vb + hk * stride_vh
    pos = n + (M - NQ)  # causal: the key position of each query (bottom-right aligned)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, M)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        key_ok = j < hi
        k = tl.load(
            k_ptr + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_R, BLOCK_N]
        vis = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            vis = vis & (j[None, :] <= pos[:, None])
        if HAS_MASK:
            km = tl.load(
                KVM + b * stride_mb + h[:, None] * stride_mh + j[None, :] * stride_mm,
                mask=vis,
                other=0,
            )
            vis = vis & (km != 0)
        scores = tl.where(vis, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + j[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=key_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    # Workspace rows: [B, Hkv, num_splits, rows] (+ [.., DV] for the output), contiguous.
    base = ((b * tl.num_programs(1) + hk) * num_splits + split) * rows + r
    tl.store(
        O_PART + base[:, None] * DV + offs_dv[None, :],
        out,
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(LSE_PART + base, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART,
    LSE_PART,
    Out,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    group,
    NQ,
    DV,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_DV: tl.constexpr,
):
    """Merge the chunks of one query row: ``out = Σ_s 2^(lse_s − L) · out_s`` with
    ``L = log2 Σ_s 2^lse_s``; a row no chunk saw anything for is 0."""
    r = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = group * NQ
    s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = _dim_ok(offs_dv, DV, EVEN_DV)
    base = ((b * tl.num_programs(1) + hk) * num_splits + s) * rows + r  # [BLOCK_S]
    lse = tl.load(LSE_PART + base, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty chunks
    part = tl.load(
        O_PART + base[:, None] * DV + offs_dv[None, :],
        mask=(s < num_splits)[:, None] & dv_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_DV]
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    h = hk * group + r // NQ
    n = r % NQ
    tl.store(
        Out + b * stride_ob + h * stride_oh + n * stride_on + offs_dv * stride_od,
        out.to(Out.dtype.element_ty),
        mask=dv_ok,
    )


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _num_splits(batch_kv_heads: int, kv_len: int, block_n: int, device: torch.device) -> int:
    """Enough chunks that about two programs run per SM, none shorter than two key tiles
    (a shorter chunk costs more to merge than it saves)."""
    max_splits = max(1, triton.cdiv(kv_len, 2 * block_n))
    if interpreting() or device.type != "cuda":
        return min(4, max_splits)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, batch_kv_heads), max_splits, 64))


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    num_splits: int | None = None,
    debug_nan: bool = False,
) -> torch.Tensor:
    """Attention of a few new queries against a key/value cache (split-K, on Triton).

    Dense attention over the cache's visible keys: the same result as
    :func:`~attnopt.kernels.dense.reference.dense_attention_reference`
    (``bias=None``).

    Args:
        q: ``[B, H, Nq, D]``, the new queries (``Nq`` small: 1, or a few).
        k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, the cache, ``H % Hkv == 0``;
            float16, bfloat16 or float32, head dims up to 256, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False slots are never
            attended (empty or evicted cache slots, padding).
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``n`` sees only keys ``j <= n + M - Nq`` (for ``Nq > 1``); default
            False (every cached key).
        num_splits: number of key chunks merged at the end (default: from the sizes and
            the GPU's SM count).
        debug_nan: fill the output with NaN before the launch (tests).

    Returns:
        ``[B, H, Nq, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.float16)
        >>> k, v = (torch.randn(2, 2, 4096, 128, device="cuda", dtype=torch.float16) for _ in "kv")
        >>> decode_attention_triton(q, k, v).shape
        torch.Size([2, 8, 1, 128])
    """
    caller = "decode_attention_triton"
    sh = check_attention_inputs(caller, q, k, v, kv_mask)
    B, H, NQ, D, Hkv, M, DV = (
        sh.batch, sh.heads, sh.q_len, sh.head_dim, sh.kv_heads, sh.kv_len, sh.value_dim
    )  # fmt: skip
    if q.dtype not in _DTYPES:
        raise ValueError(f"{caller}: q must be float16, bfloat16 or float32, got dtype {q.dtype}")
    for name, dim in (("q/k head dim D", D), ("v head dim Dv", DV)):
        if not 0 < dim <= _MAX_HEAD_DIM:
            raise ValueError(f"{caller}: {name} must be in [1, {_MAX_HEAD_DIM}], got {dim}")
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: q must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), "
            f"got device {q.device}"
        )
    if num_splits is not None and (
        not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1
    ):
        raise ValueError(f"{caller}: num_splits must be a positive int, got {num_splits!r}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # Rows are read as contiguous head-dim vectors; other last-dim strides are copied once.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.full(
        (B, H, NQ, DV), float("nan") if debug_nan else 0.0, dtype=q.dtype, device=q.device
    )
    if out.numel() == 0:
        return out
    if M == 0:
        return out.zero_()

    group = H // Hkv
    rows = group * NQ
    block_r = min(64, _pow2(rows))
    if interpreting():
        block_n = 32
        cfg = dict(num_warps=4, num_stages=1)
    else:
        block_n = 64 if max(D, DV) <= 128 else 32
        # fp32 tiles are twice the bytes: fewer stages keep them in shared memory.
        stages = 3 if max(D, DV) <= 128 else 2
        cfg = dict(num_warps=4, num_stages=1 if q.dtype == torch.float32 else stages)
    splits = num_splits or _num_splits(B * Hkv, M, block_n, q.device)
    splits = min(splits, triton.cdiv(M, block_n))
    chunk = triton.cdiv(triton.cdiv(M, splits), block_n) * block_n  # whole key tiles
    splits = triton.cdiv(M, chunk)
    row_blocks = triton.cdiv(rows, block_r)

    if kv_mask is None:
        mask, (smb, smh, smm) = torch.empty(1, dtype=torch.uint8, device=q.device), (0, 0, 0)
    else:
        # [B, H, M] view: broadcast dims get stride 0, nothing is copied.
        mask = kv_mask.expand(B, H, M).view(torch.uint8)
        smb, smh, smm = mask.stride()
    o_part = torch.empty((B, Hkv, splits, rows, DV), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Hkv, splits, rows), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits * row_blocks, Hkv, B)](
        Q=q, K=k, V=v, KVM=mask, O_PART=o_part, LSE_PART=lse_part,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_mb=smb, stride_mh=smh, stride_mm=smm,
        group=group, NQ=NQ, M=M, D=D, DV=DV, qk_scale=scale * _LOG2E,
        chunk=chunk, num_splits=splits, row_blocks=row_blocks,
        CAUSAL=bool(causal), HAS_MASK=kv_mask is not None,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
        EVEN_D=_pow2(D) == D, EVEN_DV=_pow2(DV) == DV,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg,
    )  # fmt: skip
    _decode_combine_kernel[(rows, Hkv, B)](
        O_PART=o_part, LSE_PART=lse_part, Out=out,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_on=out.stride(2),
        stride_od=out.stride(3),
        group=group, NQ=NQ, DV=DV, num_splits=splits,
        BLOCK_S=_pow2(splits, lo=2), BLOCK_DV=_pow2(DV), EVEN_DV=_pow2(DV) == DV,
    )  # fmt: skip
    return out
