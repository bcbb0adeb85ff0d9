"""Sliding-window attention on CPU in O(N·window) time and memory.

Queries are cut into blocks of ``Bq`` rows. The keys a block can see form one
contiguous band: from ``window - 1`` positions before its first query to its last
query (causal) or ``window - 1`` positions past it (bidirectional). Bands of
consecutive blocks are windows of one key sequence at a fixed stride, so
``Tensor.unfold`` gives them all as a strided view without copying K or V, and one
batched matmul scores many blocks at once. Which band key a query sees depends
only on the query's row in its block and the key's column in the band, so that
pattern is one small ``[Bq, band]`` additive mask shared by every block; what
differs per block (padding keys, keys beyond the sequence ends) is an additive
per-key mask added along the band.

Dilation ``d`` splits into ``d`` independent undilated problems: a query at position
``p`` only sees window keys ``j`` with ``j ≡ p (mod d)``, so each residue class of
queries attends a plain sliding window over the same residue class of keys.
Sink keys (the first ``sinks`` positions) are scored separately against every
query and merged into the same softmax; the band hides them so none counts twice.

Memory: blocks are processed in groups whose score tensor holds at most
``max_scores`` elements (by default half the output's bytes, between 64K and 2M
elements); besides the output, only one group's scores and copies of its queries
are alive at a time. No ``[N, M]`` tensor is ever built, and fp32 K and V are only
viewed, except for the few keys of a group whose band runs past either end of the
sequence (fp16/bf16 bands are converted to fp32 one group at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels.dense.reference import compute_dtype

__all__ = ["sliding_window_attention_blockwise"]

_NEG_INF = float("-inf")


def sliding_window_attention_blockwise(
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
    block_size: int = 64,
    max_scores: int | None = None,
) -> torch.Tensor:
    """Sliding-window attention without materialising an ``[N, M]`` tensor.

    Same semantics as
    :func:`~attnopt.kernels.sliding_window.reference.sliding_window_attention_reference`.
    Differentiable through autograd when an input requires grad (then the per-group
    results are kept for backward, O(N·window) memory).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        window: keys each query sees in its window (its own position included).
        sinks: leading keys every query also sees (causal: those at or before it).
        dilation: step between window keys.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` (at key position ``i + M - N``) sees only keys before it.
        block_size: query rows per block (tuning knob).
        max_scores: score elements per group of blocks, which bounds the extra memory;
            default: as many as fill half the output's bytes, clamped to
            ``[2**16, 2**21]``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1000, 16) for _ in range(3))
        >>> sliding_window_attention_blockwise(q, k, v, window=64, causal=True).shape
        torch.Size([1, 2, 1000, 16])
    """
    caller = "sliding_window_attention_blockwise"
    check_attention_inputs(caller, q, k, v, kv_mask)
    check_window_args(caller, window, sinks, dilation)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{caller}: block_size must be a positive int, got {block_size!r}")
    if max_scores is not None and (not isinstance(max_scores, int) or max_scores < 1):
        raise ValueError(f"{caller}: max_scores must be a positive int, got {max_scores!r}")
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _blockwise(
        q,
        k,
        v,
        kv_mask,
        window=window,
        sinks=sinks,
        dilation=dilation,
        scale=scale,
        causal=causal,
        block_size=block_size,
        max_scores=max_scores,
        differentiable=differentiable,
    )


def _blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    window: int,
    sinks: int,
    dilation: int,
    scale: float | None,
    causal: bool,
    block_size: int = 64,
    max_scores: int | None = None,
    differentiable: bool,
) -> torch.Tensor:
    """The kernel behind :func:`sliding_window_attention_blockwise`; inputs already checked.

    ``differentiable=False`` writes each group straight into a preallocated output
    (no autograd graph possible); ``True`` builds the output with out-of-place ops
    only, which autograd and ``torch.func`` transforms can differentiate.
    """
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    R = H // Hkv  # query heads per key/value head
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    d = dilation
    off = M - N  # query i sits at key position i + off
    S = min(sinks, M)
    if N == 0 or B == 0 or H == 0:
        return q.new_zeros(B, H, N, Dv)
    if max_scores is None:
        # One group's scores take at most half the output's bytes: with the output
        # itself the peak stays within about twice what SDPA's fused CPU kernel needs.
        out_bytes = B * H * N * Dv * q.element_size()
        ct_bytes = torch.empty((), dtype=ct).element_size()
        max_scores = min(max(out_bytes // (2 * ct_bytes), 1 << 16), 1 << 21)

    # Additive per-key mask [Bm, Hm, M] (Bm in {1, B}, Hm in {1, H}): -inf for padding
    # keys and, inside the band, for sink keys (the sink pass covers those).
    band_bias = sink_bias = None
    if kv_mask is not None or S > 0:
        km = kv_mask if kv_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
        km = km.to(q.device).reshape((1,) * (3 - km.dim()) + tuple(km.shape))
        km = km.expand(km.shape[0], km.shape[1], M)
        band_bias = torch.zeros(km.shape, dtype=ct, device=q.device).masked_fill_(~km, _NEG_INF)
        sink_bias = band_bias[..., :S].clone()
        band_bias[..., :S] = _NEG_INF

    out = None if differentiable else q.new_empty(B, H, N, Dv)
    batch_pieces = []
    for b in range(B):
        head_pieces = []
        for hk in range(Hkv):
            heads = slice(hk * R, (hk + 1) * R)
            qh, kh, vh = q[b, heads], k[b, hk], v[b, hk]  # [R, N, D], [M, D], [M, Dv]
            kb = sb = None
            if band_bias is not None:
                bi = b if band_bias.shape[0] > 1 else 0
                hsel = heads if band_bias.shape[1] > 1 else slice(0, 1)
                kb, sb = band_bias[bi, hsel], sink_bias[bi, hsel]  # [R|1, M], [R|1, S]
            sink = None
            if S > 0:
                sink = _Sinks(kh[:S].to(ct), vh[:S].to(ct), sb, causal=causal)
            residues = []
            for i0 in range(min(d, N)):
                # Queries i0, i0+d, ... sit at positions congruent to rho (mod d) and
                # see window keys rho, rho+d, ... only: one undilated problem.
                rho = (i0 + off) % d
                groups = _band_groups(
                    qh[:, i0::d],
                    kh[rho::d],
                    vh[rho::d],
                    None if kb is None else kb[:, rho::d],
                    off=(i0 + off - rho) // d,
                    window=window,
                    causal=causal,
                    scale=scale,
                    ct=ct,
                    block_size=block_size,
                    max_scores=max_scores,
                    sink=sink,
                    sink_pos=(i0 + off, d),
                )
                if out is not None:
                    dest = out[b, heads, i0::d]  # [R, n_rho, Dv] strided view
                    for r0, r1, o in groups:
                        dest[:, r0:r1].copy_(o)
                else:
                    residues.append(torch.cat([o for _, _, o in groups], dim=1))
            if out is None:
                head_pieces.append(_interleave(residues, N, d))
        if out is None:
            batch_pieces.append(torch.cat(head_pieces, dim=0))
    if out is not None:
        return out
    return torch.stack(batch_pieces).to(q.dtype)


class _Sinks:
    """Sink keys/values of one kv head and their additive validity mask."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, causal: bool):
        self.k = k  # [S, D]
        self.v = v  # [S, Dv]
        self.bias = bias  # [R|1, S]
        self.causal = causal


def _interleave(residues: list[torch.Tensor], n: int, d: int) -> torch.Tensor:
    """Rows ``i0, i0+d, ...`` of class ``i0`` back into one ``[R, n, Dv]`` tensor."""
    if d == 1:
        return residues[0]
    rows = -(-n // d)
    R, Dv = residues[0].shape[0], residues[0].shape[-1]
    padded = []
    for i0 in range(d):
        part = residues[i0] if i0 < len(residues) else residues[0][:, :0]
        if part.shape[1] < rows:
            fill = part.new_zeros(R, rows - part.shape[1], Dv)
            part = torch.cat([part, fill], dim=1)
        padded.append(part)
    return torch.stack(padded, dim=2).reshape(R, rows * d, Dv)[:, :n]


def _take(x: torch.Tensor, lo: int, hi: int, fill: float) -> torch.Tensor:
    """Rows ``lo:hi`` of ``x`` (dim 0); rows outside ``[0, len(x))`` are ``fill``.

    A view when every row exists, else a copy of just those rows.
    """
    size = x.shape[0]
    if lo >= 0 and hi <= size:
        return x.narrow(0, lo, hi - lo)
    a, z = min(max(lo, 0), size), max(min(hi, size), 0)
    front = max(min(hi, 0) - lo, 0)
    back = max(hi - max(lo, size), 0)
    parts = [x.new_full((front, *x.shape[1:]), fill)]
    if z > a:
        parts.append(x.narrow(0, a, z - a))
    parts.append(x.new_full((back, *x.shape[1:]), fill))
    return torch.cat(parts, dim=0)


_PATTERNS: dict[tuple, torch.Tensor] = {}


def _band_pattern(
    block: int, band: int, span: int, rep: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive ``[rep * block, band]`` mask: row ``r`` of a block sees band columns
    ``r .. r + span`` (the band starts ``left`` keys before the block's first query)."""
    key = (block, band, span, rep, dtype, device)
    pattern = _PATTERNS.get(key)
    if pattern is None:
        r = torch.arange(block, device=device)[:, None]
        c = torch.arange(band, device=device)[None, :]
        seen = (c >= r) & (c <= r + span)  # [block, band]
        pattern = torch.zeros(block, band, dtype=dtype, device=device)
        pattern = pattern.masked_fill_(~seen, _NEG_INF).repeat(rep, 1)
        if len(_PATTERNS) > 64:
            _PATTERNS.clear()
        _PATTERNS[key] = pattern
    return pattern


def _band_groups(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    *,
    off: int,
    window: int,
    causal: bool,
    scale: float,
    ct: torch.dtype,
    block_size: int,
    max_scores: int,
    sink: _Sinks | None,
    sink_pos: tuple[int, int],
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Undilated sliding window for one kv head; yields ``(r0, r1, out[:, r0:r1])``.

    ``q [R, n, D]`` rows sit at key positions ``off, off+1, ...`` of ``k [Mk, D]``,
    ``v [Mk, Dv]``; ``key_bias [R|1, Mk]`` is added to every score of a key. Sink
    keys are at original positions ``0..S-1``; query row ``t`` is at original
    position ``sink_pos[0] + sink_pos[1] * t`` (for the causal test against sinks).
    """
    R, n, D = q.shape
    Mk = k.shape[0]
    # Band reach to the left/right of a query. Keys further than the whole sequence
    # cannot exist, so huge windows are clamped instead of building huge bands.
    left = min(window - 1, Mk)
    right = 0 if causal else min(window - 1, Mk + n + 2)
    Bq = min(block_size, n)
    L = Bq + left + right  # band length
    nb = -(-n // Bq)
    G = max(1, max_scores // (R * Bq * L))  # blocks per group
    pattern = _band_pattern(Bq, L, left + right, R, ct, q.device)  # [R*Bq, L]
    for blk0 in range(0, nb, G):
        g = min(G, nb - blk0)
        r0, r1 = blk0 * Bq, min(n, (blk0 + g) * Bq)
        qg = q[:, r0:r1]  # [R, rows, D]
        if r1 - r0 < g * Bq:
            qg = torch.cat([qg, qg.new_zeros(R, g * Bq - (r1 - r0), D)], dim=1)
        qg = (qg.to(ct) * scale).view(R, g, Bq, D).transpose(0, 1).reshape(g, R * Bq, D)

        lo = r0 + off - left  # key position where the first block's band starts
        hi = lo + (g - 1) * Bq + L
        kw = _take(k, lo, hi, 0.0).to(ct).unfold(0, L, Bq)  # [g, D, L] = Kᵀ per band
        vw = _take(v, lo, hi, 0.0).to(ct).unfold(0, L, Bq).transpose(1, 2)  # [g, L, Dv]
        s = torch.baddbmm(pattern, qg, kw)  # [g, R*Bq, L]
        if key_bias is not None or lo < 0 or hi > Mk:
            kb = key_bias if key_bias is not None else torch.zeros(1, Mk, dtype=ct, device=q.device)
            kb = _take(kb.t(), lo, hi, _NEG_INF).t()  # [R|1, hi-lo]
            kbw = kb.unfold(-1, L, Bq).transpose(0, 1).unsqueeze(2)  # [g, R|1, 1, L]
            s.view(g, R, Bq, L).add_(kbw)

        ss = None
        if sink is not None:
            S = sink.k.shape[0]
            ss = qg @ sink.k.t()  # [g, R*Bq, S]
            bias = sink.bias[None, :, None, :]  # [1, R|1, 1, S]
            if sink.causal:
                base, step = sink_pos
                pos = base + step * torch.arange(r0, r0 + g * Bq, device=q.device)
                seen = torch.arange(S, device=q.device)[None, :] <= pos[:, None]  # [g*Bq, S]
                causal_bias = torch.zeros(seen.shape, dtype=ct, device=q.device)
                bias = bias + causal_bias.masked_fill_(~seen, _NEG_INF).view(g, 1, Bq, S)
            ss.view(g, R, Bq, S).add_(bias)

        # One softmax over band and sink scores. A row with nothing visible has max
        # -inf; subtracting 0 instead keeps its weights exactly 0 (output 0, not NaN).
        m = s.amax(dim=-1, keepdim=True)
        if ss is not None:
            m = torch.maximum(m, ss.amax(dim=-1, keepdim=True))
        m = m.detach().masked_fill(torch.isneginf(m), 0.0)  # [g, R*Bq, 1]
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.bmm(p, vw)  # [g, R*Bq, Dv]
        if ss is not None:
            ps = ss.sub_(m).exp_()
            denom = denom + ps.sum(dim=-1, keepdim=True)
            o = o + ps @ sink.v
        o = o / torch.where(denom > 0, denom, torch.ones_like(denom))
        o = o.view(g, R, Bq, -1).transpose(0, 1).reshape(R, g * Bq, -1)[:, : r1 - r0]
        yield r0, r1, o
