"""Linear attention on CPU in O(N·d²) (bidirectional) or O(N·(C·d + d²)) (causal).

Bidirectional: the state ``S = Σ_j φ(k_j) [v_j, 1]ᵀ`` (``[F, Dv + 1]``: the extra
column of ones carries the normaliser ``z = Σ_j φ(k_j)`` through the same matmul)
is summed over blocks of keys, then every query reads ``φ(q_i)·S``: two matmuls.

Causal (Lightning Attention-2): positions are cut into chunks of ``C``. Within a
chunk, ``(φ(Q_c)·φ(K_c)ᵀ ⊙ D)·[V_c, 1]`` with the lower-triangular ``D[r, s] =
λ^(r−s)`` (all ones without decay) covers the keys of the query's own chunk; the
keys of earlier chunks come through the state at the chunk's start, ``λ^(r+1)·
φ(q)·S_c``. Chunk states are ``K_c = Σ_s λ^(C−1−s) φ(k_s) [v_s, 1]ᵀ`` and
``S_c = λ^C·S_(c−1) + K_(c−1)``; for a group of ``G`` chunks the prefix states come
from one small ``[G+1, G]`` matmul with weights ``λ^(C·(g−1−g'))`` (every power is
of a number ≤ 1, so nothing overflows), and the group's last state carries into the
next group. The result is exact: the same sums as the reference, grouped
differently.

Query ``i`` sits at position ``i + M − N`` (bottom-right causal alignment); chunks
are aligned to multiples of ``C`` in key positions, keys before the first query's
chunk enter as an initial state, and positions outside ``[0, M)`` are absent keys.
The :mod:`hybrid <attnopt.kernels.hybrid>` variant reuses the causal groups with
queries moved back by its window (their linear part sees only older keys).

Memory: heads are processed one key/value head (with its query heads) at a time
and positions in groups whose temporaries hold about ``max_elements`` numbers, so
besides the output only a few such buffers are alive; no ``[N, M]`` tensor exists.
fp16/bf16 inputs are computed in fp32 group by group.

Inference (no autograd, no decay) takes a leaner path: buffers allocated once per
call, the numerator written straight into the output's rows and divided there, the
normaliser kept as its own vector instead of a ``[v, 1]`` column, and the state
each chunk of a group starts from taken from one ``[g+1, g]`` matmul over the
chunks' own states.

Inference on CPU in fp32 compute (no decay) goes first to the fused C++ kernel
(:mod:`~attnopt.kernels.linear.fused`; causal: about twice as fast at 16k positions), which
computes the same chunked sums; this module's no-grad path is its fallback where the
kernel cannot be built, and the two are tested against each other.

Autograd: :func:`linear_forward` with ``differentiable=True`` uses only
out-of-place ops and assembles the output by concatenation, so ``torch.func.vjp``
can differentiate it (the op's backward does); it then keeps each group's
intermediates, O(N·(C + F)) per head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import compute_dtype
from attnopt.kernels.linear.feature_maps import apply_feature_map, check_feature_tensors
from attnopt.kernels.linear.fused import fused_linear
from attnopt.kernels.linear.reference import check_linear_args, decay_per_head

__all__ = ["HeadGroup", "Plan", "causal_groups", "linear_attention_chunked", "linear_forward"]

DEFAULT_MAX_ELEMENTS = 1 << 15
# Without autograd the buffers are allocated once per call and about four are alive,
# so each may be larger: at N = 16k, H = 8, D = 64 the peak extra memory is still
# below SDPA's (benchmarks/bench_linear.py).
INFERENCE_MAX_ELEMENTS = 1 << 16


def linear_attention_chunked(
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
    max_elements: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Linear attention without an ``[N, M]`` tensor; semantics of
    :func:`~attnopt.kernels.linear.reference.linear_attention_reference`.

    Differentiable (q, k, v and the feature-map tensors) through autograd.

    Args:
        q, k, v, kv_mask, scale, causal, feature_map, decay, eps, q_weight, q_bias,
            k_weight, k_bias: as in the reference.
        chunk: positions per chunk of the causal kernel (the result does not depend
            on it beyond rounding).
        max_elements: numbers per group temporary, which bounds the extra memory;
            default ``2**15`` with autograd or decay, ``2**16`` otherwise (inference,
            whose buffers are preallocated).
        fused: whether inference on CPU may use the fused C++ kernel
            (:mod:`~attnopt.kernels.linear.fused`; same result, faster). False keeps the
            PyTorch implementation.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1000, 16) for _ in range(3))
        >>> linear_attention_chunked(q, k, v, causal=True, chunk=64).shape
        torch.Size([1, 2, 1000, 16])
    """
    caller = "linear_attention_chunked"
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
    tensors = (q_weight, q_bias, k_weight, k_bias)
    check_feature_tensors(
        caller, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    if max_elements is not None and (not isinstance(max_elements, int) or max_elements < 1):
        raise ValueError(
            f"{caller}: max_elements must be a positive int or None, got {max_elements!r}"
        )
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *tensors)
    )
    return linear_forward(
        q,
        k,
        v,
        kv_mask,
        scale=scale,
        causal=causal,
        feature_map=feature_map,
        chunk=chunk,
        decay=decay,
        eps=eps,
        tensors=tensors,
        max_elements=max_elements,
        differentiable=grad,
        fused=fused,
    )


