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
``max_scores`` elements (by default a quarter of the output's bytes, between 256K
and 1M elements), and every group reuses the same buffers. Besides the results,
only one group's scores and copies of its queries are alive at a time, and no
``[N, M]`` tensor is ever built. A long sequence is processed one kv head at a time,
where fp32 K and V bands are views (keys of a band running past either end of the
sequence are padded copies; fp16/bf16 bands are converted one group at a time). A
head whose whole problem is small shares a group with other heads instead, which
copies their bands but saves the fixed cost of many small groups (LLM decoding,
short sequences with many heads).
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
            default: as many as fill a quarter of the output's bytes, clamped to
            ``[2**18, 2**20]``.

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
    """Sizes and per-key masks of one call, derived once from its inputs.

    Key/value heads are numbered ``bh = b * Hkv + hk`` over batch and kv heads; each
    owns ``R`` query heads.
    """

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
    band_bias: torch.Tensor | None  # [B*Hkv | 1, R | 1, M] additive; padding, sinks -inf
    sink_bias: torch.Tensor | None  # [B*Hkv | 1, R | 1, S] additive; padding -inf

    @property
    def off(self) -> int:
        return self.M - self.N  # query i sits at key position i + off

    @property
    def kv_heads(self) -> int:
        return self.B * self.Hkv


