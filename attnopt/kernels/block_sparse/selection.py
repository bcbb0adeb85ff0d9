"""Which key blocks each query block attends: the selection step of block-sparse attention.

The sequence is cut into blocks of ``block`` positions. A query's *row position* is
``i + M - N`` in causal attention (bottom-right aligned, so query blocks line up with
key blocks and the diagonal block holds the query itself) and ``i`` otherwise. Query
block ``j`` of a selection holds the queries whose row position lies in block
``first_block + j`` (see :func:`block_layout`); key block ``c`` holds keys
``[c * block, (c + 1) * block)``.

For query block ``r`` (row-position block) and key block ``c``, with ``d = r - c``
(causal) or ``d = |r - c|`` (bidirectional):

* *allowed*: causal attention never looks at a future block (``r - c >= 0``);
* *local*: ``d < local_blocks`` (the diagonal block and ``local_blocks - 1`` blocks
  back, and in bidirectional attention as many forward);
* *sink*: ``c < sink_blocks``;
* ``pattern="a-shape"`` keeps ``allowed & (local | sink)``;
* ``pattern="radial"`` keeps ``allowed & (local | sink | radial)``: beyond the dense
  local band, distance band ``k >= 1`` covers ``local_blocks * 2**(k-1) <= d <
  local_blocks * 2**k`` and keeps every ``2**k``-th block of it, starting with its
  first (Radial Attention's energy-decay mask read on one axis: density halves each
  time the distance doubles, so a row keeps ``O(log n)`` blocks);
* ``pattern="dynamic"`` (DraftAttention / MoBA / VMoBA style) always keeps the
  *forced* blocks ``allowed & (local | sink)`` and adds blocks chosen by a pooled
  score. Q is mean-pooled over each query block and K over the visible (non-padding)
  keys of each key block; the block logit is
  ``pooled_q · pooled_k · scale + log(n_c)``, where ``n_c`` is the number of visible
  keys of block ``c``: ``softmax`` of these logits estimates the share of attention
  mass each block receives when its keys sit at their mean. A block of only padding
  has logit ``-inf`` and is never chosen (unless forced). Candidates are the allowed,
  non-forced blocks with a finite logit; then

  * ``topk``: the kept set holds ``max(topk, #forced)`` blocks: the forced ones plus
    the ``topk - #forced`` candidates with the highest logits (fewer when fewer
    candidates exist);
  * ``threshold``: with ``p = softmax(logits)`` over allowed blocks, candidates are
    taken in decreasing logit order while the mass of the kept set (forced blocks
    included) is still below ``threshold``: the smallest such set whose estimated mass
    reaches ``threshold``. ``threshold == 1`` keeps every candidate.

The result is a :class:`BlockSelection`, int32 (the block-table layout block-sparse
kernels take): ``index [B, H, nQ, K]`` of kept key blocks in increasing order (entries
from ``count`` on are 0 and mean nothing; in causal attention the diagonal block is
always kept, hence last) and ``count [B, H, nQ]``. Dense ``[N, M]`` scores or masks are
never built; the block-level logits (``[B, H, nQ, nK]`` in all) are computed for the
query heads of one kv head of one batch row and a range of query blocks at a time, so
the selection's temporaries stay far below the kernel's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnopt.kernels.dense.reference import compute_dtype

__all__ = [
    "PATTERNS",
    "BlockLayout",
    "BlockSelection",
    "block_layout",
    "check_block_sparse_args",
    "kept_blocks",
    "pattern_blocks",
    "select_blocks",
]

PATTERNS = ("dynamic", "a-shape", "radial")

# Elements of the temporaries of select_blocks: block logits ([Hg, rows, nK], one kv head
# group of one batch row at a time) and weighted rows pooled at once ([B, H, rows, D]).
# Small, so that the selection adds little to the peak memory of a call and its freed
# buffers are reused by the kernel.
_MAX_ELEMENTS = 1 << 16
# The threshold rule sorts whole rows (values and int64 order, their cumulative mass):
# its row ranges are this much shorter, so that its temporaries stay as small.
_SORT_SHARE = 8


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_block_sparse_args(
    caller: str,
    block: object,
    topk: object,
    threshold: object,
    local_blocks: object,
    sink_blocks: object,
    pattern: object,
) -> None:
    """Check the block-sparse parameters (shared by the config, the op and the kernels).

    Raises ``ValueError`` naming ``caller``, the argument, its value and what is valid.
    """
    if not _is_int(block) or block < 1:
        raise ValueError(
            f"{caller}: block must be a positive int (positions per block), got {block!r}"
        )
    if pattern not in PATTERNS:
        raise ValueError(f"{caller}: pattern must be one of {PATTERNS}, got {pattern!r}")
    if not _is_int(local_blocks) or local_blocks < 1:
        raise ValueError(
            f"{caller}: local_blocks must be a positive int (blocks of the local band, the "
            f"diagonal block included), got {local_blocks!r}"
        )
    if not _is_int(sink_blocks) or sink_blocks < 0:
        raise ValueError(
            f"{caller}: sink_blocks must be a non-negative int (leading key blocks always "
            f"kept), got {sink_blocks!r}"
        )
    if pattern != "dynamic":
        if topk is not None or threshold is not None:
            raise ValueError(
                f"{caller}: topk and threshold only apply to pattern='dynamic'; pattern "
                f"{pattern!r} is static, got topk={topk!r}, threshold={threshold!r}"
            )
        return
    if (topk is None) == (threshold is None):
        raise ValueError(
            f"{caller}: pattern='dynamic' needs exactly one of topk (key blocks kept per "
            f"query block) or threshold (estimated attention mass to keep), got "
            f"topk={topk!r}, threshold={threshold!r}"
        )
    if topk is not None and (not _is_int(topk) or topk < 1):
        raise ValueError(
            f"{caller}: topk must be a positive int (key blocks kept per query block), got {topk!r}"
        )
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 < threshold <= 1.0
    ):
        raise ValueError(
            f"{caller}: threshold must be a number in (0, 1] (estimated attention mass "
            f"to keep), got {threshold!r}"
        )


class BlockLayout(NamedTuple):
    """Block geometry of one call.

    Query ``i`` sits at row position ``i + offset``; rows ``[row_start, row_end)`` exist
    (in causal attention, queries with a negative row position see no key and belong
    to no block). Query block ``j`` holds rows
    ``[(first_block + j) * block, (first_block + j + 1) * block)``.
    """

    block: int
    offset: int
    row_start: int
    row_end: int
    first_block: int
    num_q_blocks: int
    num_k_blocks: int


def block_layout(q_len: int, kv_len: int, block: int, causal: bool) -> BlockLayout:
    """The :class:`BlockLayout` of ``q_len`` queries and ``kv_len`` keys."""
    offset = kv_len - q_len if causal else 0
    start, end = max(offset, 0), q_len + offset
    if end <= start:
        first, nq = 0, 0
    else:
        first = start // block
        nq = (end - 1) // block - first + 1
    return BlockLayout(block, offset, start, max(end, start), first, nq, -(-kv_len // block))


class BlockSelection(NamedTuple):
    """Kept key blocks: ``index [B, H, nQ, K]`` (increasing within the first ``count``
    entries of each row, 0 after) and ``count [B, H, nQ]``, both int32. Static
    patterns return expanded (stride-0) views over batch and heads."""

    index: torch.Tensor
    count: torch.Tensor


def pattern_blocks(
    layout: BlockLayout,
    *,
    causal: bool,
    pattern: str,
    local_blocks: int,
    sink_blocks: int,
    rows: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, allowed)``, bool ``[nQ, nK]`` (or the query blocks ``rows``): the blocks a
    static pattern keeps (for ``"dynamic"``: the forced ones) and the blocks causality
    allows."""
    j0, j1 = rows if rows is not None else (0, layout.num_q_blocks)
    if pattern != "radial":  # the local band and the sinks
        kept, allowed = _dynamic_masks(
            layout,
            (j0, j1),
            causal=causal,
            local_blocks=local_blocks,
            sink_blocks=sink_blocks,
            device=device,
        )
        return kept, torch.ones_like(kept) if allowed is None else allowed
    r = torch.arange(layout.first_block + j0, layout.first_block + j1, device=device)[:, None]
    c = torch.arange(layout.num_k_blocks, device=device)[None, :]
    d = r - c
    if causal:
        allowed = d >= 0
        dist = d
    else:
        allowed = torch.ones_like(d, dtype=torch.bool)
        dist = d.abs()
    kept = (dist < local_blocks) | (c < sink_blocks)
    if pattern == "radial":
        far = max(layout.num_k_blocks, layout.first_block + j1)  # > every distance
        k = 1
        while local_blocks * 2 ** (k - 1) < far:
            lo, hi, stride = local_blocks * 2 ** (k - 1), local_blocks * 2**k, 2**k
            kept |= (dist >= lo) & (dist < hi) & ((dist - lo) % stride == 0)
            k += 1
    return kept & allowed, allowed


