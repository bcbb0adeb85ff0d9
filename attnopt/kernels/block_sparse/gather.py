"""Block-sparse attention on CPU: gather the kept key/value blocks, batched matmuls over them.

:func:`~attnopt.kernels.block_sparse.selection.select_blocks` gives, per query block,
the ``count`` kept key blocks (``index [B, H, nQ, K]``). Work is cut into *chunks*:
one kv head of one batch row, some of its query heads and a run of consecutive query
blocks, so every query head of a chunk reads the same K/V. A chunk of ``n`` query
blocks, each keeping at most ``w`` key blocks, copies its ``n·w`` key blocks into one
buffer (``index_select`` of whole ``block × D`` rows: a memcpy each), scores them with
one batched matmul ``[n, block, D] @ [n, D, w·block]``, takes the softmax in place
and, reusing the key buffer for the value blocks, multiplies by V. What stays masked
inside kept blocks is added to the scores: the causal triangle of the diagonal block
(always the last kept block in causal attention), padding keys and keys past ``M``
(gathered from one per-key bias, only when there are any) and the unused slots of a
query block that keeps fewer than ``w`` blocks. Queries and outputs of whole blocks of
one contiguous head are used in place (the scale goes into the matmul). The common
chunk (one head, whole blocks, no padding, ``D == Dv <= block``) hands its gathered
key and value blocks to the fused CPU attention kernel instead (see :class:`_FastPath`).
No ``[N, M]`` tensor is ever built.

fp32 inference on CPU goes first to the fused C++ kernel
(:mod:`~attnopt.kernels.block_sparse.fused`: no gathering, about twice as fast at 16k
positions); this path is its fallback and the autograd path, and the two are tested
against each other.

Memory: a chunk's scores hold at most ``max_scores`` elements (at least one query
block's); with the key/value buffer of the same size and the output, that is all the
kernel allocates besides the selection (``[B, H, nQ, K]`` indices). Consecutive query
blocks are grouped only while their widest row fits, so causal attention, whose early
query blocks keep few key blocks, batches many of them together.

The backward (:func:`block_sparse_backward`) treats the selection as a constant and
recomputes each chunk: with ``P`` the weights, ``O = P·V`` and ``Δ = rowsum(dO ∘ O)``:
``dV = Pᵀ·dO``, ``dS = P ∘ (dO·Vᵀ − Δ)``, ``dQ = scale·dS·K``, ``dK = dSᵀ·(scale·Q)``;
the key and value gradients of each gathered block are added back into place with
``index_add_`` (a block kept by several query blocks sums their contributions).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.block_sparse.selection import (
    BlockLayout,
    BlockSelection,
    block_layout,
    check_block_sparse_args,
    select_blocks,
)
from attnopt.kernels.dense.reference import compute_dtype

__all__ = [
    "block_sparse_attention_gather",
    "block_sparse_backward",
    "block_sparse_forward",
]

_NEG_INF = float("-inf")


def block_sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    block: int = 64,
    topk: int | None = None,
    threshold: float | None = None,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    pattern: str = "dynamic",
    scale: float | None = None,
    causal: bool = False,
    max_scores: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Block-sparse attention computing only the kept blocks.

    Same semantics as
    :func:`~attnopt.kernels.block_sparse.reference.block_sparse_attention_reference`.
    Differentiable once in q, k and v; the selection is a constant of the backward.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``; v: ``[B, Hkv, M, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, M]``; False keys are never seen.
        block, topk, threshold, local_blocks, sink_blocks, pattern: see
            :class:`~attnopt.kernels.block_sparse.BlockSparse`.
        scale: multiplier of ``q·kᵀ``; default ``1/sqrt(D)``.
        causal: query ``i`` (at key position ``i + M - N``) sees only keys before it.
        max_scores: score elements per chunk (at least one query block's), which bounds
            the extra memory; default: as many as fill a 64th of the output's bytes (the
            key/value buffer takes as much again), between ``2**15`` and ``2**20``.
        fused: whether fp32 inference on CPU may use the fused C++ kernel
            (:mod:`~attnopt.kernels.block_sparse.fused`; same result, faster). False
            keeps this module's gather path.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no visible key are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1000, 16) for _ in range(3))
        >>> block_sparse_attention_gather(q, k, v, block=64, topk=4, causal=True).shape
        torch.Size([1, 2, 1000, 16])
    """
    caller = "block_sparse_attention_gather"
    check_attention_inputs(caller, q, k, v, kv_mask)
    check_block_sparse_args(caller, block, topk, threshold, local_blocks, sink_blocks, pattern)
    if max_scores is not None and (not isinstance(max_scores, int) or max_scores < 1):
        raise ValueError(f"{caller}: max_scores must be a positive int or None, got {max_scores!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    selection = select_blocks(
        q,
        k,
        kv_mask,
        block=block,
        causal=causal,
        scale=scale,
        pattern=pattern,
        topk=topk,
        threshold=threshold,
        local_blocks=local_blocks,
        sink_blocks=sink_blocks,
    )
    kw = dict(block=block, scale=scale, causal=causal, max_scores=max_scores)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _GatherAttention.apply(q, k, v, kv_mask, selection, kw)
    return block_sparse_forward(q, k, v, kv_mask, selection, fused=fused, **kw)


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_mask, selection, kw):
        ctx.save_for_backward(q, k, v, kv_mask, *selection)
        ctx.kw = kw
        return block_sparse_forward(q, k, v, kv_mask, selection, **kw)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, kv_mask, index, count = ctx.saved_tensors
        selection = BlockSelection(index, count)
        dq, dk, dv = block_sparse_backward(grad_out, q, k, v, kv_mask, selection, **ctx.kw)
        return dq, dk, dv, None, None, None