def _plan(q, k, v, kv_mask, *, window, sinks, dilation, scale, causal, block_size, max_scores):
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    R = H // Hkv
    Dv = v.shape[-1]
    ct = compute_dtype(q.dtype)
    S = min(sinks, M)
    if block_size is None:
        block_size = min(64, max(16, window // 8))
    if max_scores is None:
        # One group's scores take at most a quarter of the output's bytes, so with
        # the output itself and the group's other buffers the peak stays well within
        # twice what SDPA's fused CPU kernel needs. Larger groups are not faster.
        out_bytes = B * H * N * Dv * q.element_size()
        ct_bytes = torch.empty((), dtype=ct).element_size()
        max_scores = min(max(out_bytes // (4 * ct_bytes), 1 << 18), 1 << 20)
    band_bias = sink_bias = None
    if kv_mask is not None or S > 0:
        km = kv_mask if kv_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
        km = km.to(q.device).reshape((1,) * (3 - km.dim()) + tuple(km.shape))  # [Bm, Hm, *]
        if km.shape[0] == 1 and km.shape[1] == 1:
            km = km.expand(1, 1, M)
        elif km.shape[1] == 1:
            km = km.expand(B, 1, M).unsqueeze(1).expand(B, Hkv, 1, M).reshape(B * Hkv, 1, M)
        else:
            km = km.expand(B, H, M).reshape(B * Hkv, R, M)
        band_bias = torch.zeros(km.shape, dtype=ct, device=q.device).masked_fill_(~km, _NEG_INF)
        sink_bias = band_bias[..., :S].clone()
        band_bias[..., :S] = _NEG_INF  # the sink pass covers these keys
    return _Plan(
        B=B,
        H=H,
        Hkv=Hkv,
        R=R,
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
class _Band:
    """Block geometry of one undilated problem with ``n`` queries and ``Mk`` keys.

    Heads are processed ``Hc`` at a time: one head per group (split into groups of
    ``G`` blocks) when a head's problem is large, else several whole heads per
    group, so that short sequences with many heads do not pay per-head overhead.
    """

    Bq: int  # query rows per block
    left: int  # band keys before a block's first query
    L: int  # band length
    nb: int  # blocks
    G: int  # blocks per group
    Hc: int  # kv heads per group

    @staticmethod
    def make(plan: _Plan, n: int, Mk: int) -> _Band:
        # Keys further than the whole sequence cannot exist, so huge windows are
        # clamped instead of building huge bands.
        left = min(plan.window - 1, Mk)
        right = 0 if plan.causal else min(plan.window - 1, Mk + n + 2)
        Bq = min(plan.block_size, n)
        L = Bq + left + right
        nb = -(-n // Bq)
        per_block = plan.R * Bq * L  # score elements of one block of one kv head
        if 2 * nb * per_block <= plan.max_scores:
            Hc = min(plan.kv_heads, plan.max_scores // (nb * per_block))
            return _Band(Bq=Bq, left=left, L=L, nb=nb, G=nb, Hc=Hc)
        return _Band(Bq=Bq, left=left, L=L, nb=nb, G=max(1, plan.max_scores // per_block), Hc=1)

    def groups(self, kv_heads: int) -> Iterator[tuple[int, int, int, int]]:
        """``(first kv head, heads, first block, blocks)`` of each group."""
        for c0 in range(0, kv_heads, self.Hc):
            for blk0 in range(0, self.nb, self.G):
                yield c0, min(self.Hc, kv_heads - c0), blk0, min(self.G, self.nb - blk0)


def _kv_heads(x: torch.Tensor, plan: _Plan, c0: int, hc: int, *, query: bool) -> torch.Tensor:
    """Kv heads ``c0 : c0+hc`` of ``x``: ``[hc, R, N, C]`` for query-side tensors
    (``[B, H, N, C]``), ``[hc, M, C]`` for key-side ones (``[B, Hkv, M, C]``).

    A single head is always a view; several heads are a view when ``x``'s layout
    allows it, else a copy (only done for small problems).
    """
    if hc == 1:
        b, hk = divmod(c0, plan.Hkv)
        if query:
            return x[b, hk * plan.R : (hk + 1) * plan.R].unsqueeze(0)
        return x[b, hk].unsqueeze(0)
    if query:
        return x.reshape(plan.kv_heads, plan.R, *x.shape[2:])[c0 : c0 + hc]
    return x.reshape(plan.kv_heads, *x.shape[2:])[c0 : c0 + hc]


def _bias_heads(bias: torch.Tensor | None, c0: int, hc: int) -> torch.Tensor | None:
    if bias is None or bias.shape[0] == 1:
        return bias
    return bias[c0 : c0 + hc]


class _Workspace:
    """Buffers reused from group to group (fresh multi-MiB tensors per group would
    cost a page fault per 4 KiB page, a large part of the run time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
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


def _take(x: torch.Tensor, dim: int, lo: int, hi: int, fill: float) -> torch.Tensor:
    """Indices ``lo:hi`` of ``x`` along ``dim``; those outside ``[0, size)`` are ``fill``.

    A view when every index exists, else a copy of just that range.
    """
    size = x.shape[dim]
    if lo >= 0 and hi <= size:
        return x.narrow(dim, lo, hi - lo)
    a, z = min(max(lo, 0), size), max(min(hi, size), 0)
    front = max(min(hi, 0) - lo, 0)
    back = max(hi - max(lo, size), 0)

    def filled(count):
        shape = list(x.shape)
        shape[dim] = count
        return x.new_full(shape, fill)

    parts = [filled(front)]
    if z > a:
        parts.append(x.narrow(dim, a, z - a))
    parts.append(filled(back))
    return torch.cat(parts, dim=dim)


def _load_rows(
    src: torch.Tensor, r0: int, r1: int, Bq: int, scale: float, buf: torch.Tensor
) -> torch.Tensor:
    """Rows ``r0:r1`` of ``src [hc, R, n, C]`` times ``scale`` into
    ``buf [hc, g, R, Bq, C]`` (block-major, tail rows zero); returns ``buf`` as
    ``[hc*g, R*Bq, C]``."""
    hc, g, R, _, C = buf.shape
    rows = r1 - r0
    full = rows // Bq
    if full:
        blocks = src[:, :, r0 : r0 + full * Bq].unflatten(2, (full, Bq)).transpose(1, 2)
        buf[:, :full].copy_(blocks)
    rest = rows - full * Bq
    if rest:
        buf[:, full, :, :rest].copy_(src[:, :, r1 - rest : r1])
        buf[:, full, :, rest:].zero_()
    if scale != 1.0:
        buf.mul_(scale)
    return buf.view(hc * g, R * Bq, C)


def _store_rows(dest: torch.Tensor, r0: int, r1: int, o: torch.Tensor) -> None:
    """Write group rows ``o [hc, g, R, Bq, C]`` into rows ``r0:r1`` of
    ``dest [hc, R, n, C]``."""
    Bq = o.shape[3]
    full = (r1 - r0) // Bq
    if full:
        dest[:, :, r0 : r0 + full * Bq].unflatten(2, (full, Bq)).copy_(o[:, :full].transpose(1, 2))
    rest = r1 - r0 - full * Bq
    if rest:
        dest[:, :, r1 - rest : r1].copy_(o[:, full, :, :rest])


def _overlap_add(
    dest: torch.Tensor, lo: int, windows: torch.Tensor, Bq: int, ws: _Workspace
) -> None:
    """Add band windows ``[hc, g, L, C]`` (window ``t`` starts at key ``lo + t*Bq``)
    into ``dest [hc, Mk, C]``; keys outside ``[0, Mk)`` are dropped."""
    hc, g, L, C = windows.shape
    chunks = -(-L // Bq)
    acc = ws.get("acc", (hc, g - 1 + chunks, Bq, C), windows.dtype).zero_()
    for c in range(chunks):
        width = min(Bq, L - c * Bq)
        acc[:, c : c + g, :width] += windows[:, :, c * Bq : c * Bq + width]
    span = (g - 1) * Bq + L
    a, z = max(lo, 0), min(lo + span, dest.shape[1])
    if z > a:
        dest[:, a:z] += acc.view(hc, -1, C)[:, a - lo : z - lo]


# -- one group: scores and softmax weights ------------------------------------------------------


@dataclasses.dataclass
class _Group:
    """Everything one group needs after its weights are computed."""

    hc: int  # kv heads
    g: int  # blocks
    lo: int  # key position where the first block's band starts
    p: torch.Tensor  # [hc*g, R*Bq, L] unnormalised band weights
    ps: torch.Tensor | None  # [hc, g*R*Bq, S] unnormalised sink weights
    denom: torch.Tensor  # [hc*g, R*Bq, 1] softmax denominators (1 for empty rows)
    kw: torch.Tensor  # [hc*g, D, L] Kᵀ per band
    vw: torch.Tensor  # [hc*g, L, Dv] V per band
    sk: torch.Tensor | None  # [hc, S, D] sink keys
    sv: torch.Tensor | None  # [hc, S, Dv] sink values


def _group_weights(
    plan: _Plan,
    band: _Band,
    pattern: torch.Tensor,
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_k: torch.Tensor | None,
    sink_v: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    sink_bias: torch.Tensor | None,
    *,
    i0: int,
    off: int,
    r0: int,
    g: int,
    ws: _Workspace,
) -> _Group:
    """Scores and unnormalised softmax weights of one group.

    ``qg [hc*g, R*Bq, D]`` holds the group's scaled queries; ``k [hc, Mk, D]``,
    ``v [hc, Mk, Dv]`` and ``key_bias [hc|1, R|1, Mk]`` are the problem's keys (its
    queries sit at key positions ``off, off+1, ...``). Sink keys ``[hc, S, D]`` are at
    original positions ``0..S-1``; query row ``t`` is at original position
    ``i0 + M - N + d*t``.
    """
    R, Bq, L, ct = plan.R, band.Bq, band.L, plan.ct
    hc, Mk = k.shape[0], k.shape[1]
    lo = r0 + off - band.left
    hi = lo + (g - 1) * Bq + L
    kw = _take(k, 1, lo, hi, 0.0).to(ct).unfold(1, L, Bq)  # [hc, g, D, L]
    vw = _take(v, 1, lo, hi, 0.0).to(ct).unfold(1, L, Bq).transpose(-1, -2)  # [hc, g, L, Dv]
    kw, vw = kw.reshape(hc * g, *kw.shape[2:]), vw.reshape(hc * g, *vw.shape[2:])
    s = ws.get("s", (hc * g, R * Bq, L), ct)
    torch.baddbmm(pattern, qg, kw, out=s)
    if key_bias is not None or lo < 0 or hi > Mk:
        kb = key_bias if key_bias is not None else torch.zeros(1, 1, Mk, dtype=ct, device=ws.device)
        kb = _take(kb, 2, lo, hi, _NEG_INF).unfold(2, L, Bq)  # [hc|1, R|1, g, L]
        s.view(hc, g, R, Bq, L).add_(kb.transpose(1, 2).unsqueeze(3))

    ss = sk = sv = None
    if sink_k is not None:
        sk, sv = sink_k.to(ct), sink_v.to(ct)
        S = sk.shape[1]
        ss = torch.bmm(qg.view(hc, g * R * Bq, -1), sk.transpose(1, 2))  # [hc, g*R*Bq, S]
        bias = sink_bias[:, None, :, None, :]  # [hc|1, 1, R|1, 1, S]
        if plan.causal:
            pos = i0 + plan.off + plan.dilation * torch.arange(r0, r0 + g * Bq)
            seen = torch.arange(S)[None, :] <= pos[:, None]  # [g*Bq, S]
            causal_bias = torch.zeros(seen.shape, dtype=ct).masked_fill_(~seen, _NEG_INF)
            bias = bias + causal_bias.to(ws.device).view(1, g, 1, Bq, S)
        ss.view(hc, g, R, Bq, S).add_(bias)

    # One softmax over band and sink scores. A row with nothing visible has max -inf;
    # subtracting 0 instead keeps its weights exactly 0 (output 0, not NaN).
    m = torch.amax(s, dim=-1, keepdim=True)  # [hc*g, R*Bq, 1]
    if ss is not None:
        m = torch.maximum(m, ss.amax(dim=-1, keepdim=True).view(m.shape))
    m.masked_fill_(torch.isneginf(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    ps = None
    if ss is not None:
        ps = ss.sub_(m.view(hc, -1, 1)).exp_()
        denom += ps.sum(dim=-1, keepdim=True).view(denom.shape)
    denom.masked_fill_(denom == 0, 1.0)
    return _Group(hc=hc, g=g, lo=lo, p=p, ps=ps, denom=denom, kw=kw, vw=vw, sk=sk, sv=sv)


def _problems(plan: _Plan) -> Iterator[tuple[int, int, int, _Band]]:
    """``(i0, rho, off, band)`` of each undilated problem: queries ``i0::d`` sit at
    positions congruent to ``rho`` (mod d) and see window keys ``rho::d`` only; in
    that problem query ``t`` sits at key position ``off + t``."""
    d = plan.dilation
    for i0 in range(min(d, plan.N)):
        rho = (i0 + plan.off) % d
        n, Mk = len(range(i0, plan.N, d)), len(range(rho, plan.M, d))
        yield i0, rho, (i0 + plan.off - rho) // d, _Band.make(plan, n, Mk)


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
    d, R, ct, S = plan.dilation, plan.R, plan.ct, plan.S
    ws = _Workspace(q.device)
    with torch.no_grad():
        for i0, rho, off, band in _problems(plan):
            pattern = _band_pattern(band, plan, q.device)
            Bq = band.Bq
            for c0, hc, blk0, g in band.groups(plan.kv_heads):
                qs = _kv_heads(q, plan, c0, hc, query=True)[:, :, i0::d]  # [hc, R, n, D]
                ks = _kv_heads(k, plan, c0, hc, query=False)  # [hc, M, D]
                vs = _kv_heads(v, plan, c0, hc, query=False)
                kb = _bias_heads(plan.band_bias, c0, hc)
                n = qs.shape[2]
                r0, r1 = blk0 * Bq, min(n, (blk0 + g) * Bq)
                qbuf = ws.get("q", (hc, g, R, Bq, plan.D), ct)
                qg = _load_rows(qs, r0, r1, Bq, plan.scale, qbuf)
                grp = _group_weights(
                    plan,
                    band,
                    pattern,
                    qg,
                    ks[:, rho::d],
                    vs[:, rho::d],
                    ks[:, :S] if S else None,
                    vs[:, :S] if S else None,
                    None if kb is None else kb[..., rho::d],
                    _bias_heads(plan.sink_bias, c0, hc),
                    i0=i0,
                    off=off,
                    r0=r0,
                    g=g,
                    ws=ws,
                )
                o = torch.bmm(grp.p, grp.vw, out=ws.get("o", (hc * g, R * Bq, plan.Dv), ct))
                if grp.ps is not None:
                    o.view(hc, -1, plan.Dv).baddbmm_(grp.ps, grp.sv)
                o.div_(grp.denom)
                dest = _kv_heads(out, plan, c0, hc, query=True)[:, :, i0::d]
                _store_rows(dest, r0, r1, o.view(hc, g, R, Bq, plan.Dv))
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
    d, R, ct, S = plan.dilation, plan.R, plan.ct, plan.S
    D, Dv = plan.D, plan.Dv
    dq = q.new_empty(q.shape)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)  # summed over groups, kept in ct
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    if dq.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    ws = _Workspace(q.device)
    with torch.no_grad():
        for i0, rho, off, band in _problems(plan):
            pattern = _band_pattern(band, plan, q.device)
            Bq, L = band.Bq, band.L
            for c0, hc, blk0, g in band.groups(plan.kv_heads):
                qs = _kv_heads(q, plan, c0, hc, query=True)[:, :, i0::d]  # [hc, R, n, D]
                gs = _kv_heads(grad_out, plan, c0, hc, query=True)[:, :, i0::d]
                ks = _kv_heads(k, plan, c0, hc, query=False)  # [hc, M, D]
                vs = _kv_heads(v, plan, c0, hc, query=False)
                dks = _kv_heads(dk, plan, c0, hc, query=False)  # views: dk is contiguous
                dvs = _kv_heads(dv, plan, c0, hc, query=False)
                kb = _bias_heads(plan.band_bias, c0, hc)
                n = qs.shape[2]
                r0, r1 = blk0 * Bq, min(n, (blk0 + g) * Bq)
                qg = _load_rows(qs, r0, r1, Bq, plan.scale, ws.get("q", (hc, g, R, Bq, D), ct))
                dog = _load_rows(gs, r0, r1, Bq, 1.0, ws.get("do", (hc, g, R, Bq, Dv), ct))
                grp = _group_weights(
                    plan,
                    band,
                    pattern,
                    qg,
                    ks[:, rho::d],
                    vs[:, rho::d],
                    ks[:, :S] if S else None,
                    vs[:, :S] if S else None,
                    None if kb is None else kb[..., rho::d],
                    _bias_heads(plan.sink_bias, c0, hc),
                    i0=i0,
                    off=off,
                    r0=r0,
                    g=g,
                    ws=ws,
                )
                p = grp.p.div_(grp.denom)  # normalised weights P
                o = torch.bmm(p, grp.vw, out=ws.get("o", (hc * g, R * Bq, Dv), ct))
                ps = None
                if grp.ps is not None:
                    ps = grp.ps.div_(grp.denom.view(hc, -1, 1))
                    o.view(hc, -1, Dv).baddbmm_(ps, grp.sv)
                delta = o.mul_(dog).sum(dim=-1, keepdim=True)  # [hc*g, R*Bq, 1]

                dvw = torch.bmm(p.transpose(1, 2), dog, out=ws.get("dvw", (hc * g, L, Dv), ct))
                _overlap_add(dvs[:, rho::d], grp.lo, dvw.view(hc, g, L, Dv), Bq, ws)
                ds = torch.bmm(dog, grp.vw.transpose(1, 2), out=ws.get("ds", p.shape, ct))
                ds.sub_(delta).mul_(p)  # dS = P ∘ (dP − Δ)
                dqg = torch.bmm(ds, grp.kw.transpose(1, 2), out=ws.get("dq", qg.shape, ct))
                dkw = torch.bmm(ds.transpose(1, 2), qg, out=ws.get("dkw", (hc * g, L, D), ct))
                _overlap_add(dks[:, rho::d], grp.lo, dkw.view(hc, g, L, D), Bq, ws)
                if ps is not None:
                    do3, q3 = dog.view(hc, -1, Dv), qg.view(hc, -1, D)
                    dss = torch.bmm(do3, grp.sv.transpose(1, 2)).sub_(delta.view(hc, -1, 1))
                    dss.mul_(ps)
                    dqg.view(hc, -1, D).baddbmm_(dss, grp.sk)
                    dks[:, :S] += torch.bmm(dss.transpose(1, 2), q3)
                    dvs[:, :S] += torch.bmm(ps.transpose(1, 2), do3)
                dqg.mul_(plan.scale)
                dest = _kv_heads(dq, plan, c0, hc, query=True)[:, :, i0::d]
                _store_rows(dest, r0, r1, dqg.view(hc, g, R, Bq, D))
    return dq, dk.to(k.dtype), dv.to(v.dtype)