def _dynamic_masks(
    layout: BlockLayout,
    rows: tuple[int, int],
    *,
    causal: bool,
    local_blocks: int,
    sink_blocks: int,
    device: torch.device | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local band and sink blocks (what ``"a-shape"`` keeps and ``"dynamic"``
    forces) of the query blocks ``rows``, and the blocks causality allows, as diagonal
    bands of a bool ``[n, nK]`` (no int64 ``[n, nK]`` distances); ``allowed`` is None
    when every block is (bidirectional attention)."""
    j0, j1 = rows
    r0 = layout.first_block + j0  # row-position block of query block j0
    ones = torch.ones(j1 - j0, layout.num_k_blocks, dtype=torch.bool, device=device)
    # Entry (i, c) has d = r0 + i - c: ``triu(t)`` keeps c - i >= t, ``tril(t)`` c - i <= t.
    forced = ones.triu(r0 - local_blocks + 1)  # d < local_blocks
    if causal:
        allowed = ones.tril_(r0)  # d >= 0
        forced &= allowed
        forced[:, :sink_blocks] |= allowed[:, :sink_blocks]
        return forced, allowed
    forced.tril_(r0 + local_blocks - 1)  # -d < local_blocks
    forced[:, :sink_blocks] = True
    return forced, None


def kept_blocks(selection: BlockSelection, num_k_blocks: int) -> torch.Tensor:
    """Bool ``[B, H, nQ, nK]``: True where key block ``c`` is kept for a query block."""
    index, count = selection
    slots = torch.arange(index.shape[-1], device=index.device)
    valid = slots < count.unsqueeze(-1)
    kept = torch.zeros(*index.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=index.device)
    kept.scatter_(-1, torch.where(valid, index, num_k_blocks).long(), True)
    return kept[..., :num_k_blocks]


# -- pooling -------------------------------------------------------------------------------------


def _pool(
    x: torch.Tensor, weight: torch.Tensor | None, offset: int, block: int, first: int, nblocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block means of the rows of ``x [B, Hx, L, D]`` and per-block weight totals.

    Row ``i`` sits at position ``i + offset`` (negative positions are skipped) and
    belongs to block ``(i + offset) // block - first``; rows are weighted by ``weight
    [Bw, Hw, L]`` (``Hw``: 1, ``Hx`` or a multiple of ``Hx``). Returns means
    ``[B, max(Hx, Hw), nblocks, D]`` (0 for blocks of total weight 0) and totals
    ``[Bw|1, Hw|1, nblocks]``, in the compute dtype."""
    B, Hx, L, D = x.shape
    ct = compute_dtype(x.dtype)
    Ho = Hx if weight is None else max(Hx, weight.shape[1])
    sums = torch.zeros(B, Ho, nblocks, D, dtype=ct, device=x.device)
    wshape = (1, 1) if weight is None else weight.shape[:2]
    totals = torch.zeros(*wshape, nblocks, dtype=ct, device=x.device)
    start = max(0, -offset)
    if weight is None:
        # Plain means: a partial first block, whole blocks summed through a view, a
        # partial last block.
        head = min(L, start + (-(start + offset)) % block)
        mid = head + (L - head) // block * block
        for a, e in ((start, head), (mid, L)):
            if e > a:
                j = (a + offset) // block - first
                sums[:, :, j] = x[:, :, a:e].sum(2, dtype=ct)
                totals[..., j] = e - a
        if mid > head:
            n, j = (mid - head) // block, (head + offset) // block - first
            sums[:, :, j : j + n] = x[:, :, head:mid].unflatten(2, (n, block)).sum(3, dtype=ct)
            totals[..., j : j + n] = block
        return sums.div_(totals.clamp(min=1).unsqueeze(-1)), totals
    step = max(1, _MAX_ELEMENTS // (B * Ho * D))
    for a in range(start, L, step):
        b = min(L, a + step)
        idx = (torch.arange(a, b, device=x.device) + offset) // block - first
        xc = x[:, :, a:b].to(ct)  # [B, Hx, c, D]
        wc = weight[:, :, a:b].to(ct)  # [Bw, Hw, c]
        totals.index_add_(2, idx, wc)
        if wc.shape[1] in (1, Hx):
            xc = xc * wc.unsqueeze(-1)
        else:  # per-query-head weights over shared (grouped) kv heads
            R = Ho // Hx
            xc = (xc.unsqueeze(2) * wc.view(wc.shape[0], Hx, R, b - a, 1)).flatten(1, 2)
        sums.index_add_(2, idx, xc)
    return sums.div_(totals.clamp(min=1).unsqueeze(-1)), totals


def _mask3(kv_mask: torch.Tensor, B: int, H: int, M: int) -> torch.Tensor:
    """``kv_mask`` as ``[B|1, H|1, M]``."""
    km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
    return km.expand(km.shape[0], km.shape[1], M)


def _pooled_queries(q, layout: BlockLayout, j0: int, j1: int) -> torch.Tensor:
    """Mean queries of query blocks ``[j0, j1)``: ``[B, H, j1 - j0, D]``."""
    bs = layout.block
    lo = max(0, (layout.first_block + j0) * bs - layout.offset)
    hi = min(q.shape[2], (layout.first_block + j1) * bs - layout.offset)
    rows = q[:, :, lo:hi]
    return _pool(rows, None, layout.offset + lo, bs, layout.first_block + j0, j1 - j0)[0]


def _pooled_keys(k, kv_mask, layout: BlockLayout, heads: int):
    """Mean visible keys ``[B, Hkv|H, nK, D]`` and ``log(n_c)`` ``[B|1, 1|H, nK]``
    (``-inf`` for blocks of only padding)."""
    B, _, M, _ = k.shape
    weight = None
    if kv_mask is not None:
        weight = _mask3(kv_mask, B, heads, M).to(compute_dtype(k.dtype))
    pk, kn = _pool(k, weight, 0, layout.block, 0, layout.num_k_blocks)
    return pk, kn.log()


def _block_logits(pq, pk, logn, scale: float) -> torch.Tensor:
    """``[B, H, n, nK]`` logits ``pooled_q · pooled_k · scale + log(n_c)``."""
    B, H, n, D = pq.shape
    Hk, nk = pk.shape[1], pk.shape[2]
    logits = pq.reshape(B, Hk, (H // Hk) * n, D) @ pk.transpose(-1, -2)
    return logits.view(B, H, n, nk).mul_(scale).add_(logn.unsqueeze(2))


# -- selection -----------------------------------------------------------------------------------


def _sorted_slots(idx: torch.Tensor, keep: torch.Tensor, nk: int) -> BlockSelection:
    """Kept entries of ``idx`` in increasing order, padded with 0."""
    key = torch.where(keep, idx, nk).sort(dim=-1).values
    count = keep.sum(dim=-1)
    width = int(count.max()) if count.numel() else 0
    key = key[..., :width]
    return BlockSelection(torch.where(key < nk, key, 0).int(), count.int())


def _select_rows(
    logits, forced, allowed, topk, threshold, *, overwrite: bool = False
) -> BlockSelection:
    """Dynamic selection for one range of query blocks; ``logits [B, H, n, nK]``.

    ``allowed`` None: every block is allowed. ``overwrite``: ``logits`` may be used as
    scratch (saves copies of it)."""
    nk = logits.shape[-1]
    fill = torch.Tensor.masked_fill_ if overwrite else torch.Tensor.masked_fill
    if allowed is not None:
        logits = fill(logits, ~allowed, float("-inf"))
    if topk is not None:
        nforced = forced.sum(dim=-1)  # [n]
        budget = torch.clamp(nforced, min=topk)
        width = min(nk, int(budget.max()))
        ranked = fill(logits, forced, float("inf"))
        vals, idx = ranked.topk(width, dim=-1)
        slot = torch.arange(width, device=logits.device)
        keep = (slot < budget[:, None]) & (vals > float("-inf"))
        return _sorted_slots(idx, keep, nk)
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows without a finite logit
    forced_mass = (p * forced).sum(dim=-1, keepdim=True)
    cand = fill(logits, forced, float("-inf"))
    vals, order = cand.sort(dim=-1, descending=True)
    keep = vals > float("-inf")
    del vals, cand, logits
    if threshold < 1.0:
        ps = p.gather(-1, order)
        before = ps.cumsum(dim=-1).sub_(ps)  # mass of the candidates ranked above
        del ps
        keep &= before.add_(forced_mass) < threshold
        del before
    del p
    kept = torch.zeros_like(keep).scatter_(-1, order, keep) | forced
    idx = torch.arange(nk, device=kept.device).expand(kept.shape)
    return _sorted_slots(idx, kept, nk)


def select_blocks(
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
    """The key blocks each query block keeps (see the module docstring for the rule).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, M, D]``, ``H % Hkv == 0`` (inputs are assumed
            checked; selection is per query head, pooled K comes from its kv head).
        kv_mask: optional bool broadcastable to ``[B, H, M]``; padding keys are left out
            of pooled K and ``n_c``.
        block, causal, scale, pattern, topk, threshold, local_blocks, sink_blocks: as in
            :class:`~attnopt.kernels.block_sparse.BlockSparse`.

    Returns:
        :class:`BlockSelection` with ``nQ = block_layout(N, M, block, causal).num_q_blocks``.

    Example:
        >>> q, k = torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)
        >>> sel = select_blocks(q, k, block=64, causal=True, scale=0.35, topk=2)
        >>> sel.count.tolist()
        [[[1, 2, 2, 2], [1, 2, 2, 2]]]
    """
    B, H, N, _ = q.shape
    M = k.shape[2]
    layout = block_layout(N, M, block, causal)
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    dev = q.device
    geo = dict(causal=causal, local_blocks=local_blocks, sink_blocks=sink_blocks, device=dev)
    with torch.no_grad():
        if pattern != "dynamic" or nq == 0 or nk == 0:
            return _static_blocks(layout, B, H, pattern=pattern, **geo)
        return _dynamic_blocks(q, k, kv_mask, layout, scale, topk, threshold, geo)


def _static_blocks(layout: BlockLayout, B: int, H: int, *, pattern: str, **geo) -> BlockSelection:
    """A static pattern's selection, a range of query blocks at a time, expanded over
    batch and heads."""
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    step = max(1, _MAX_ELEMENTS // (_SORT_SHARE * max(1, nk)))
    parts = []
    for j0 in range(0, max(nq, 1), step):
        rows = (j0, min(nq, j0 + step))
        kept, _ = pattern_blocks(layout, pattern=pattern, rows=rows, **geo)
        idx = torch.arange(nk, device=geo["device"]).expand(kept.shape)
        parts.append(_sorted_slots(idx, kept, nk))
    index, count = _concat_rows(parts, nq, geo["device"])
    return BlockSelection(index.expand(B, H, *index.shape), count.expand(B, H, *count.shape))


def _concat_rows(parts: list[BlockSelection], nq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges ``[..., n_i, w_i]`` stacked along the query blocks, padded with 0."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.index.shape[-1] for p in parts)
    lead = parts[0].index.shape[:-2]
    index = torch.zeros(*lead, nq, width, dtype=torch.int32, device=device)
    j0 = 0
    for p in parts:
        n, w = p.index.shape[-2], p.index.shape[-1]
        index[..., j0 : j0 + n, :w] = p.index
        j0 += n
    return index, torch.cat([p.count for p in parts], dim=-1)


def _dynamic_blocks(q, k, kv_mask, layout: BlockLayout, scale, topk, threshold, geo):
    """Dynamic selection, one kv head group of one batch row and a range of query blocks
    at a time (pooled keys, logits and the sort of one group only: small temporaries)."""
    B, H, _, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    R = H // Hkv
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    dev = q.device
    km = None if kv_mask is None else _mask3(kv_mask, B, H, M)  # [B|1, H|1, M]
    per_row = R * nk * (1 if topk is not None else _SORT_SHARE)
    step = max(1, _MAX_ELEMENTS // per_row)
    ranges = [(j0, min(nq, j0 + step)) for j0 in range(0, nq, step)]
    masks = _dynamic_masks(layout, ranges[0], **geo) if len(ranges) == 1 else None
    if topk is not None:
        # The band (both sides when bidirectional) and the sinks bound the forced blocks.
        band = local_blocks = geo["local_blocks"]
        if not geo["causal"]:
            band = 2 * local_blocks - 1
        width = min(nk, max(topk, band + geo["sink_blocks"]))
        index = torch.zeros(B, H, nq, width, dtype=torch.int32, device=dev)
        count = torch.zeros(B, H, nq, dtype=torch.int32, device=dev)
    else:
        groups = []
    for b in range(B):
        for hk in range(Hkv):
            h0, h1 = hk * R, hk * R + R
            kmg = None
            if km is not None:
                bm = b if km.shape[0] > 1 else 0
                hs = slice(h0, h1) if km.shape[1] > 1 else slice(0, 1)
                kmg = km[bm : bm + 1, hs]
            pk, logn = _pooled_keys(k[b : b + 1, hk : hk + 1], kmg, layout, R)
            parts = []
            for rows in ranges:
                if masks is None:
                    forced, allowed = _dynamic_masks(layout, rows, **geo)
                else:
                    forced, allowed = masks
                pq = _pooled_queries(q[b : b + 1, h0:h1], layout, *rows)
                logits = _block_logits(pq, pk, logn, scale)  # [1, R, n, nK]
                del pq
                sel = _select_rows(logits, forced, allowed, topk, threshold, overwrite=True)
                del logits
                if topk is not None:
                    w = sel.index.shape[-1]
                    index[b, h0:h1, rows[0] : rows[1], :w] = sel.index[0]
                    count[b, h0:h1, rows[0] : rows[1]] = sel.count[0]
                else:
                    parts.append(BlockSelection(sel.index[0], sel.count[0]))
            if topk is None:
                groups.append(_concat_rows(parts, nq, dev))  # [R, nq, w], [R, nq]
    if topk is None:
        width = max(g[0].shape[-1] for g in groups)
        index = torch.zeros(B, H, nq, width, dtype=torch.int32, device=dev)
        count = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
        for i, (gi, gc) in enumerate(groups):
            b, hk = divmod(i, Hkv)
            index[b, hk * R : hk * R + R, :, : gi.shape[-1]] = gi
            count[b, hk * R : hk * R + R] = gc
        del groups
    used = int(count.max()) if count.numel() else 0
    if used < index.shape[-1]:
        index = index[..., :used].contiguous()
    return BlockSelection(index, count)