# -- geometry shared by forward and backward ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Sizes, per-key masks and chunks of one call, derived once from its inputs."""

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
    causal: bool
    layout: BlockLayout
    key_bias: torch.Tensor | None  # [Bm, Hm, nK, block] additive: padding, keys past M
    padded: bool  # kv_mask given: every chunk adds key_bias
    may_be_empty: bool  # some query row may see no key (its softmax row is NaN)
    tri: torch.Tensor | None  # [block, block] additive causal mask of the diagonal block
    chunks: list[_Chunk]

    @property
    def nfull(self) -> int:
        """Key blocks that hold ``block`` real keys (the last one may not)."""
        return self.M // self.layout.block


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Query heads ``[h0, h1)`` (all of kv head ``hk``) of batch row ``b``, query blocks
    ``[j0, j1)``, each keeping at most ``width`` key blocks (``full``: all exactly)."""

    b: int
    hk: int
    h0: int
    h1: int
    j0: int
    j1: int
    width: int
    full: bool

    @property
    def items(self) -> int:
        return (self.h1 - self.h0) * (self.j1 - self.j0)


def _chunks(B, Hkv, R, count, pairs) -> list[_Chunk]:
    """Cut the work into chunks of at most ``pairs`` (query block, key slot) pairs, or
    one query block of one head where a single one is wider."""
    nq = count.shape[-1]
    if nq == 0:
        return []
    grouped = count.reshape(B, Hkv, R, nq)
    hi, lo = grouped.amax(2).tolist(), grouped.amin(2).tolist()
    out = []
    for b in range(B):
        for hk in range(Hkv):
            wmax, wmin = hi[b][hk], lo[b][hk]
            j = 0
            while j < nq:
                w, m = wmax[j], wmin[j]
                if R * w > pairs:
                    per = max(1, pairs // max(w, 1))
                    for r0 in range(0, R, per):
                        r1 = min(R, r0 + per)
                        heads = count[b, hk * R + r0 : hk * R + r1, j]
                        cw, cm = int(heads.max()), int(heads.min())
                        out.append(_Chunk(b, hk, hk * R + r0, hk * R + r1, j, j + 1, cw, cm == cw))
                    j += 1
                    continue
                g = 1
                while j + g < nq and R * (g + 1) * max(w, wmax[j + g]) <= pairs:
                    w, m = max(w, wmax[j + g]), min(m, wmin[j + g])
                    g += 1
                out.append(_Chunk(b, hk, hk * R, hk * R + R, j, j + g, w, m == w))
                j += g
    return out


def key_bias_of(kv_mask, M: int, length: int, ct, device) -> torch.Tensor:
    """Additive per-key bias ``[Bm, Hm, length]``: 0 for visible keys, ``-inf`` for
    padding (``kv_mask`` False, broadcastable to ``[B, H, M]``) and positions ``>= M``."""
    km = kv_mask if kv_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
    km = km.to(device).reshape((1,) * (3 - km.dim()) + tuple(km.shape))
    km = km.expand(km.shape[0], km.shape[1], M)
    bias = torch.full((km.shape[0], km.shape[1], length), _NEG_INF, dtype=ct, device=device)
    bias[..., :M].masked_fill_(km, 0.0)
    return bias


def _plan(q, k, v, kv_mask, selection, *, block, scale, causal, max_scores, slack=1) -> _Plan:
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    ct = compute_dtype(q.dtype)
    layout = block_layout(N, M, block, causal)
    if max_scores is None:
        # One chunk's scores and its key/value buffer together take a 32nd of the
        # output's bytes: with the output the peak stays below what SDPA's fused CPU
        # kernel needs (its output plus per-thread buffers).
        out_bytes = B * H * N * Dv * q.element_size()
        ct_bytes = torch.empty((), dtype=ct).element_size()
        max_scores = min(max(out_bytes * slack // (64 * ct_bytes), 1 << 15), (1 << 20) * slack)
    nk = layout.num_k_blocks
    key_bias = None
    if kv_mask is not None or M % block:
        key_bias = key_bias_of(kv_mask, M, nk * block, ct, q.device)
        key_bias = key_bias.view(key_bias.shape[0], key_bias.shape[1], nk, block)
    tri = None
    if causal:
        t = torch.arange(block, device=q.device)
        tri = torch.zeros(block, block, dtype=ct, device=q.device)
        tri.masked_fill_(t[None, :] > t[:, None], _NEG_INF)
    count = selection.count
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
        scale=scale,
        causal=causal,
        layout=layout,
        key_bias=key_bias,
        padded=kv_mask is not None,
        may_be_empty=kv_mask is not None or bool((count == 0).any()),
        tri=tri,
        chunks=_chunks(B, Hkv, H // Hkv, count, max(1, max_scores // (block * block))),
    )


class _Workspace:
    """Buffers sized once for the largest chunk and reused by every chunk."""

    def __init__(self, plan: _Plan, device: torch.device, names: dict[str, int]):
        most = max((c.items * c.width for c in plan.chunks), default=0)
        rows = max((c.items for c in plan.chunks), default=0)
        self._bufs = {}
        for name, per in names.items():
            size = per * (most if name.endswith("*") else rows)
            self._bufs[name.rstrip("*")] = torch.empty(size, dtype=plan.ct, device=device)

    def get(self, name: str, *shape: int) -> torch.Tensor:
        return self._bufs[name][: math.prod(shape)].view(shape)

    def size(self, name: str) -> int:
        return self._bufs[name].numel()


# -- pieces of one chunk -----------------------------------------------------------------------


def _rows(plan: _Plan, ch: _Chunk) -> tuple[int, int, int, int]:
    """``(a, e, t0, n)``: query rows ``[a, e)`` of the chunk start at row ``a - t0`` of its
    ``n`` buffer rows per head."""
    L = plan.layout
    t0 = (L.first_block + ch.j0) * L.block
    t1 = (L.first_block + ch.j1) * L.block
    a, e = max(t0, L.row_start), min(t1, L.row_end)
    return a - L.offset, e - L.offset, a - t0, t1 - t0


def _load_rows(plan: _Plan, ch: _Chunk, src: torch.Tensor, scale: float, buf: torch.Tensor):
    """Rows of ``src [B, H, N, E]`` for the chunk, times ``scale``, into ``buf``; returns
    ``[items, block, E]`` (rows outside the sequence are 0)."""
    a, e, r0, n = _rows(plan, ch)
    nh, E = ch.h1 - ch.h0, src.shape[-1]
    rows = src[ch.b, ch.h0 : ch.h1, a:e]  # [nh, e-a, E]
    dest = buf.view(nh, n, E)
    if e - a != n:
        dest.zero_()
        dest = dest[:, r0 : r0 + e - a]
    if rows.dtype == plan.ct:
        torch.mul(rows, scale, out=dest)
    else:  # convert first: half-precision arithmetic would round q * scale
        dest.copy_(rows)
        if scale != 1.0:
            dest.mul_(scale)
    return buf.view(ch.items, plan.layout.block, E)


def _rows_view(plan: _Plan, ch: _Chunk, t: torch.Tensor) -> torch.Tensor | None:
    """The chunk's rows of ``t [B, H, N, E]`` as ``[items, block, E]`` without a copy, when
    they are whole blocks of one head in the compute dtype laid out contiguously."""
    a, e, _, n = _rows(plan, ch)
    if ch.h1 - ch.h0 != 1 or e - a != n or t.dtype != plan.ct:
        return None
    rows = t[ch.b, ch.h0, a:e]
    if not rows.is_contiguous():
        return None
    return rows.view(ch.items, plan.layout.block, t.shape[-1])


def _store_rows(plan: _Plan, ch: _Chunk, dest: torch.Tensor, o: torch.Tensor) -> None:
    a, e, r0, n = _rows(plan, ch)
    nh = ch.h1 - ch.h0
    dest[ch.b, ch.h0 : ch.h1, a:e] = o.view(nh, n, -1)[:, r0 : r0 + e - a]


def _gather(plan: _Plan, src: torch.Tensor, ch: _Chunk, idx, tail, buf: torch.Tensor):
    """Key blocks ``idx [n]`` of ``src [B, Hkv, M, E]`` (kv head ``ch.hk``) into ``buf``
    as ``[n, block, E]`` in the compute dtype. ``tail`` (bool ``[n]`` or None) marks the
    short last block, whose keys past ``M`` are 0."""
    bs, E, nfull = plan.layout.block, src.shape[-1], plan.nfull
    out = buf.view(idx.shape[0], bs, E)
    rows = src[ch.b, ch.hk]  # [M, E]
    if tail is not None and nfull > 0:
        idx = idx.clamp(max=nfull - 1)  # gathered from block 0 here, then overwritten
    if nfull > 0:
        main = rows[: nfull * bs]
        blocks = (
            main.view(nfull, bs * E) if main.is_contiguous() else main.unflatten(0, (nfull, bs))
        )
        if src.dtype == plan.ct:
            torch.index_select(blocks, 0, idx, out=out.view((-1, *blocks.shape[1:])))
        else:
            out.copy_(torch.index_select(blocks, 0, idx).view(out.shape))
    if tail is not None:
        short = torch.zeros(bs, E, dtype=plan.ct, device=src.device)
        short[: plan.M - nfull * bs] = rows[nfull * bs :]
        out[tail] = short
    return out


def _column_bias(plan: _Plan, ch: _Chunk, idx3: torch.Tensor, cnt: torch.Tensor, tail):
    """Additive ``[items, 1, width * block]`` for padding keys, keys past ``M`` and unused
    slots, or None when the chunk has none."""
    bs, w = plan.layout.block, ch.width
    by_key = plan.padded or tail is not None
    if not by_key and ch.full:
        return None
    if by_key:
        kb = plan.key_bias
        bm = ch.b if kb.shape[0] > 1 else 0
        if kb.shape[1] > 1:
            heads = torch.arange(ch.h0, ch.h1, device=idx3.device)[:, None, None]
            colb = kb[bm][heads, idx3]  # [nh, g, w, bs]
        else:
            colb = kb[bm, 0][idx3]
    else:
        colb = torch.zeros(*idx3.shape, 1, dtype=plan.ct, device=idx3.device)
    if not ch.full:
        unused = torch.arange(w, device=idx3.device) >= cnt.unsqueeze(-1)  # [nh, g, w]
        colb = colb.masked_fill(unused.unsqueeze(-1), _NEG_INF)
    return colb.expand(*idx3.shape, bs).reshape(ch.items, 1, w * bs)


def _weights(plan, ch, qg, alpha, kg, idx3, cnt, tail, s):
    """Softmax weights ``[items, block, width * block]`` of one chunk, written into ``s``;
    the scores are ``alpha · qg · kgᵀ`` plus the masks."""
    bs, w = plan.layout.block, ch.width
    colb = _column_bias(plan, ch, idx3, cnt, tail)
    kt = kg.view(ch.items, w * bs, -1).transpose(1, 2)
    if colb is None:  # beta=0: the input (s itself) is ignored
        torch.baddbmm(s, qg, kt, beta=0.0, alpha=alpha, out=s)
    else:
        torch.baddbmm(colb, qg, kt, alpha=alpha, out=s)
    if plan.tri is not None:
        # The diagonal block is kept and, blocks being in increasing order, last.
        s4 = s.view(ch.items, bs, w, bs)
        if ch.full:
            s4[:, :, w - 1].add_(plan.tri)
        else:
            last = cnt.reshape(-1) - 1
            items = torch.arange(ch.items, device=s.device)
            s4[items, :, last] += plan.tri
    torch.ops.aten._softmax.out(s, -1, False, out=s)
    if plan.may_be_empty:
        s.nan_to_num_(0.0)  # rows that see no key: weights 0, output 0
    return s


def _chunk_index(plan: _Plan, selection: BlockSelection, ch: _Chunk):
    """``(idx3 [nh, g, w], cnt [nh, g], idx [nh·g·w], tail)``: the chunk's kept blocks, and
    where the short last key block is among them (bool ``[nh·g·w]``, or None)."""
    idx3 = selection.index[ch.b, ch.h0 : ch.h1, ch.j0 : ch.j1, : ch.width]
    cnt = selection.count[ch.b, ch.h0 : ch.h1, ch.j0 : ch.j1]
    idx = idx3.reshape(-1)
    tail = None
    if plan.nfull < plan.layout.num_k_blocks:
        tail = idx == plan.nfull
        if not bool(tail.any()):
            tail = None
    return idx3, cnt, idx, tail


class _FastPath:
    """The forward of the common chunk with few Python-level tensor operations: one
    query head, whole query blocks, every query block keeping all ``width`` slots, no
    padding keys and whole key blocks, q, k, v in the compute dtype with contiguous rows.
    Queries and outputs are read and written in place, per-head views are made once.

    When ``D == Dv <= block`` the gathered key and value blocks go to the fused
    ``scaled_dot_product_attention`` (the CPU flash kernel: scores a tile at a time in
    its own small buffers, a fast exp, and its batch and query tiles split over
    threads), the value blocks taking the score buffer's place. In causal attention
    only the diagonal block, kept and last, is masked: query ``i`` of the block sees
    keys up to ``(width - 1)·block + i`` of the gathered row. Taken in reverse row
    order, the query at reversed row ``i'`` sees keys ``j`` with ``i' + j <
    width·block``, a mask that depends on ``i' + j`` only: an overlapping
    ``as_strided`` view ``(1, 1)`` of one row of ``width·block + block - 1`` entries
    (0, then ``-inf``) instead of a ``[block, width·block]`` tensor; the queries are
    reversed on the way in and the outputs on the way out. Otherwise two
    ``index_select``, two matmuls, the softmax and the causal triangle."""

    def __init__(self, plan: _Plan, q, k, v, out, selection: BlockSelection, ws: _Workspace):
        L = plan.layout
        self.ok = (
            not plan.padded
            and plan.nfull == L.num_k_blocks
            and all(t.dtype == plan.ct and t.stride(-1) == 1 for t in (q, k, v))
            and all(t.stride(-2) == t.shape[-1] for t in (q, k, v))
        )
        self.fused = plan.ct in (torch.float32, torch.float64) and plan.D == plan.Dv <= L.block
        self.plan, self.q, self.k, self.v, self.out, self.sel = plan, q, k, v, out, selection
        self.s = ws.get("s", ws.size("s"))
        self.kv = ws.get("kv", ws.size("kv"))
        self.head = None
        self.group = None
        self.masks: dict[int, torch.Tensor] = {}
        self.reverse = torch.arange(L.block - 1, -1, -1, device=q.device)

    def _views(self, b: int, h: int, hk: int) -> None:
        plan, bs = self.plan, self.plan.layout.block
        if self.group != (b, hk):
            self.group = (b, hk)
            self.kb = self.k[b, hk].view(-1, bs * plan.D)  # [nK, block·D]
            self.vb = self.v[b, hk].view(-1, bs * plan.Dv)
        self.head = (b, h)
        self.qh = self.q[b, h]  # [N, D]
        self.oh = self.out[b, h]
        self.index = self.sel.index[b, h]  # [nQ, K]

    def _mask(self, w: int) -> torch.Tensor:
        """``[block, w·block]`` additive mask of reversed query rows (see the class)."""
        mask = self.masks.get(w)
        if mask is None:
            bs, W = self.plan.layout.block, w * self.plan.layout.block
            row = torch.zeros(W + bs - 1, dtype=self.plan.ct, device=self.out.device)
            row[W:] = _NEG_INF
            mask = self.masks[w] = row.as_strided((bs, W), (1, 1))
        return mask

    def run(self, ch: _Chunk) -> bool:
        """Compute ``ch`` if it is a common chunk; False to leave it to the general path."""
        if not (self.ok and ch.full and ch.h1 - ch.h0 == 1):
            return False
        plan = self.plan
        L = plan.layout
        bs, w, g = L.block, ch.width, ch.j1 - ch.j0
        t0 = (L.first_block + ch.j0) * bs
        t1 = (L.first_block + ch.j1) * bs
        if t0 < L.row_start or t1 > L.row_end:  # a partial query block
            return False
        if self.head != (ch.b, ch.h0):
            self._views(ch.b, ch.h0, ch.hk)
        a, e = t0 - L.offset, t1 - L.offset
        idx = self.index[ch.j0 : ch.j1, :w]
        idx = idx[0] if g == 1 else idx.reshape(-1)
        n, D, Dv = g * w, plan.D, plan.Dv
        kg = torch.index_select(self.kb, 0, idx, out=self.kv[: n * bs * D].view(n, bs * D))
        qg = self.qh[a:e].view(g, bs, D)
        og = self.oh[a:e].view(g, bs, Dv)
        if self.fused:
            vg = torch.index_select(self.vb, 0, idx, out=self.s[: n * bs * Dv].view(n, bs * Dv))
            kg, vg = kg.view(g, 1, w * bs, D), vg.view(g, 1, w * bs, Dv)
            if plan.causal:
                o = F.scaled_dot_product_attention(
                    qg.flip(1).unsqueeze(1), kg, vg, attn_mask=self._mask(w), scale=plan.scale
                )
                torch.index_select(o.squeeze(1), 1, self.reverse, out=og)
            else:
                o = F.scaled_dot_product_attention(qg.unsqueeze(1), kg, vg, scale=plan.scale)
                og.copy_(o.squeeze(1))
            return True
        s = self.s[: g * bs * w * bs].view(g, bs, w * bs)
        kt = kg.view(g, w * bs, D).transpose(1, 2)
        torch.baddbmm(s, qg, kt, beta=0.0, alpha=plan.scale, out=s)
        if plan.tri is not None:  # the diagonal block: kept, and last
            s.view(g, bs, w, bs)[:, :, w - 1].add_(plan.tri)
        torch.ops.aten._softmax.out(s, -1, False, out=s)
        vg = torch.index_select(self.vb, 0, idx, out=self.kv[: n * bs * Dv].view(n, bs * Dv))
        torch.bmm(s, vg.view(g, w * bs, Dv), out=og)
        return True


# -- forward and backward ----------------------------------------------------------------------


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    selection: BlockSelection,
    *,
    block: int,
    scale: float,
    causal: bool,
    max_scores: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Forward over the kept blocks of ``selection`` (no autograd); inputs must be checked.

    ``fused``: fp32 inputs on CPU may take the C++ kernel
    (:mod:`~attnopt.kernels.block_sparse.fused`), which computes the same result
    faster; False keeps this module's path (the tests compare the two)."""
    if fused:
        from attnopt.kernels.block_sparse.fused import fused_block_sparse

        out = fused_block_sparse(
            q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal
        )
        if out is not None:
            return out
    plan = _plan(
        q, k, v, kv_mask, selection, block=block, scale=scale, causal=causal, max_scores=max_scores
    )
    out = q.new_empty(plan.B, plan.H, plan.N, plan.Dv)
    out[:, :, : plan.layout.row_start - plan.layout.offset].zero_()  # causal rows before key 0
    bs, D, Dv = block, plan.D, plan.Dv
    ws = _Workspace(
        plan, q.device, {"q": bs * D, "o": bs * Dv, "s*": bs * bs, "kv*": bs * max(D, Dv)}
    )
    fast = _FastPath(plan, q, k, v, out, selection, ws)
    with torch.no_grad():
        for ch in plan.chunks:
            if ch.width == 0:  # no kept block: the rows are 0
                _store_rows(plan, ch, out, out.new_zeros(ch.items * bs, Dv))
                continue
            if fast.run(ch):
                continue
            idx3, cnt, idx, tail = _chunk_index(plan, selection, ch)
            # Whole blocks of one head are used in place (q scaled inside the matmul).
            qg, alpha = _rows_view(plan, ch, q), plan.scale
            if qg is None:
                qg = _load_rows(plan, ch, q, alpha, ws.get("q", ch.items * bs * D))
                alpha = 1.0
            kg = _gather(plan, k, ch, idx, tail, ws.get("kv", idx.shape[0] * bs * D))
            s = ws.get("s", ch.items, bs, ch.width * bs)
            p = _weights(plan, ch, qg, alpha, kg, idx3, cnt, tail, s)
            vg = _gather(plan, v, ch, idx, tail, ws.get("kv", idx.shape[0] * bs * Dv))
            o = _rows_view(plan, ch, out)
            direct = o is not None
            if not direct:
                o = ws.get("o", ch.items, bs, Dv)
            torch.bmm(p, vg.view(ch.items, ch.width * bs, Dv), out=o)
            if not direct:
                _store_rows(plan, ch, out, o)
    return out


