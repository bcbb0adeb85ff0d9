"""Sliding-window attention on CPU in O(N·window) time and memory, forward and backward.

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

The backward recomputes each group's weights ``P`` and applies the softmax
gradient ``dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))``; the key and value gradients of
overlapping bands are summed back into place (overlap-add).

Memory: blocks are processed in groups whose score tensor holds at most
``max_scores`` elements (by default half the output's bytes, between 64K and 2M
elements), and every group reuses the same buffers. Besides the results, only one
group's scores and copies of its queries are alive at a time. No ``[N, M]`` tensor
is ever built, and fp32 K and V are only viewed, except for the few keys of a group
whose band runs past either end of the sequence (fp16/bf16 bands are converted to
fp32 one group at a time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from attnopt.kernels._checks import check_attention_inputs, check_window_args
from attnopt.kernels.dense.reference import compute_dtype

__all__ = [
    "sliding_window_attention_blockwise",
    "sliding_window_backward",
    "sliding_window_forward",
]

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
    block_size: int | None = None,
    max_scores: int | None = None,
) -> torch.Tensor:
    """Sliding-window attention without materialising an ``[N, M]`` tensor.

    Same semantics as
    :func:`~attnopt.kernels.sliding_window.reference.sliding_window_attention_reference`.
    Differentiable once (q, k and v) with the blockwise backward.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        window: keys each query sees in its window (its own position included).
        sinks: leading keys every query also sees (causal: those at or before it).
        dilation: step between window keys.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` (at key position ``i + M - N``) sees only keys before it.
        block_size: query rows per block; default ``window // 8`` clamped to
            ``[16, 64]`` (each block scores ``block_size + window - 1`` keys per row, so
            small blocks waste less, but too small ones make inefficient matmuls).
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
    for name, value in (("block_size", block_size), ("max_scores", max_scores)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{caller}: {name} must be a positive int or None, got {value!r}")
    kw = dict(
        window=window,
        sinks=sinks,
        dilation=dilation,
        scale=scale,
        causal=causal,
        block_size=block_size,
        max_scores=max_scores,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _BlockwiseAttention.apply(q, k, v, kv_mask, kw)
    return sliding_window_forward(q, k, v, kv_mask, **kw)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_mask, kw):
        ctx.save_for_backward(q, k, v, kv_mask)
        ctx.kw = kw
        return sliding_window_forward(q, k, v, kv_mask, **kw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, kv_mask = ctx.saved_tensors
        dq, dk, dv = sliding_window_backward(grad_out, q, k, v, kv_mask, **ctx.kw)
        return dq, dk, dv, None, None


# -- geometry shared by forward and backward ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Sizes and per-key masks of one call, derived once from its inputs."""

    B: int
    H: int
    Hkv: int
    R: int  # query heads per kv head
    N: int
    M: int
    D: int
    Dv: int
    ct: torch.dtype  # compute dtype
    scale: float
    window: int
    dilation: int
    causal: bool
    S: int  # sink keys that exist
    block_size: int
    max_scores: int
    band_bias: torch.Tensor | None  # [Bm, Hm, M] additive: padding and sink keys -inf
    sink_bias: torch.Tensor | None  # [Bm, Hm, S] additive: padding -inf

    @property
    def off(self) -> int:
        return self.M - self.N  # query i sits at key position i + off


def _plan(q, k, v, kv_mask, *, window, sinks, dilation, scale, causal, block_size, max_scores):
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    ct = compute_dtype(q.dtype)
    S = min(sinks, M)
    if block_size is None:
        block_size = min(64, max(16, window // 8))
    if max_scores is None:
        # One group's scores take at most half the output's bytes: with the output
        # itself the peak stays within about twice what SDPA's fused CPU kernel needs.
        out_bytes = B * H * N * Dv * q.element_size()
        ct_bytes = torch.empty((), dtype=ct).element_size()
        max_scores = min(max(out_bytes // (2 * ct_bytes), 1 << 16), 1 << 21)
    band_bias = sink_bias = None
    if kv_mask is not None or S > 0:
        km = kv_mask if kv_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
        km = km.to(q.device).reshape((1,) * (3 - km.dim()) + tuple(km.shape))
        km = km.expand(km.shape[0], km.shape[1], M)
        band_bias = torch.zeros(km.shape, dtype=ct, device=q.device).masked_fill_(~km, _NEG_INF)
        sink_bias = band_bias[..., :S].clone()
        band_bias[..., :S] = _NEG_INF  # the sink pass covers these keys
    return _Plan(
        B=B,
        H=H,
        Hkv=Hkv,
        R=H // Hkv,
        N=N,
        M=M,
        D=D,
        Dv=Dv,
        ct=ct,
        scale=1.0 / math.sqrt(D) if scale is None else float(scale),
        window=window,
        dilation=dilation,
        causal=causal,
        S=S,
        block_size=block_size,
        max_scores=max_scores,
        band_bias=band_bias,
        sink_bias=sink_bias,
    )


@dataclasses.dataclass(frozen=True)
class _Sub:
    """One undilated problem: kv head ``hk`` of batch ``b``, query rows ``i0::d``,
    key rows ``rho::d``; its queries sit at key positions ``off, off+1, ...``."""

    b: int
    hk: int
    heads: slice
    i0: int
    rho: int
    off: int
    key_bias: torch.Tensor | None  # [R|1, M] (all keys; callers take rho::d)
    sink_bias: torch.Tensor | None  # [R|1, S]


def _subproblems(plan: _Plan) -> Iterator[_Sub]:
    d = plan.dilation
    for b in range(plan.B):
        for hk in range(plan.Hkv):
            heads = slice(hk * plan.R, (hk + 1) * plan.R)
            kb = sb = None
            if plan.band_bias is not None:
                bi = b if plan.band_bias.shape[0] > 1 else 0
                hsel = heads if plan.band_bias.shape[1] > 1 else slice(0, 1)
                kb, sb = plan.band_bias[bi, hsel], plan.sink_bias[bi, hsel]
            for i0 in range(min(d, plan.N)):
                # Queries i0, i0+d, ... sit at positions congruent to rho (mod d) and
                # see window keys rho, rho+d, ... only.
                rho = (i0 + plan.off) % d
                yield _Sub(b, hk, heads, i0, rho, (i0 + plan.off - rho) // d, kb, sb)


@dataclasses.dataclass(frozen=True)
class _Band:
    """Block geometry of one undilated problem with ``n`` queries and ``Mk`` keys."""

    Bq: int  # query rows per block
    left: int  # band keys before a block's first query
    L: int  # band length
    nb: int  # blocks
    G: int  # blocks per group

    @staticmethod
    def make(plan: _Plan, n: int, Mk: int) -> _Band:
        # Keys further than the whole sequence cannot exist, so huge windows are
        # clamped instead of building huge bands.
        left = min(plan.window - 1, Mk)
        right = 0 if plan.causal else min(plan.window - 1, Mk + n + 2)
        Bq = min(plan.block_size, n)
        L = Bq + left + right
        G = max(1, plan.max_scores // (plan.R * Bq * L))
        return _Band(Bq=Bq, left=left, L=L, nb=-(-n // Bq), G=G)

    def groups(self) -> Iterator[tuple[int, int]]:
        """``(first block, number of blocks)`` of each group."""
        for blk0 in range(0, self.nb, self.G):
            yield blk0, min(self.G, self.nb - blk0)


class _Workspace:
    """Buffers reused from group to group (fresh multi-MiB tensors per group would
    cost a page fault per 4 KiB page, a large part of the run time)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


_PATTERNS: dict[tuple, torch.Tensor] = {}


def _band_pattern(band: _Band, plan: _Plan, device: torch.device) -> torch.Tensor:
    """Additive ``[R * Bq, L]`` mask: row ``r`` of a block sees band columns
    ``r .. r + L - Bq`` (the band starts ``left`` keys before the block's first query)."""
    key = (band.Bq, band.L, plan.R, plan.ct, device)
    pattern = _PATTERNS.get(key)
    if pattern is None:
        r = torch.arange(band.Bq, device=device)[:, None]
        c = torch.arange(band.L, device=device)[None, :]
        seen = (c >= r) & (c <= r + band.L - band.Bq)  # [Bq, L]
        pattern = torch.zeros(band.Bq, band.L, dtype=plan.ct, device=device)
        pattern = pattern.masked_fill_(~seen, _NEG_INF).repeat(plan.R, 1)
        if len(_PATTERNS) > 64:
            _PATTERNS.clear()
        _PATTERNS[key] = pattern
    return pattern


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


def _load_rows(
    src: torch.Tensor, r0: int, r1: int, g: int, Bq: int, scale: float, buf: torch.Tensor
) -> torch.Tensor:
    """Rows ``r0:r1`` of ``src [R, n, C]`` times ``scale`` into ``buf [g, R, Bq, C]``
    (block-major, tail rows zero); returns ``buf`` as ``[g, R*Bq, C]``."""
    R, C = src.shape[0], src.shape[-1]
    rows = r1 - r0
    full = rows // Bq
    if full:
        buf[:full].copy_(src[:, r0 : r0 + full * Bq].unflatten(1, (full, Bq)).transpose(0, 1))
    rest = rows - full * Bq
    if rest:
        buf[full, :, :rest].copy_(src[:, r1 - rest : r1])
        buf[full, :, rest:].zero_()
    if scale != 1.0:
        buf.mul_(scale)
    return buf.view(g, R * Bq, C)


def _store_rows(dest: torch.Tensor, r0: int, r1: int, o: torch.Tensor) -> None:
    """Write group rows ``o [g, R, Bq, C]`` into rows ``r0:r1`` of ``dest [R, n, C]``."""
    Bq = o.shape[2]
    full = (r1 - r0) // Bq
    if full:
        dest[:, r0 : r0 + full * Bq].unflatten(1, (full, Bq)).copy_(o[:full].transpose(0, 1))
    if r0 + full * Bq < r1:
        dest[:, r0 + full * Bq : r1].copy_(o[full, :, : r1 - r0 - full * Bq])


def _overlap_add(
    dest: torch.Tensor, lo: int, windows: torch.Tensor, Bq: int, ws: _Workspace
) -> None:
    """Add band windows ``[g, L, C]`` (window ``t`` starts at row ``lo + t*Bq``) into
    ``dest [Mk, C]``; rows outside ``[0, Mk)`` are dropped."""
    g, L, C = windows.shape
    chunks = -(-L // Bq)
    acc = ws.get("acc", (g - 1 + chunks, Bq, C), windows.dtype, windows.device).zero_()
    for c in range(chunks):
        width = min(Bq, L - c * Bq)
        acc[c : c + g, :width] += windows[:, c * Bq : c * Bq + width]
    span = (g - 1) * Bq + L
    a, z = max(lo, 0), min(lo + span, dest.shape[0])
    if z > a:
        dest[a:z] += acc.view(-1, C)[a - lo : z - lo]


# -- one group: scores and softmax weights ------------------------------------------------------


def _group_weights(
    plan: _Plan,
    band: _Band,
    pattern: torch.Tensor,
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    sink: tuple | None,
    r0: int,
    g: int,
    sub: _Sub,
    ws: _Workspace,
):
    """Unnormalised weights of one group: ``(p [g, R*Bq, L], ps [g, R*Bq, S] | None,
    denom [g, R*Bq, 1], kw [g, D, L], vw [g, L, Dv], lo)``.

    ``qg`` holds the group's scaled queries; ``k [Mk, D]``, ``v [Mk, Dv]`` and
    ``key_bias [R|1, Mk]`` are the problem's keys. Row sums of ``p`` plus ``ps`` are
    ``denom``, which is 1 for rows that see no key (their weights are all 0).
    """
    R, Bq, L, ct = plan.R, band.Bq, band.L, plan.ct
    Mk = k.shape[0]
    lo = r0 + sub.off - band.left  # key position where the first block's band starts
    hi = lo + (g - 1) * Bq + L
    kw = _take(k, lo, hi, 0.0).to(ct).unfold(0, L, Bq)  # [g, D, L] = Kᵀ per band
    vw = _take(v, lo, hi, 0.0).to(ct).unfold(0, L, Bq).transpose(1, 2)  # [g, L, Dv]
    s = ws.get("s", (g, R * Bq, L), ct, qg.device)
    torch.baddbmm(pattern, qg, kw, out=s)
    if key_bias is not None or lo < 0 or hi > Mk:
        kb = key_bias if key_bias is not None else torch.zeros(1, Mk, dtype=ct, device=qg.device)
        kb = _take(kb.t(), lo, hi, _NEG_INF).t()  # [R|1, hi-lo]
        s.view(g, R, Bq, L).add_(kb.unfold(-1, L, Bq).transpose(0, 1).unsqueeze(2))

    ss = None
    if sink is not None:
        sk, _, sb = sink
        S = sk.shape[0]
        ss = qg @ sk.t()  # [g, R*Bq, S]
        bias = sb[None, :, None, :]  # [1, R|1, 1, S]
        if plan.causal:
            # Query row t of this problem is at original position i0 + off + d*t.
            pos = sub.i0 + plan.off + plan.dilation * torch.arange(r0, r0 + g * Bq)
            seen = torch.arange(S)[None, :] <= pos[:, None]  # [g*Bq, S]
            causal_bias = torch.zeros(seen.shape, dtype=ct).masked_fill_(~seen, _NEG_INF)
            bias = bias + causal_bias.to(qg.device).view(g, 1, Bq, S)
        ss.view(g, R, Bq, S).add_(bias)

    # One softmax over band and sink scores. A row with nothing visible has max -inf;
    # subtracting 0 instead keeps its weights exactly 0 (output 0, not NaN).
    m = torch.amax(s, dim=-1, keepdim=True)
    if ss is not None:
        m = torch.maximum(m, ss.amax(dim=-1, keepdim=True))
    m.masked_fill_(torch.isneginf(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    ps = None
    if ss is not None:
        ps = ss.sub_(m).exp_()
        denom += ps.sum(dim=-1, keepdim=True)
    denom.masked_fill_(denom == 0, 1.0)
    return p, ps, denom, kw, vw, lo


def _sinks(plan: _Plan, sub: _Sub, kh: torch.Tensor, vh: torch.Tensor):
    if plan.S == 0:
        return None
    return kh[: plan.S].to(plan.ct), vh[: plan.S].to(plan.ct), sub.sink_bias


# -- forward and backward ----------------------------------------------------------------------


def sliding_window_forward(
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
    block_size: int | None = None,
    max_scores: int | None = None,
) -> torch.Tensor:
    """Blockwise forward (no autograd); inputs must already be checked."""
    plan = _plan(
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
    )
    out = q.new_empty(plan.B, plan.H, plan.N, plan.Dv)
    if out.numel() == 0:
        return out
    d, R, ct, dev = plan.dilation, plan.R, plan.ct, q.device
    ws = _Workspace()
    with torch.no_grad():
        for sub in _subproblems(plan):
            qs = q[sub.b, sub.heads, sub.i0 :: d]  # [R, n, D]
            ks, vs = k[sub.b, sub.hk, sub.rho :: d], v[sub.b, sub.hk, sub.rho :: d]
            kb = None if sub.key_bias is None else sub.key_bias[:, sub.rho :: d]
            sink = _sinks(plan, sub, k[sub.b, sub.hk], v[sub.b, sub.hk])
            dest = out[sub.b, sub.heads, sub.i0 :: d]  # [R, n, Dv]
            band = _Band.make(plan, qs.shape[1], ks.shape[0])
            pattern = _band_pattern(band, plan, dev)
            Bq = band.Bq
            for blk0, g in band.groups():
                r0, r1 = blk0 * Bq, min(qs.shape[1], (blk0 + g) * Bq)
                qg = _load_rows(
                    qs, r0, r1, g, Bq, plan.scale, ws.get("q", (g, R, Bq, plan.D), ct, dev)
                )
                p, ps, denom, _, vw, _ = _group_weights(
                    plan, band, pattern, qg, ks, vs, kb, sink, r0, g, sub, ws
                )
                o = ws.get("o", (g, R * Bq, plan.Dv), ct, dev)
                torch.bmm(p, vw, out=o)
                if ps is not None:
                    o.baddbmm_(ps, sink[1].expand(g, -1, -1))
                o.div_(denom)
                _store_rows(dest, r0, r1, o.view(g, R, Bq, plan.Dv))
    return out


def sliding_window_backward(
    grad_out: torch.Tensor,
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
    block_size: int | None = None,
    max_scores: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`sliding_window_forward` for ``grad_out``.

    Recomputes each group's weights ``P``; with ``O = P·V`` and ``Δ = rowsum(dO ∘ O)``:
    ``dV = Pᵀ·dO``, ``dS = P ∘ (dO·Vᵀ − Δ)``, ``dQ = scale·dS·K``, ``dK = dSᵀ·(scale·Q)``.
    """
    plan = _plan(
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
    )
    d, R, ct, dev = plan.dilation, plan.R, plan.ct, q.device
    D, Dv = plan.D, plan.Dv
    dq = q.new_empty(q.shape)
    dk = torch.zeros(k.shape, dtype=ct, device=dev)  # summed over groups, kept in ct
    dv = torch.zeros(v.shape, dtype=ct, device=dev)
    if dq.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    ws = _Workspace()
    with torch.no_grad():
        for sub in _subproblems(plan):
            qs = q[sub.b, sub.heads, sub.i0 :: d]  # [R, n, D]
            gs = grad_out[sub.b, sub.heads, sub.i0 :: d]  # [R, n, Dv]
            ks, vs = k[sub.b, sub.hk, sub.rho :: d], v[sub.b, sub.hk, sub.rho :: d]
            dks, dvs = dk[sub.b, sub.hk, sub.rho :: d], dv[sub.b, sub.hk, sub.rho :: d]
            kb = None if sub.key_bias is None else sub.key_bias[:, sub.rho :: d]
            sink = _sinks(plan, sub, k[sub.b, sub.hk], v[sub.b, sub.hk])
            dest = dq[sub.b, sub.heads, sub.i0 :: d]
            band = _Band.make(plan, qs.shape[1], ks.shape[0])
            pattern = _band_pattern(band, plan, dev)
            Bq, L = band.Bq, band.L
            for blk0, g in band.groups():
                r0, r1 = blk0 * Bq, min(qs.shape[1], (blk0 + g) * Bq)
                qg = _load_rows(qs, r0, r1, g, Bq, plan.scale, ws.get("q", (g, R, Bq, D), ct, dev))
                dog = _load_rows(gs, r0, r1, g, Bq, 1.0, ws.get("do", (g, R, Bq, Dv), ct, dev))
                p, ps, denom, kw, vw, lo = _group_weights(
                    plan, band, pattern, qg, ks, vs, kb, sink, r0, g, sub, ws
                )
                p.div_(denom)  # normalised weights P
                o = ws.get("o", (g, R * Bq, Dv), ct, dev)
                torch.bmm(p, vw, out=o)
                if ps is not None:
                    ps.div_(denom)
                    o.baddbmm_(ps, sink[1].expand(g, -1, -1))
                delta = (o.mul_(dog)).sum(dim=-1, keepdim=True)  # [g, R*Bq, 1]

                # Value gradient of each band, then dS in place of dP.
                dvw = torch.bmm(p.transpose(1, 2), dog, out=ws.get("dvw", (g, L, Dv), ct, dev))
                _overlap_add(dvs, lo, dvw, Bq, ws)
                ds = ws.get("ds", (g, R * Bq, L), ct, dev)
                torch.bmm(dog, vw.transpose(1, 2), out=ds)
                ds.sub_(delta).mul_(p)

                dqg = torch.bmm(ds, kw.transpose(1, 2), out=ws.get("dq", (g, R * Bq, D), ct, dev))
                dkw = torch.bmm(ds.transpose(1, 2), qg, out=ws.get("dkw", (g, L, D), ct, dev))
                _overlap_add(dks, lo, dkw, Bq, ws)
                if ps is not None:
                    sk, sv, _ = sink
                    dps = dog @ sv.t()  # [g, R*Bq, S]
                    dss = dps.sub_(delta).mul_(ps)
                    dqg.baddbmm_(dss, sk.expand(g, -1, -1))
                    dk[sub.b, sub.hk, : plan.S] += (dss.transpose(1, 2) @ qg).sum(0)
                    dv[sub.b, sub.hk, : plan.S] += (ps.transpose(1, 2) @ dog).sum(0)
                dqg.mul_(plan.scale)
                _store_rows(dest, r0, r1, dqg.view(g, R, Bq, D))
    return dq, dk.to(k.dtype), dv.to(v.dtype)