# -- one call's sizes and constants -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and settings of one call, derived once from its inputs."""

    B: int
    H: int
    Hkv: int
    R: int  # query heads per kv head
    N: int
    M: int
    D: int
    Dv: int
    F: int  # features of φ
    ct: torch.dtype
    scale: float
    feature_map: str
    chunk: int
    group: int  # chunks per group
    block: int  # rows per block of the bidirectional kernel
    log_decay: torch.Tensor | None  # [H]
    key_mask: torch.Tensor | None  # [Bm, Hm, M] bool
    tensors: tuple  # (q_weight, q_bias, k_weight, k_bias)
    differentiable: bool
    max_elements: int | None = None

    @property
    def off(self) -> int:
        return self.M - self.N  # query i sits at key position i + off


def make_plan(
    q,
    k,
    v,
    kv_mask,
    *,
    scale,
    feature_map,
    chunk,
    decay,
    tensors,
    max_elements,
    differentiable,
    band: int = 0,
) -> Plan:
    """``band``: extra scores per query row and chunk (the hybrid's window band)."""
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    R = H // Hkv
    ct = compute_dtype(q.dtype)
    F = D if feature_map in ("elu", "relu") else tensors[0].shape[-1]
    if feature_map == "hedgehog":
        F *= 2  # [softmax(z), softmax(-z)]
    budget = DEFAULT_MAX_ELEMENTS if max_elements is None else max_elements
    # Rows in flight must cover at least one chunk; padding rows beyond the queries
    # are wasted work, so a chunk longer than every sequence is cut down.
    C = max(1, min(chunk, max(N, 1)))
    per_chunk = R * max(C * max(C, F, Dv + 1, band), F * (Dv + 1))
    group = max(1, min(64, budget // per_chunk))
    block = max(16, budget // (R * max(F, Dv + 1)))
    key_mask = None
    if kv_mask is not None:
        km = kv_mask.to(q.device)
        key_mask = km.reshape((1,) * (3 - km.dim()) + tuple(km.shape)).expand(-1, -1, M)
    return Plan(
        B=B,
        H=H,
        Hkv=Hkv,
        R=R,
        N=N,
        M=M,
        D=D,
        Dv=Dv,
        F=F,
        ct=ct,
        scale=1.0 / math.sqrt(D) if scale is None else float(scale),
        feature_map=feature_map,
        chunk=C,
        group=group,
        block=block,
        log_decay=decay_per_head(decay, H, ct, q.device),
        key_mask=key_mask,
        tensors=tensors,
        differentiable=differentiable,
        max_elements=max_elements,
    )


@dataclasses.dataclass(frozen=True)
class _DecayConsts:
    """Decay weights of one head group for chunk size ``C`` and ``G`` chunks per group
    (shapes with a leading ``[R]``, or ``[1]`` without decay)."""

    intra: torch.Tensor  # [R|1, 1, C, C]: λ^(r−s), r >= s
    key_w: torch.Tensor | None  # [R, 1, C, 1]: λ^(C−1−s)
    query_w: torch.Tensor | None  # [R, 1, C, 1]: λ^(r+1)
    prefix: torch.Tensor  # [R|1, G+1, G]: λ^(C·(g−1−g')), g' < g
    carry: torch.Tensor | None  # [R, G+1]: λ^(C·g)


def _decay_consts(log_decay: torch.Tensor | None, C: int, G: int, ct, device) -> _DecayConsts:
    r = torch.arange(C, device=device)
    g = torch.arange(G + 1, device=device)
    lower = r[:, None] >= r[None, :]
    before = g[:, None] > torch.arange(G, device=device)[None, :]  # [G+1, G]
    if log_decay is None:
        intra = lower.to(ct)[None, None]
        return _DecayConsts(intra, None, None, before.to(ct)[None], None)
    ld = log_decay.to(torch.float64)[:, None, None]  # [R, 1, 1]
    dist = (r[:, None] - r[None, :]).clamp(min=0)
    intra = (torch.exp(dist * ld) * lower).to(ct).unsqueeze(1)  # [R, 1, C, C]
    key_w = torch.exp((C - 1 - r).to(torch.float64) * ld[:, 0]).to(ct)  # [R, C]
    query_w = torch.exp((r + 1).to(torch.float64) * ld[:, 0]).to(ct)
    steps = (g[:, None] - 1 - torch.arange(G, device=device)[None, :]).clamp(min=0)
    prefix = (torch.exp(C * steps * ld) * before).to(ct)  # [R, G+1, G]
    carry = torch.exp(C * g.to(torch.float64) * ld[:, 0]).to(ct)  # [R, G+1]
    return _DecayConsts(intra, key_w[:, None, :, None], query_w[:, None, :, None], prefix, carry)


# -- one key/value head and its query heads -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """Kv head ``hk`` of batch ``b`` with its ``R`` query heads."""

    b: int
    hk: int
    heads: slice
    q: torch.Tensor  # [R, N, D]
    k: torch.Tensor  # [M, D]
    v: torch.Tensor  # [M, Dv]
    key_mask: torch.Tensor | None  # [R|1, M] bool
    q_weight: torch.Tensor | None
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor | None
    k_bias: torch.Tensor | None
    log_decay: torch.Tensor | None  # [R]


def head_groups(plan: Plan, q, k, v) -> Iterator[HeadGroup]:
    qw, qb, kw, kb = plan.tensors
    hedgehog = plan.feature_map == "hedgehog"
    for b in range(plan.B):
        for hk in range(plan.Hkv):
            heads = slice(hk * plan.R, (hk + 1) * plan.R)
            km = None
            if plan.key_mask is not None:
                km = plan.key_mask[b if plan.key_mask.shape[0] > 1 else 0]
                km = km[heads] if km.shape[0] > 1 else km  # [R|1, M]
            yield HeadGroup(
                b=b,
                hk=hk,
                heads=heads,
                q=q[b, heads],
                k=k[b, hk],
                v=v[b, hk],
                key_mask=km,
                q_weight=qw[heads] if hedgehog else qw,
                q_bias=qb[heads] if hedgehog else None,
                k_weight=kw[hk] if hedgehog else kw,
                k_bias=kb[hk] if hedgehog else None,
                log_decay=None if plan.log_decay is None else plan.log_decay[heads],
            )


def take_rows(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``x[..., lo:hi, :]`` with zero rows where ``[lo, hi)`` leaves ``[0, len)``."""
    n = x.shape[-2]
    if lo >= 0 and hi <= n:
        return x[..., lo:hi, :]
    a, z = max(lo, 0), min(hi, n)
    inner = x[..., a:z, :] if a < z else x[..., 0:0, :]
    before, after = max(0, min(hi, 0) - lo), max(0, hi - max(lo, n))
    shape, width = x.shape[:-2], x.shape[-1]
    return torch.cat(
        [x.new_zeros(*shape, before, width), inner, x.new_zeros(*shape, after, width)], dim=-2
    )


def phi_queries(plan: Plan, hg: HeadGroup, rows: torch.Tensor) -> torch.Tensor:
    """``φ`` of query rows ``[R, L, D]`` (compute dtype) → ``[R, L, F]``."""
    return apply_feature_map(
        rows,
        plan.feature_map,
        weight=hg.q_weight,
        bias=hg.q_bias,
        scale=plan.scale,
        query=True,
    )


def keys_at(
    plan: Plan, hg: HeadGroup, lo: int, hi: int, first_key: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(φ(k) [R|1, L, F], [v, 1] [L, Dv+1])`` of key positions ``[lo, hi)``; keys that
    do not exist, are padding, or lie before ``first_key`` have ``φ = 0``."""
    ct = plan.ct
    kr = take_rows(hg.k, lo, hi).to(ct)
    kf = apply_feature_map(
        kr, plan.feature_map, weight=hg.k_weight, bias=hg.k_bias, scale=plan.scale
    ).unsqueeze(0)  # [1, L, F]
    vr = take_rows(hg.v, lo, hi).to(ct)
    va = torch.cat([vr, vr.new_ones(vr.shape[0], 1)], dim=-1)  # [L, Dv+1]
    valid = _valid_keys(plan, hg, lo, hi, first_key)
    if valid is not None and not bool(valid.all()):
        kf = kf * valid.unsqueeze(-1).to(ct)
    return kf, va


def _valid_keys(
    plan: Plan, hg: HeadGroup, lo: int, hi: int, first_key: int = 0
) -> torch.Tensor | None:
    """Bool ``[R|1, L]``: which of key positions ``[lo, hi)`` exist (in ``[first_key,
    M)``, ``first_key`` at least 0) and are not padding; None when all are."""
    if hg.key_mask is None and lo >= max(first_key, 0) and hi <= plan.M:
        return None
    pos = torch.arange(lo, hi, device=hg.k.device)
    valid = ((pos >= max(first_key, 0)) & (pos < plan.M))[None, :]  # [1, L]
    if hg.key_mask is not None:
        valid = valid & take_rows(hg.key_mask.unsqueeze(-1), lo, hi).squeeze(-1)
    return valid


# -- bidirectional ------------------------------------------------------------------------------


def _bidirectional(plan: Plan, hg: HeadGroup) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(i0, i1, [φ(q)·S, φ(q)·z] [R, i1−i0, Dv+1])`` for blocks of query rows."""
    state = None
    for lo in range(0, plan.M, plan.block):
        kf, va = keys_at(plan, hg, lo, min(plan.M, lo + plan.block))
        part = _kt_v(kf, va)  # [R|1, F, Dv+1]
        state = part if state is None else state + part
    if state is None:
        state = torch.zeros(1, plan.F, plan.Dv + 1, dtype=plan.ct, device=hg.q.device)
    for i0 in range(0, plan.N, plan.block):
        i1 = min(plan.N, i0 + plan.block)
        qf = phi_queries(plan, hg, hg.q[:, i0:i1].to(plan.ct))
        yield i0, i1, qf @ state


# -- causal -------------------------------------------------------------------------------------


def _initial_state(plan: Plan, hg: HeadGroup, end: int, first_key: int) -> torch.Tensor | None:
    """``Σ_{j<end} λ^(end−1−j) φ(k_j) [v_j, 1]ᵀ`` ``[R|1, F, Dv+1]``, or None if ``end <= 0``."""
    state = None
    for lo in range(0, end, plan.block):
        hi = min(end, lo + plan.block)
        kf, va = keys_at(plan, hg, lo, hi, first_key)
        if hg.log_decay is not None:
            dist = torch.arange(end - 1 - lo, end - 1 - hi, -1, device=kf.device)
            w = torch.exp(dist.to(torch.float64)[None, :] * hg.log_decay.double()[:, None])
            kf = kf * w.to(plan.ct).unsqueeze(-1)  # [R, L, F]
        part = _kt_v(kf, va)
        state = part if state is None else state + part
    return state


def _kt_v(kf: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
    """``φ(K)ᵀ·[V, 1]`` for ``kf [R|1, L, F]``, ``va [L, Dv+1]`` → ``[R|1, F, Dv+1]``."""
    if kf.shape[0] == 1:  # one 2-D matmul reads the transpose without copying it
        return (kf[0].t() @ va).unsqueeze(0)
    return kf.transpose(-1, -2) @ va


def _causal_group(
    plan: Plan,
    consts: _DecayConsts,
    qf: torch.Tensor,
    kf: torch.Tensor,
    va: torch.Tensor,
    state: torch.Tensor | None,
    g: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One group of ``g`` chunks: ``([num, den] [R, g·C, Dv+1], next state)``."""
    C, R, F, Dv1 = plan.chunk, qf.shape[0], plan.F, plan.Dv + 1
    qc = qf.reshape(R, g, C, F)
    kc = kf.reshape(kf.shape[0], g, C, F)
    vc = va.reshape(g, C, Dv1)
    # In-place updates below touch only matmul outputs, which their backward never reads.
    scores = (qc @ kc.transpose(-1, -2)).mul_(consts.intra)  # [R, g, C, C]
    out = scores @ vc  # [R, g, C, Dv+1]
    del scores
    kw = kc if consts.key_w is None else kc * consts.key_w
    chunk_states = kw.transpose(-1, -2) @ vc  # [Rs, g, F, Dv+1]
    rs = chunk_states.shape[0]
    prefix = consts.prefix[:, : g + 1, :g] @ chunk_states.reshape(rs, g, F * Dv1)
    if state is not None:
        flat = state.reshape(state.shape[0], 1, F * Dv1)
        if consts.carry is None:
            prefix = prefix.add_(flat) if prefix.shape[0] >= flat.shape[0] else prefix + flat
        else:
            prefix = prefix + consts.carry[:, : g + 1, None] * flat
    prefix = prefix.reshape(prefix.shape[0], g + 1, F, Dv1)
    qd = qc if consts.query_w is None else qc * consts.query_w
    inter = prefix[:, :g]
    if inter.shape[0] == R:  # fuse the add into the matmul
        out = torch.baddbmm(
            out.reshape(R * g, C, Dv1), qd.reshape(R * g, C, F), inter.reshape(R * g, F, Dv1)
        ).reshape(R, g, C, Dv1)
    else:
        out = out + qd @ inter
    return out.reshape(R, g * C, Dv1), prefix[:, g]


def causal_groups(
    plan: Plan, hg: HeadGroup, *, shift: int = 0, first_key: int = 0
) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """Causal linear attention of one head group, a group of chunks at a time.

    Query ``i`` sees keys ``first_key <= j <= i + M − N − shift`` (``shift`` moves the
    queries back; the hybrid variant uses its window). Yields
    ``(r0, i0, i1, rows, lin)``: ``rows [R, L, D]`` holds query rows ``r0 .. r0+L``
    (compute dtype, zeros outside ``[0, N)``), ``lin [R, L, Dv+1]`` their unnormalised
    ``[Σ a_ij v_j, Σ a_ij]``; rows ``i0 .. i1`` of them are real queries.
    """
    C, G, ct = plan.chunk, plan.group, plan.ct
    off = plan.off - shift
    start = (off // C) * C  # chunk-aligned position of the first query's chunk
    state = _initial_state(plan, hg, min(start, plan.M), first_key)
    consts = _decay_consts(hg.log_decay, C, G, ct, hg.q.device)
    last = off + plan.N  # one past the last query's position
    for p0 in range(start, last, G * C):
        g = min(G, -(-(last - p0) // C))
        p1 = p0 + g * C
        rows = take_rows(hg.q, p0 - off, p1 - off).to(ct)  # [R, g*C, D]
        qf = phi_queries(plan, hg, rows)
        kf, va = keys_at(plan, hg, p0, p1, first_key)
        out, state = _causal_group(plan, consts, qf, kf, va, state, g)
        r0 = p0 - off
        yield r0, max(r0, 0), min(plan.N, p1 - off), rows, out


# -- without autograd: straight into the output ------------------------------------------------
#
# Inference needs none of the intermediates, so the no-grad paths below keep the
# numerator and the normaliser apart (no ``[v, 1]`` copies), accumulate states in
# place, write every block's numerator into its rows of the output with ``out=`` and
# divide there. Each temporary holds at most ``max_elements`` numbers and about four
# are alive at once; with several thousand positions per call this is a few dozen
# large matmuls per head instead of hundreds of small ones.


def _normalise_(num: torch.Tensor, den: torch.Tensor, eps: float) -> None:
    """``num /= den + eps`` in place (``den`` broadcast over the last dim); with
    ``eps == 0``, rows whose ``den`` is 0 (no key) keep their numerator, 0."""
    if eps:
        num.div_(den.add_(eps))
    else:
        num.div_(torch.where(den > 0, den, 1.0))


class _Rows:
    """Rows ``[i0, i1)`` of ``dest [R, N, Dv]`` as a compute-dtype buffer of ``L`` rows
    that starts at row ``r0``: the destination itself when it covers exactly those rows
    in the compute dtype, else a scratch buffer copied back by :meth:`flush`."""

    def __init__(self, dest, r: int, r0: int, i0: int, i1: int, L: int, ct) -> None:
        self.dest, self.r, self.r0, self.i0, self.i1 = dest, r, r0, i0, i1
        self.direct = dest.dtype == ct and r0 == i0 and i1 - i0 == L
        if self.direct:
            self.buf = dest[r, i0:i1]
        else:
            self.buf = torch.empty(L, dest.shape[-1], dtype=ct, device=dest.device)

    def flush(self) -> None:
        if not self.direct:
            lo = self.i0 - self.r0
            self.dest[self.r, self.i0 : self.i1] = self.buf[lo : lo + self.i1 - self.i0]


def _key_heads(hg: HeadGroup) -> int:
    """How many distinct key-side feature sets the group has: 1, or R with a per-head mask."""
    return 1 if hg.key_mask is None else hg.key_mask.shape[0]


def _phi_into(
    plan: Plan, hg: HeadGroup, x: torch.Tensor, out: torch.Tensor, scratch, *, query: bool
) -> torch.Tensor:
    """``φ(x)`` into ``out`` (same shape; ``scratch`` a buffer of ``x``'s size or None).

    elu and relu are computed in place without allocating; the learnt and random maps
    go through :func:`apply_feature_map` and are copied."""
    if plan.feature_map == "elu" and scratch is not None:
        torch.clamp(x, max=0.0, out=out).exp_()  # elu(x) + 1 == exp(min(x, 0)) + max(x, 0)
        return out.add_(torch.clamp(x, min=0.0, out=scratch))
    if plan.feature_map == "relu":
        return torch.clamp(x, min=0.0, out=out)
    weight = hg.q_weight if query else hg.k_weight
    bias = hg.q_bias if query else hg.k_bias
    f = apply_feature_map(
        x, plan.feature_map, weight=weight, bias=bias, scale=plan.scale, query=query
    )
    return out.copy_(f)


class _Workspace:
    """Buffers of the no-grad paths, allocated once per call: ``rows`` positions of
    φ(q) for ``R`` heads and φ(k) for ``Rs`` key sets, a scratch area (elu's second
    half, then the causal chunk scores), running states and normalisers."""

    def __init__(self, plan: Plan, rows: int, rs: int, device, chunks: int = 0) -> None:
        ct, F, Dv, C = plan.ct, plan.F, plan.Dv, plan.chunk
        self.qphi = torch.empty(plan.R, rows, F, dtype=ct, device=device)
        self.kphi = torch.empty(rs, rows, F, dtype=ct, device=device)
        width = max(plan.D, C if chunks else 0)
        self.work = torch.empty(max(plan.R, rs) * rows * width, dtype=ct, device=device)
        if chunks:
            G = chunks
            self.own = torch.empty(rs, G, F * Dv, dtype=ct, device=device)
            self.own_norms = torch.empty(rs, G, F, dtype=ct, device=device)
            self.states = torch.empty(rs, G + 1, F * Dv, dtype=ct, device=device)
            self.norms = torch.empty(rs, G + 1, F, dtype=ct, device=device)
            self.den = torch.empty(G, C, 1, dtype=ct, device=device)
            # before[c, c'] = 1 for c' < c: row c sums the chunks before chunk c.
            g = torch.arange(G + 1, device=device)
            self.before = (g[:, None] > g[None, :G]).to(ct)

    def scratch(self, like: torch.Tensor) -> torch.Tensor | None:
        n = like.numel()
        if like.dtype != self.work.dtype or n > self.work.numel():
            return None
        return self.work[:n].view(like.shape)


def _keys_into(plan: Plan, hg: HeadGroup, ws: _Workspace, lo: int, hi: int):
    """``(φ(k) [Rs, L, F], v [L, Dv])`` of key positions ``[lo, hi)`` in the workspace,
    absent keys (outside ``[0, M)`` or padding) with ``φ = 0`` as in :func:`keys_at`."""
    ct, L = plan.ct, hi - lo
    kr = take_rows(hg.k, lo, hi).to(ct)
    kf = ws.kphi[:, :L]
    _phi_into(plan, hg, kr.expand(kf.shape[0], -1, -1), kf, ws.scratch(kf), query=False)
    vr = take_rows(hg.v, lo, hi).to(ct)
    valid = _valid_keys(plan, hg, lo, hi)
    if valid is not None:
        kf.mul_(valid.unsqueeze(-1).to(ct))
    return kf, vr


def _bidirectional_into(plan: Plan, hg: HeadGroup, dest: torch.Tensor, eps: float) -> None:
    """Bidirectional linear attention of one head group into ``dest [R, N, Dv]``."""
    budget = INFERENCE_MAX_ELEMENTS if plan.max_elements is None else plan.max_elements
    rs = _key_heads(hg)
    rows = max(16, min(max(plan.N, plan.M), budget // (max(plan.R, rs) * max(plan.F, plan.D))))
    ws = _Workspace(plan, rows, rs, hg.q.device)
    state = torch.zeros(rs, plan.F, plan.Dv, dtype=plan.ct, device=hg.q.device)
    norm = torch.zeros(rs, plan.F, 1, dtype=plan.ct, device=hg.q.device)
    for lo in range(0, plan.M, rows):
        kf, vr = _keys_into(plan, hg, ws, lo, min(plan.M, lo + rows))  # [Rs, L, F], [L, Dv]
        if rs == 1:
            state[0].addmm_(kf[0].t(), vr)
        else:
            state.baddbmm_(kf.transpose(-1, -2), vr.expand(rs, -1, -1))
        norm.add_(kf.sum(-2).unsqueeze(-1))
    for i0 in range(0, plan.N, rows):
        i1 = min(plan.N, i0 + rows)
        x = hg.q[:, i0:i1].to(plan.ct)
        qf = ws.qphi[:, : i1 - i0]
        _phi_into(plan, hg, x, qf, ws.scratch(qf), query=True)  # [R, L, F]
        for r in range(plan.R):
            s = 0 if rs == 1 else r
            out = _Rows(dest, r, i0, i0, i1, i1 - i0, plan.ct)
            torch.mm(qf[r], state[s], out=out.buf)
            _normalise_(out.buf, qf[r] @ norm[s], eps)
            out.flush()


def _causal_into(plan: Plan, hg: HeadGroup, dest: torch.Tensor, eps: float) -> None:
    """Causal linear attention without decay of one head group into ``dest [R, N, Dv]``.

    Per group of ``g`` chunks: the chunks' own states ``φ(K_c)ᵀ V_c`` in one batched
    matmul; the state each chunk starts from (carried state plus the chunks before
    it in the group) in one more, ``before [g+1, g] @ own``, whose last row is the
    state carried into the next group."""
    C, ct, F, Dv, R = plan.chunk, plan.ct, plan.F, plan.Dv, plan.R
    budget = INFERENCE_MAX_ELEMENTS if plan.max_elements is None else plan.max_elements
    rs = _key_heads(hg)
    off = plan.off
    start = (off // C) * C
    last = off + plan.N
    G = max(1, min(-(-(last - start) // C), budget // (C * max(C, F, Dv, plan.D))))
    ws = _Workspace(plan, G * C, rs, hg.q.device, chunks=G)
    initial = _initial_state(plan, hg, min(start, plan.M), 0)  # [Rs|1, F, Dv+1] | None
    if initial is None:
        initial = torch.zeros(rs, F, Dv + 1, dtype=ct, device=hg.q.device)
    initial = initial.expand(rs, -1, -1)
    state = initial[..., :Dv].reshape(rs, 1, F * Dv).clone()  # carried into the group
    norm = initial[..., Dv].reshape(rs, 1, F).clone()
    for p0 in range(start, last, G * C):
        g = min(G, -(-(last - p0) // C))
        p1 = p0 + g * C
        kf, vr = _keys_into(plan, hg, ws, p0, p1)
        kc, vc = kf.view(rs, g, C, F), vr.view(g, C, Dv)
        own, own_norms = ws.own[:, :g], ws.own_norms[:, :g]
        torch.matmul(kc.transpose(-1, -2), vc, out=own.view(rs, g, F, Dv))
        torch.sum(kc, -2, out=own_norms)
        before = ws.before[: g + 1, :g].expand(rs, -1, -1)
        states = torch.baddbmm(state, before, own, out=ws.states[:, : g + 1])
        norms = torch.baddbmm(norm, before, own_norms, out=ws.norms[:, : g + 1])
        r0 = p0 - off
        i0, i1 = max(r0, 0), min(plan.N, p1 - off)
        x = take_rows(hg.q, r0, p1 - off).to(ct)  # [R, g*C, D]
        qf = ws.qphi[:, : g * C]
        _phi_into(plan, hg, x, qf, ws.scratch(qf), query=True)
        scores = ws.work[: g * C * C].view(g, C, C)
        den = ws.den[:g]
        for r in range(R):
            s = 0 if rs == 1 else r
            qr = qf[r].view(g, C, F)
            torch.bmm(qr, kc[s].transpose(-1, -2), out=scores).tril_()
            out = _Rows(dest, r, r0, i0, i1, g * C, ct)
            num = out.buf.view(g, C, Dv)
            torch.bmm(scores, vc, out=num)
            torch.sum(scores, -1, keepdim=True, out=den)
            num.baddbmm_(qr, states[s, :g].view(g, F, Dv))
            den.baddbmm_(qr, norms[s, :g].unsqueeze(-1))
            _normalise_(num, den, eps)
            out.flush()
        state.copy_(states[:, g : g + 1])
        norm.copy_(norms[:, g : g + 1])


# -- driver -------------------------------------------------------------------------------------


class OutputRows:
    """Collects ``[R, n, Dv]`` row blocks of every head group into ``[B, H, N, Dv]``.

    In-place into a preallocated tensor normally; by concatenation when the result
    must be differentiable (in-place writes into one big tensor would make autograd
    copy the whole output per block)."""

    def __init__(self, plan: Plan, like: torch.Tensor) -> None:
        self.plan = plan
        self.pieces: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.out = None
        self.device = like.device
        if not plan.differentiable:
            self.out = like.new_empty(plan.B, plan.H, plan.N, plan.Dv)

    def put(self, hg: HeadGroup, i0: int, rows: torch.Tensor) -> None:
        if self.out is not None:
            self.out[hg.b, hg.heads, i0 : i0 + rows.shape[1]] = rows
        else:
            self.pieces.setdefault((hg.b, hg.hk), []).append(rows)

    def put_normalised(self, hg: HeadGroup, i0: int, lin: torch.Tensor, eps: float) -> None:
        """Rows ``[num, den]`` ``[R, n, Dv+1]`` → ``num / (den + eps)``; with ``eps == 0``,
        rows whose ``den`` is 0 (no key) → 0."""
        Dv = self.plan.Dv
        den = lin[..., Dv:] + eps if eps else lin[..., Dv:]
        if not eps:
            den = torch.where(den > 0, den, 1.0)
        if self.out is not None and self.out.dtype == lin.dtype:
            torch.div(lin[..., :Dv], den, out=self.out[hg.b, hg.heads, i0 : i0 + lin.shape[1]])
        else:
            self.put(hg, i0, lin[..., :Dv] / den)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.out is not None:
            return self.out
        p = self.plan
        batches = []
        for b in range(p.B):
            heads = []
            for hk in range(p.Hkv):
                parts = self.pieces.get((b, hk), [])
                heads.append(
                    torch.cat(parts, dim=1)
                    if parts
                    else torch.zeros(p.R, p.N, p.Dv, dtype=p.ct, device=self.device)
                )
            batches.append(torch.cat(heads, dim=0))
        return torch.stack(batches).to(dtype)


def linear_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    scale: float | None,
    causal: bool,
    feature_map: str,
    chunk: int,
    decay,
    eps: float,
    tensors: tuple = (None, None, None, None),
    max_elements: int | None = None,
    differentiable: bool = False,
    fused: bool = True,
) -> torch.Tensor:
    """The chunked kernel on checked inputs (no argument checks).

    ``fused``: inference on CPU may take the C++ kernel
    (:mod:`~attnopt.kernels.linear.fused`), which computes the same sums faster; False
    keeps the PyTorch path (the tests compare the two)."""
    plan = make_plan(
        q,
        k,
        v,
        kv_mask,
        scale=scale,
        feature_map=feature_map,
        chunk=chunk,
        decay=decay,
        tensors=tensors,
        max_elements=max_elements,
        differentiable=differentiable,
    )
    sink = OutputRows(plan, q)
    if plan.N == 0:
        return q.new_empty(plan.B, plan.H, 0, plan.Dv)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        if not differentiable and fused:
            out = fused_linear(plan, q, k, v, eps, causal=causal)
            if out is not None:
                return out
        if not differentiable and not (causal and plan.log_decay is not None):
            out = q.new_empty(plan.B, plan.H, plan.N, plan.Dv)
            for hg in head_groups(plan, q, k, v):
                into = _causal_into if causal else _bidirectional_into
                into(plan, hg, out[hg.b, hg.heads], eps)
            return out
        for hg in head_groups(plan, q, k, v):
            if causal:
                for r0, i0, i1, _, lin in causal_groups(plan, hg):
                    sink.put_normalised(hg, i0, lin[:, i0 - r0 : i1 - r0], eps)
            else:
                for i0, _i1, lin in _bidirectional(plan, hg):
                    sink.put_normalised(hg, i0, lin, eps)
    return sink.result(q.dtype)
