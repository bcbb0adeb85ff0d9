"""The dynamic block selection in Triton: pooled Q and K, block logits, top-k or threshold.

Computes the same :class:`~attnopt.kernels.block_sparse.selection.BlockSelection` as
:func:`~attnopt.kernels.block_sparse.selection.select_blocks` with
``pattern="dynamic"`` (see its module docstring for the rule), up to the order of
exactly tied logits, in three kernels:

* pooling, per (batch, head, block): the mean of the rows of one block (queries: the
  rows of a query block; keys: the visible keys of a key block, weighted by
  ``kv_mask``) and, for keys, the number of visible keys ``n_c``;
* logits, per tile of (query blocks × key blocks): ``pooled_q · pooled_k · scale +
  log(n_c)``, ``-inf`` where causality forbids the block, into an fp32
  ``[B, H, nQ, nK]`` buffer (the one tensor of that size, as in ``select_blocks``);
* choice, per (batch, head, query block), the whole row of logits in registers: the
  forced blocks (local band and sinks) come from the geometry; the candidates are
  sorted once (``tl.sort`` of int64 keys that pack the order-preserving bits of the
  logit above the block number, so the sort carries the indices and every key is
  distinct); the number ``n`` of candidates to keep follows from ``topk`` or, for a
  threshold, from the cumulative softmax mass in sorted order; a candidate is kept iff
  its key is at least the ``n``-th largest; kept blocks are written in increasing
  order through a prefix sum.

Rows of more than ``_MAX_ROW`` key blocks would not fit in registers: there the choice
is made by ``select_blocks``' own PyTorch code on the Triton logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.kernels._triton import triton_runs_on
from attnopt.kernels.block_sparse.selection import (
    BlockSelection,
    _select_rows,
    block_layout,
    pattern_blocks,
    select_blocks,
)

__all__ = ["block_logits_triton", "select_blocks_triton"]

_MAX_ROW = 4096  # key blocks per row the choice kernel holds in registers


@triton.jit
def _pool_kernel(
    X, W, OUT, TOT,
    sxb, sxh, sxl, sxd,
    swb, swh, swl,
    HP, G, L, D, offset, first_block, block, nblocks,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, R_SUB: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    """Mean of the (weighted) rows of one block: ``OUT [B, HP, nblocks, D]`` and the
    total weight ``TOT [B, HP, nblocks]``, both contiguous fp32. Row ``i`` of ``X`` sits
    at position ``i + offset``; pooled head ``hp`` reads head ``hp // G`` of ``X``."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HP).to(tl.int64)
    hp = (pid_bh % HP).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = X + b * sxb + (hp // G) * sxh
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for rs in tl.static_range(R_SUB):
        in_b = rs * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = (first_block + blk) * block + in_b - offset
        ok = (in_b < block) & (rows >= 0) & (rows < L)
        x = tl.load(x_base + rows[:, None] * sxl + offs_d[None, :] * sxd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        w = ok.to(tl.float32)
        if HAS_W:
            w = tl.load(W + b * swb + hp * swh + rows * swl, mask=ok, other=0).to(tl.float32)
        acc += x.to(tl.float32) * w[:, None]
        total += w
    tot = tl.sum(total, 0)
    mean = tl.sum(acc, 0) / tl.maximum(tot, 1.0)
    row = (b * HP + hp) * nblocks + blk
    tl.store(OUT + row * D + offs_d, mean, mask=d_ok)
    tl.store(TOT + row, tot)


@triton.jit
def _logits_kernel(
    PQ, PK, TOT, LOGITS,
    H, G, nq, nk, D, first_block, scale,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    """``LOGITS [B, H, nq, nk]`` from pooled queries ``PQ [B, H, nq, D]``, pooled keys
    ``PK [B, H // G, nk, D]`` and their visible-key counts ``TOT [B, H // G, nk]``."""
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hp = h // G
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    j_ok = offs_j < nq
    c_ok = offs_c < nk
    d_ok = offs_d < D
    pq = tl.load(PQ + ((b * H + h) * nq + offs_j[:, None]) * D + offs_d[None, :],
                 mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    kbase = (b * (H // G) + hp) * nk
    pkt = tl.load(PK + (kbase + offs_c[None, :]) * D + offs_d[:, None],
                  mask=c_ok[None, :] & d_ok[:, None], other=0.0)  # fmt: skip
    tot = tl.load(TOT + kbase + offs_c, mask=c_ok, other=0.0)
    logn = tl.where(tot > 0, tl.log(tl.maximum(tot, 1.0)), float("-inf"))
    logits = tl.dot(pq, pkt, input_precision="ieee") * scale + logn[None, :]
    if CAUSAL:
        allowed = offs_c[None, :] <= (first_block + offs_j)[:, None]
        logits = tl.where(allowed, logits, float("-inf"))
    tl.store(LOGITS + ((b * H + h) * nq + offs_j[:, None]) * nk + offs_c[None, :], logits,
             mask=j_ok[:, None] & c_ok[None, :])  # fmt: skip


@triton.jit
def _ordered_key(x, offs, BLOCK: tl.constexpr):
    """Distinct int64 keys ordered as the fp32 ``x`` (ties: the lower block first)."""
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flipping all but the sign bit fixes it.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (BLOCK - 1 - offs).to(tl.int64)


@triton.jit
def _choose_kernel(
    LOGITS, IDX, CNT,
    H, nq, nk, width, first_block, local_blocks, sink_blocks, topk, threshold,
    BLOCK: tl.constexpr, CAUSAL: tl.constexpr, TOPK: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    """Kept blocks of one query block: ``IDX [B, H, nq, width]`` (zero-filled by the
    caller) and ``CNT [B, H, nq]``, int32. ``PARTIAL``: ``threshold < 1``."""
    j = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    row = pid_bh * nq + j
    offs = tl.arange(0, BLOCK)
    exists = offs < nk
    logits = tl.load(LOGITS + row * nk + offs, mask=exists, other=float("-inf"))
    r = first_block + j
    d = r - offs
    if CAUSAL:
        allowed = exists & (d >= 0)
        dist = d
    else:
        allowed = exists
        dist = tl.abs(d)
    forced = allowed & ((dist < local_blocks) | (offs < sink_blocks))
    cand = allowed & (~forced) & (logits > float("-inf"))
    ncand = tl.sum(cand.to(tl.int32), 0)
    keys = _ordered_key(tl.where(cand, logits, float("-inf")), offs, BLOCK)
    ranked = tl.sort(keys, descending=True)  # candidates first, best first
    if TOPK:
        nforced = tl.sum(forced.to(tl.int32), 0)
        nkeep = tl.minimum(tl.maximum(topk - nforced, 0), ncand)
    else:
        # Softmax over the allowed blocks (forced ones included), as select_blocks does.
        mx = tl.max(tl.where(allowed, logits, float("-inf")), 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.where(allowed, tl.exp(logits - mx), 0.0)
        den = tl.sum(e, 0)
        den = tl.where(den > 0, den, 1.0)
        forced_mass = tl.sum(tl.where(forced, e, 0.0), 0) / den
        if PARTIAL:
            # The logit back from the key's high bits, for the mass in sorted order.
            hi = (ranked >> 32).to(tl.int32)
            sorted_logits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
            is_cand = offs < ncand
            ps = tl.where(is_cand, tl.exp(sorted_logits - mx), 0.0) / den
            before = tl.cumsum(ps, 0) - ps
            keep = is_cand & (forced_mass + before < threshold)
            nkeep = tl.sum(keep.to(tl.int32), 0)
        else:
            nkeep = ncand
    smallest = tl.min(keys, 0)
    cutoff = tl.max(tl.where(offs == nkeep - 1, ranked, smallest), 0)
    kept = forced | (cand & (keys >= cutoff) & (nkeep > 0))
    slot = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(IDX + row * width + slot, offs, mask=kept)
    tl.store(CNT + row, tl.sum(kept.to(tl.int32), 0))


def _pool(x, weight, offset, block, first, nblocks, heads):
    """Launch :func:`_pool_kernel`: means ``[B, heads, nblocks, D]`` and totals
    ``[B, heads, nblocks]`` (fp32) of ``x [B, Hx, L, D]`` (``heads`` a multiple of Hx),
    weighted by ``weight`` (uint8 ``[B, heads, L]`` view) when given."""
    B, Hx, L, D = x.shape
    out = torch.empty(B, heads, nblocks, D, dtype=torch.float32, device=x.device)
    tot = torch.empty(B, heads, nblocks, dtype=torch.float32, device=x.device)
    w = weight if weight is not None else x.new_ones(1, 1, 1, dtype=torch.uint8)
    sw = weight.stride() if weight is not None else (0, 0, 0)
    br = min(64, max(16, triton.next_power_of_2(block)))
    _pool_kernel[(nblocks, B * heads)](
        x, w, out, tot, *x.stride(), *sw,
        heads, heads // Hx, L, D, offset, first, block, nblocks,
        BLOCK_R=br, BLOCK_D=max(16, triton.next_power_of_2(D)), R_SUB=triton.cdiv(block, br),
        HAS_W=weight is not None,
    )  # fmt: skip
    return out, tot


def _check(caller: str, q: torch.Tensor) -> None:
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: Triton kernels run on CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got tensors on {q.device}"
        )
    if q.shape[-1] > 256:
        raise ValueError(
            f"{caller}: head dim D must be in [1, 256] for the Triton kernels, got {q.shape[-1]}"
        )


def block_logits_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    block: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Block logits ``pooled_q · pooled_k · scale + log(n_c)``, ``-inf`` where causality
    forbids a block or the key block holds only padding.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``, ``H % Hkv == 0`` (checked by callers).
        kv_mask: optional bool broadcastable to ``[B, H, M]``.
        block, causal, scale: as in :func:`select_blocks`.

    Returns:
        fp32 ``[B, H, nQ, nK]``.
    """
    _check("block_logits_triton", q)
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    layout = block_layout(N, M, block, causal)
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    pq, _ = _pool(q, None, layout.offset, block, layout.first_block, nq, H)
    weight = None
    heads = Hkv
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
        # Per-query-head masks pool K once per query head; else once per kv head.
        heads = H if km.shape[1] > 1 else Hkv
        weight = km.expand(B, heads, M).view(torch.uint8)  # bytes: a plain pointer
    pk, tot = _pool(k, weight, 0, block, 0, nk, heads)
    logits = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    bj, bc = 16, 64
    _logits_kernel[(triton.cdiv(nq, bj), triton.cdiv(nk, bc), B * H)](
        pq, pk, tot, logits, H, H // heads, nq, nk, D, layout.first_block, float(scale),
        BLOCK_J=bj, BLOCK_C=bc, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
    )  # fmt: skip
    return logits


def select_blocks_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    block: int,
    causal: bool,
    scale: float,
    pattern: str = "dynamic",
    topk: int | None = None,
    threshold: float | None = None,
    local_blocks: int = 1,
    sink_blocks: int = 1,
) -> BlockSelection:
    """:func:`~attnopt.kernels.block_sparse.selection.select_blocks` with the dynamic
    pattern computed by Triton kernels (static patterns do not look at the inputs and
    are built by ``select_blocks`` itself).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``, ``H % Hkv == 0``, ``D <= 256``; CUDA
            (or CPU under ``TRITON_INTERPRET=1``). Inputs are assumed checked.
        kv_mask: optional bool broadcastable to ``[B, H, M]``.
        block, causal, scale, pattern, topk, threshold, local_blocks, sink_blocks: as in
            :class:`~attnopt.kernels.block_sparse.BlockSparse` (assumed checked).

    Returns:
        :class:`BlockSelection`, the same as ``select_blocks`` gives (kept blocks of
        exactly tied logits may differ).

    Example:
        >>> q, k = (torch.randn(1, 2, 256, 16, device="cuda") for _ in range(2))
        >>> select_blocks_triton(q, k, block=64, causal=True, scale=0.25, topk=2).count.tolist()
        [[[1, 2, 2, 2], [1, 2, 2, 2]]]
    """
    geo = dict(
        block=block,
        causal=causal,
        scale=scale,
        pattern=pattern,
        topk=topk,
        threshold=threshold,
        local_blocks=local_blocks,
        sink_blocks=sink_blocks,
    )
    B, H, N, _ = q.shape
    M = k.shape[2]
    layout = block_layout(N, M, block, causal)
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    if pattern != "dynamic" or nq == 0 or nk == 0 or B * H == 0:
        return select_blocks(q, k, kv_mask, **geo)
    _check("select_blocks_triton", q)
    with torch.no_grad():
        logits = block_logits_triton(q, k, kv_mask, block=block, causal=causal, scale=scale)
        row = max(16, triton.next_power_of_2(nk))
        if row > _MAX_ROW:
            forced, allowed = pattern_blocks(
                layout,
                causal=causal,
                pattern="dynamic",
                local_blocks=local_blocks,
                sink_blocks=sink_blocks,
                device=q.device,
            )
            return _select_rows(logits, forced, allowed, topk, threshold)
        # Forced blocks: the band (both sides when bidirectional) and the sinks.
        most_forced = (local_blocks if causal else 2 * local_blocks - 1) + sink_blocks
        width = nk if topk is None else min(nk, max(topk, most_forced))
        index = torch.zeros(B, H, nq, width, dtype=torch.int32, device=q.device)
        count = torch.empty(B, H, nq, dtype=torch.int32, device=q.device)
        _choose_kernel[(nq, B * H)](
            logits, index, count,
            H, nq, nk, width, layout.first_block, local_blocks, sink_blocks,
            0 if topk is None else topk, 1.0 if threshold is None else float(threshold),
            BLOCK=row, CAUSAL=causal, TOPK=topk is not None,
            PARTIAL=threshold is not None and threshold < 1.0,
        )  # fmt: skip
        used = int(count.max())
        return BlockSelection(index[..., :used].contiguous(), count)