def block_sparse_backward(
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
    max_scores: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`block_sparse_forward` for ``grad_out``, with the
    selection held fixed."""
    # The backward holds gradients the size of q, k and v anyway: larger chunks, fewer calls.
    plan = _plan(
        q,
        k,
        v,
        kv_mask,
        selection,
        block=block,
        scale=scale,
        causal=causal,
        max_scores=max_scores,
        slack=4,
    )
    bs, D, Dv, ct = block, plan.D, plan.Dv, plan.ct
    nk = plan.layout.num_k_blocks
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    # Summed over chunks in the compute dtype, over whole blocks (sliced back to M).
    dk = torch.zeros(plan.B, plan.Hkv, nk, bs * D, dtype=ct, device=q.device)
    dv = torch.zeros(plan.B, plan.Hkv, nk, bs * Dv, dtype=ct, device=q.device)
    ws = _Workspace(
        plan,
        q.device,
        {
            "q": bs * D,
            "do": bs * Dv,
            "o": bs * Dv,
            "dq": bs * D,
            "s*": bs * bs,
            "ds*": bs * bs,
            "k*": bs * D,
            "v*": bs * Dv,
            "dk*": bs * D,
            "dv*": bs * Dv,
        },
    )
    with torch.no_grad():
        for ch in plan.chunks:
            if ch.width == 0:
                continue
            items, L = ch.items, ch.width * bs
            idx3, cnt, idx, tail = _chunk_index(plan, selection, ch)
            qg = _load_rows(plan, ch, q, plan.scale, ws.get("q", items * bs * D))
            dog = _load_rows(plan, ch, grad_out, 1.0, ws.get("do", items * bs * Dv))
            kg = _gather(plan, k, ch, idx, tail, ws.get("k", idx.shape[0] * bs * D)).view(
                items, L, D
            )
            vg = _gather(plan, v, ch, idx, tail, ws.get("v", idx.shape[0] * bs * Dv)).view(
                items, L, Dv
            )
            p = _weights(plan, ch, qg, 1.0, kg, idx3, cnt, tail, ws.get("s", items, bs, L))
            o = torch.bmm(p, vg, out=ws.get("o", items, bs, Dv))
            delta = o.mul_(dog).sum(dim=-1, keepdim=True)  # [items, bs, 1]
            dvg = torch.bmm(p.transpose(1, 2), dog, out=ws.get("dv", items, L, Dv))
            dv[ch.b, ch.hk].index_add_(0, idx, dvg.view(-1, bs * Dv))
            ds = torch.bmm(dog, vg.transpose(1, 2), out=ws.get("ds", items, bs, L))
            ds.sub_(delta).mul_(p)
            dqg = torch.bmm(ds, kg, out=ws.get("dq", items, bs, D)).mul_(plan.scale)
            _store_rows(plan, ch, dq, dqg)
            dkg = torch.bmm(ds.transpose(1, 2), qg, out=ws.get("dk", items, L, D))
            dk[ch.b, ch.hk].index_add_(0, idx, dkg.view(-1, bs * D))
    M = plan.M
    dk = dk.view(plan.B, plan.Hkv, nk * bs, D)[:, :, :M].to(k.dtype)
    dv = dv.view(plan.B, plan.Hkv, nk * bs, Dv)[:, :, :M].to(v.dtype)
    return dq, dk, dv
