"""Block-sparse attention: selection, reference, gather kernel and custom op against a naive
implementation written here from the definition, plus gradients, errors, export and
end-to-end exactness on the tiny model zoo.

Metric: elementwise ``|out - naive| <= atol + rtol * |naive|`` where ``naive`` is the
fp64 computation on the same (already rounded) inputs, with the blocks the naive
selection keeps.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.config import config_from_dict
from attnopt.kernels import get_variant
from attnopt.kernels.block_sparse import (
    BlockSparse,
    block_layout,
    block_sparse_attention_gather,
    block_sparse_attention_reference,
    select_blocks,
)
from attnopt.kernels.block_sparse.selection import kept_blocks
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.site import AttentionSite, MaskKind
from attnopt.zoo import tiny_model
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches

TOLERANCE = KERNEL_TOLERANCE["block_sparse"]

OP = torch.ops.attnopt.block_sparse_attention


# -- the naive truth ---------------------------------------------------------------------------


def naive_kept(q, k, kv_mask, *, block, causal, scale, pattern, topk, threshold, local, sinks):
    """{(b, h, r): set of kept key blocks} for every query block ``r`` (row-position
    block), one block pair at a time, straight from the definition, in fp64."""
    B, H, N, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    q, k = q.double(), k.double()
    seen = torch.ones(B, H, M, dtype=torch.bool)
    if kv_mask is not None:
        seen = seen & kv_mask
    off = M - N if causal else 0
    n_kb = -(-M // block)
    out = {}
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            # Pooled keys and visible-key counts do not depend on the query block.
            pooled = {}
            for c in range(n_kb):
                keys = [j for j in range(c * block, min(M, (c + 1) * block)) if seen[b, h, j]]
                pooled[c] = (k[b, kh, keys].mean(0), len(keys)) if keys else (None, 0)
            for r in sorted({(i + off) // block for i in range(N) if i + off >= 0}):
                members = [i for i in range(N) if i + off >= 0 and (i + off) // block == r]
                pooled_q = q[b, h, members].mean(0)
                info = {}
                for c in range(n_kb):
                    pooled_k, n_c = pooled[c]
                    logit = -math.inf  # a block of only padding
                    if n_c:
                        logit = float(pooled_q @ pooled_k) * scale + math.log(n_c)
                    d = r - c
                    allowed = d >= 0 if causal else True
                    dist = d if causal else abs(d)
                    far = False
                    band = 1
                    while local * 2 ** (band - 1) <= dist:
                        lo = local * 2 ** (band - 1)
                        if dist < local * 2**band and (dist - lo) % 2**band == 0:
                            far = True
                        band += 1
                    info[c] = (logit, allowed, dist < local or c < sinks, far)
                if pattern == "a-shape":
                    kept = {c for c, (_, ok, base, _) in info.items() if ok and base}
                elif pattern == "radial":
                    kept = {c for c, (_, ok, base, far) in info.items() if ok and (base or far)}
                else:
                    kept = {c for c, (_, ok, base, _) in info.items() if ok and base}
                    cands = [c for c, (lg, ok, base, _) in info.items() if ok and not base]
                    cands = [c for c in cands if info[c][0] > -math.inf]
                    cands.sort(key=lambda c: -info[c][0])
                    if topk is not None:
                        kept |= set(cands[: max(topk - len(kept), 0)])
                    else:
                        finite = [lg for lg, ok, _, _ in info.values() if ok and lg > -math.inf]
                        top = max(finite, default=0.0)
                        total = sum(math.exp(lg - top) for lg in finite)
                        mass = sum(
                            math.exp(info[c][0] - top) / total
                            for c in kept
                            if info[c][0] > -math.inf
                        )
                        for c in cands:
                            if threshold < 1.0 and mass >= threshold:
                                break
                            kept.add(c)
                            mass += math.exp(info[c][0] - top) / total
                out[(b, h, r)] = kept
    return out


def naive_attention(q, k, v, visible, scale):
    """fp64 masked softmax attention; rows without a visible key are 0."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    visible = visible.expand_as(scores)
    any_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * any_key
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


def naive_block_sparse(q, k, v, kv_mask, *, block, causal, scale, **kw):
    B, H, N, _ = q.shape
    M = k.shape[2]
    kept = naive_kept(q, k, kv_mask, block=block, causal=causal, scale=scale, **kw)
    off = M - N if causal else 0
    visible = torch.zeros(B, H, N, M, dtype=torch.bool)
    key_block = torch.arange(M) // block
    for b in range(B):
        for h in range(H):
            for i in range(N):
                p = i + off
                if p < 0:
                    continue  # a causal query before the first key sees nothing
                row = torch.isin(
                    key_block, torch.tensor(sorted(kept[(b, h, p // block)]), dtype=torch.long)
                )
                if causal:
                    row &= torch.arange(M) <= p
                if kv_mask is not None:
                    row &= kv_mask[b, h]
                visible[b, h, i] = row
    return naive_attention(q, k, v, visible, scale), kept


# -- random problems ---------------------------------------------------------------------------


@st.composite
def problems(draw, dtype=torch.float32, max_len=130):
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    n = draw(st.one_of(st.sampled_from([1, 2, 63, 64, 65]), st.integers(1, max_len)))
    causal = draw(st.booleans())
    m = n + draw(st.sampled_from([0, 0, 1, 17, -1 if n > 1 else 0] + ([] if causal else [-30])))
    m = max(m, 1)
    pattern = draw(st.sampled_from(["dynamic", "dynamic", "a-shape", "radial"]))
    topk = threshold = None
    if pattern == "dynamic":
        if draw(st.booleans()):
            topk = draw(st.integers(1, 6))
        else:
            threshold = draw(st.sampled_from([0.3, 0.6, 0.9, 1.0]))
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        m=m,
        head_dim=draw(st.sampled_from([1, 3, 16, 24])),
        value_dim=draw(st.sampled_from([1, 5, 16])),
        block=draw(st.sampled_from([4, 7, 16, 32])),
        pattern=pattern,
        topk=topk,
        threshold=threshold,
        local=draw(st.integers(1, 3)),
        sinks=draw(st.integers(0, 2)),
        causal=causal,
        mask=draw(st.sampled_from([None, "batch", "head", "keys", "empty", "block"])),
        max_scores=draw(st.sampled_from([None, 1, 3000])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, n, m = (case[x] for x in ("batch", "heads", "kv_heads", "n", "m"))
    dtype = case["dtype"]

    def randn(heads, length, dim):
        if case["layout"] == "bnhd":  # [B, N, H, D] storage seen through a transpose
            return torch.randn(b, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, length, dim, generator=gen).to(dtype)

    q = randn(h, n, case["head_dim"])
    k = randn(hkv, m, case["head_dim"])
    v = randn(hkv, m, case["value_dim"])
    kind = case["mask"]
    kv_mask = None
    if kind is not None:
        shape = {"batch": (b, 1, m), "head": (b, h, m), "keys": (m,)}.get(kind, (b, 1, m))
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask.view(-1, m)[:, -1] = False  # always some padding
        if kind == "empty":
            kv_mask[0] = False  # every query of batch 0 sees no key
        if kind == "block":  # a whole key block of padding
            kv_mask[..., case["block"] : 2 * case["block"]] = False
    return q, k, v, kv_mask


def _kw(case):
    return dict(
        block=case["block"],
        topk=case["topk"],
        threshold=case["threshold"],
        local_blocks=case["local"],
        sink_blocks=case["sinks"],
        pattern=case["pattern"],
    )


def run_all(case, q, k, v, kv_mask):
    """(name, output) of every implementation under test."""
    kw = _kw(case)
    scale = 1.0 / math.sqrt(case["head_dim"])
    causal = case["causal"]
    yield (
        "reference",
        block_sparse_attention_reference(q, k, v, kv_mask, scale=scale, causal=causal, **kw),
    )
    yield (
        "gather",
        block_sparse_attention_gather(
            q, k, v, kv_mask, scale=scale, causal=causal, max_scores=case["max_scores"], **kw
        ),
    )
    yield (
        "gather-pytorch",
        block_sparse_attention_gather(
            q, k, v, kv_mask, scale=scale, causal=causal, max_scores=case["max_scores"],
            fused=False, **kw,
        ),
    )  # fmt: skip
    args = tuple(kw[x] for x in ("block", "topk", "threshold", "local_blocks", "sink_blocks"))
    yield "op", OP(q, k, v, kv_mask, None, scale, causal, *args, kw["pattern"])


def _full_mask(kv_mask, B, H, M):
    if kv_mask is None:
        return None
    km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
    return km.expand(B, H, M)


def check_case(case):
    q, k, v, kv_mask = make_inputs(case)
    B, H, N, _ = q.shape
    M = k.shape[2]
    scale = 1.0 / math.sqrt(case["head_dim"])
    expected, kept = naive_block_sparse(
        q,
        k,
        v,
        _full_mask(kv_mask, B, H, M),
        block=case["block"],
        causal=case["causal"],
        scale=scale,
        pattern=case["pattern"],
        topk=case["topk"],
        threshold=case["threshold"],
        local=case["local"],
        sinks=case["sinks"],
    )
    # The selection itself, block by block.
    kw = _kw(case)
    sel = select_blocks(q, k, kv_mask, causal=case["causal"], scale=scale, **kw)
    layout = block_layout(N, M, case["block"], case["causal"])
    table = kept_blocks(sel, layout.num_k_blocks)
    assert table.shape == (B, H, layout.num_q_blocks, layout.num_k_blocks)
    got = {
        (b, h, layout.first_block + j): set(torch.nonzero(table[b, h, j]).flatten().tolist())
        for b in range(B)
        for h in range(H)
        for j in range(layout.num_q_blocks)
    }
    assert got == kept
    index = sel.index.expand(B, H, -1, -1)
    for j in range(index.shape[-1] - 1):  # increasing within count
        inside = j + 1 < sel.count
        assert (index[..., j][inside] < index[..., j + 1][inside]).all()
    for name, out in run_all(case, q, k, v, kv_mask):
        assert out.shape == expected.shape, name
        assert_matches(out, expected, case["dtype"], TOLERANCE)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no visible key must be exactly 0"


# -- forward -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fp32_matches_naive(case):
    check_case(case)


def _case(**overrides):
    case = dict(
        batch=2,
        heads=4,
        kv_heads=2,
        n=150,
        m=150,
        head_dim=16,
        value_dim=8,
        block=16,
        pattern="dynamic",
        topk=3,
        threshold=None,
        local=1,
        sinks=1,
        causal=True,
        mask="batch",
        max_scores=None,
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    "causal-topk-gqa": _case(),
    "causal-threshold": _case(topk=None, threshold=0.7, mask="head"),
    "bidirectional-topk-bnhd": _case(causal=False, layout="bnhd", local=2),
    "queries-at-end-unaligned": _case(n=37, m=131, block=16, topk=2, mask="keys"),
    "decode-one-query": _case(n=1, m=200, topk=4, mask=None),
    "more-queries-than-keys": _case(n=70, m=25, block=8, mask="empty"),
    "cross-attention": _case(causal=False, n=40, m=97, mask="block"),
    "a-shape": _case(pattern="a-shape", topk=None, local=2, sinks=1),
    "radial": _case(pattern="radial", topk=None, n=260, m=260, block=8, sinks=0),
    "tail-block": _case(n=100, m=100, block=32, topk=2, mask=None),
    "one-slot-chunks": _case(max_scores=1, mask="head", topk=None, threshold=0.5),
    "mqa-block-1": _case(heads=4, kv_heads=1, n=20, m=20, block=1, topk=5),
    # More kept blocks than the fused kernel scores at once (an online softmax across groups).
    "many-kept-causal": _case(n=230, m=230, block=8, topk=13, mask="head"),
    "many-kept-bidirectional-odd-dims": _case(
        causal=False, n=190, m=203, block=8, topk=11, head_dim=13, value_dim=7, layout="bnhd"
    ),
    "many-kept-threshold-empty": _case(
        n=200, m=200, block=8, topk=None, threshold=0.9, mask="empty"
    ),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype, max_len=90)))


EXACT = [
    pytest.param(n, m, causal, kw, id=f"{n}x{m}-{'causal' if causal else 'bidir'}-{name}")
    for n, m, causal in [(1, 1, True), (63, 63, True), (63, 63, False), (40, 101, True),
                         (100, 100, False), (130, 129, True), (30, 77, False)]
    for name, kw in [("topk", dict(topk=1000)), ("threshold", dict(threshold=1.0)),
                     ("a-shape-wide", dict(pattern="a-shape", local_blocks=1000))]
]  # fmt: skip


@pytest.mark.parametrize(("n", "m", "causal", "kw"), EXACT)
def test_keeping_every_block_is_dense(n, m, causal, kw):
    gen = torch.Generator().manual_seed(n * 1000 + m)
    q = torch.randn(2, 4, n, 24, generator=gen)
    k = torch.randn(2, 2, m, 24, generator=gen)
    v = torch.randn(2, 2, m, 12, generator=gen)
    kv_mask = torch.rand(2, 1, m, generator=gen) > 0.2
    kv_mask[1, :, :16] = False  # a whole block of padding
    dense = dense_attention_reference(q, k, v, kv_mask, scale=0.3, causal=causal)
    full = dict(block=16, topk=None, threshold=None, local_blocks=1, sink_blocks=1)
    full.update(kw)
    pattern = full.pop("pattern", "dynamic")
    outs = {
        "reference": block_sparse_attention_reference(
            q, k, v, kv_mask, scale=0.3, causal=causal, pattern=pattern, **full
        ),
        "gather": block_sparse_attention_gather(
            q, k, v, kv_mask, scale=0.3, causal=causal, pattern=pattern, **full
        ),
        "op": OP(q, k, v, kv_mask, None, 0.3, causal, *full.values(), pattern),
    }
    for name, out in outs.items():
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5, msg=name)


def test_long_sequence_many_chunks():
    """Many chunks, GQA, uneven counts (causal top-k), an unaligned tail: the benchmark path."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1500, 32, generator=gen)
    k = torch.randn(1, 2, 1500, 32, generator=gen)
    v = torch.randn(1, 2, 1500, 32, generator=gen)
    kw = dict(block=64, topk=4, causal=True)
    expected = block_sparse_attention_reference(q, k, v, **kw)
    out = block_sparse_attention_gather(q, k, v, max_scores=1 << 14, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "causal,n,m,dtype",
    [
        (False, 1024, 1024, torch.float32),
        (True, 1024, 1024, torch.float32),
        (True, 960, 1024, torch.float32),  # bottom-right aligned, whole query blocks
        (True, 1024, 1024, torch.float64),
    ],
    ids=["bidirectional", "causal", "causal-offset", "causal-fp64"],
)
def test_fused_common_chunks(causal, n, m, dtype):
    """Whole blocks, one query head per kv head, D == Dv <= block: the chunks that go to
    the fused kernel (causal: the reversed-row diagonal mask), against the reference."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, n, 32, generator=gen).to(dtype)
    k = torch.randn(1, 3, m, 32, generator=gen).to(dtype)
    v = torch.randn(1, 3, m, 32, generator=gen).to(dtype)
    kw = dict(block=64, topk=4, causal=causal)
    expected = block_sparse_attention_reference(q, k, v, **kw)
    out = block_sparse_attention_gather(q, k, v, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_no_allocation_grows_with_n_times_m():
    """Forward and backward allocate nothing larger than q, k, v or their gradients, far
    below one [N, M] score matrix."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(9)
    n, d = 2048, 16
    q, k, v = (torch.randn(1, 2, n, d, generator=gen, requires_grad=True) for _ in range(3))
    kv_mask = torch.rand(1, 1, n, generator=gen) > 0.1
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = OP(q, k, v, kv_mask, None, 0.25, True, 64, 4, None, 1, 1, "dynamic")
        out.backward(torch.ones_like(out))
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert largest <= q.numel() * 4
    assert largest * 16 <= n * n * 4


def test_radial_keeps_log_many_blocks():
    q = k = torch.randn(1, 1, 4096, 4)
    sel = select_blocks(q, k, block=4, causal=True, scale=1.0, pattern="radial", sink_blocks=0)
    count = sel.count[0, 0]
    assert count[0] == 1 and count[1] == 2  # the diagonal, then distance 1
    assert int(count.max()) <= 2 * math.ceil(math.log2(1024)) + 1
    # local_blocks=4: dense band of 4, then 2 kept per doubling band.
    sel = select_blocks(
        q, k, block=4, causal=True, scale=1.0, pattern="radial", local_blocks=4, sink_blocks=0
    )
    kept = kept_blocks(sel, 1024)[0, 0, 1023]
    # Distances 0-3, then 4 and 6, then 8 and 12, ...
    assert torch.nonzero(kept).flatten().tolist()[-8:] == [
        1011,
        1015,
        1017,
        1019,
        *range(1020, 1024),
    ]


def test_dynamic_selection_follows_the_pooled_scores():
    """A key block that matches the queries is picked; a block of padding is not."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 256, 8, generator=gen) * 0.1
    k = torch.randn(1, 1, 256, 8, generator=gen) * 0.1
    q[..., 0] += 3.0
    k[0, 0, 64:96, 0] += 3.0  # block 2 of 8 (block=32) aligns with every query
    kv_mask = torch.ones(256, dtype=torch.bool)
    kv_mask[160:192] = False  # block 5 is padding
    sel = select_blocks(q, k, kv_mask, block=32, causal=False, scale=1.0, topk=8, sink_blocks=0)
    # Everything but the padding block, which only its own query block keeps (local band).
    assert sel.count.flatten().tolist() == [7] * 5 + [8] + [7] * 2
    sel = select_blocks(q, k, kv_mask, block=32, causal=False, scale=1.0, topk=2, sink_blocks=0)
    kept = kept_blocks(sel, 8)[0, 0]
    assert kept[:, 2].all()
    assert not kept[[0, 1, 2, 3, 4, 6, 7], 5].any()


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` (and the kernels' output and workspace buffers) filled with NaN,
    so a row or buffer element the kernel forgets to write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_every_output_element_is_written(case, nan_filled_empty):
    q, k, v, kv_mask = make_inputs(case)
    for t in (q, k, v):
        t.requires_grad_(True)
    kw = _kw(case)
    args = tuple(kw[x] for x in ("block", "topk", "threshold", "local_blocks", "sink_blocks"))
    out = OP(q, k, v, kv_mask, None, 0.125, case["causal"], *args, kw["pattern"])
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("causal", "args"),
    [
        (True, (2, 2, None, 1, 1, "dynamic")),
        (False, (2, None, 0.5, 1, 0, "dynamic")),
        (True, (3, None, None, 1, 1, "radial")),
        (False, (2, None, None, 1, 1, "a-shape")),
    ],
    ids=["causal-topk", "bidirectional-threshold", "causal-radial", "bidirectional-a-shape"],
)
def test_gradcheck_op(causal, args):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    kv_mask = torch.tensor([True, False, True, True, True, True, False, True, True])

    def fn(q, k, v):
        return OP(q, k, v, kv_mask, None, 0.6, causal, *args)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    """Schema, fake tensor, autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 11, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 11, generator=gen) > 0.2
    torch.library.opcheck(OP, (q, k, v, kv_mask, None, 0.35, True, 4, 2, None, 1, 1, "dynamic"))
    torch.library.opcheck(OP, (q, k, v, None, None, 0.35, False, 3, None, 0.8, 1, 0, "dynamic"))
    torch.library.opcheck(OP, (q, k, v, None, None, 0.35, True, 2, None, None, 1, 0, "radial"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_grads(dtype):
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 90, 16, generator=gen).to(dtype)
    k = torch.randn(1, 2, 90, 16, generator=gen).to(dtype)
    v = torch.randn(1, 2, 90, 8, generator=gen).to(dtype)
    grad = torch.randn(1, 4, 90, 8, generator=gen).to(dtype)
    kv_mask = torch.rand(1, 1, 90, generator=gen) > 0.2
    # A static pattern: the selection cannot differ between the fp64 truth and dtype.
    kw = dict(block=16, pattern="a-shape", local_blocks=2, sink_blocks=1, causal=True)

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.autograd.backward(fn(*inputs), grad.to(dtype))
        return [t.grad for t in inputs]

    want = grads(
        lambda q, k, v: block_sparse_attention_reference(q, k, v, kv_mask, scale=0.25, **kw),
        torch.float64,
    )
    got = grads(
        lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, True, 16, None, None, 2, 1, "a-shape"),
        dtype,
    )
    atol, rtol = TOLERANCE[dtype]
    for label, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=f"d{label}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_grads_match_reference(causal):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 150, 16, generator=gen)
    k = torch.randn(2, 2, 170, 16, generator=gen)
    v = torch.randn(2, 2, 170, 8, generator=gen)
    grad = torch.randn(2, 4, 150, 8, generator=gen)
    kv_mask = torch.rand(2, 1, 170, generator=gen) > 0.2
    kw = dict(block=16, topk=4, local_blocks=2, sink_blocks=1, scale=0.25, causal=causal)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    expected = grads(lambda q, k, v: block_sparse_attention_reference(q, k, v, kv_mask, **kw))
    actual = {
        "gather": grads(
            lambda q, k, v: block_sparse_attention_gather(q, k, v, kv_mask, max_scores=3000, **kw)
        ),
        "op": grads(
            lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, causal, 16, 4, None, 2, 1, "dynamic")
        ),
    }
    for name, got in actual.items():
        for label, a, b in zip("qkv", got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} d{label}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), r"pattern='dynamic' needs exactly one of topk .*got topk=None, threshold=None"),
        (dict(topk=4, threshold=0.5), r".*exactly one of topk .*got topk=4, threshold=0.5"),
        (dict(topk=0), r"topk must be a positive int .*got 0"),
        (dict(topk=2.0), r"topk must be a positive int .*got 2.0"),
        (dict(topk=True), r"topk must be a positive int .*got True"),
        (dict(threshold=0.0), r"threshold must be a number in \(0, 1\] .*got 0.0"),
        (dict(threshold=1.5), r"threshold must be a number in \(0, 1\] .*got 1.5"),
        (dict(threshold="0.5"), r"threshold must be a number in \(0, 1\] .*got '0.5'"),
        (dict(topk=4, block=0), r"block must be a positive int .*got 0"),
        (dict(topk=4, block=True), r"block must be a positive int .*got True"),
        (dict(topk=4, local_blocks=0), r"local_blocks must be a positive int .*got 0"),
        (dict(topk=4, sink_blocks=-1), r"sink_blocks must be a non-negative int .*got -1"),
        (dict(topk=4, pattern="banded"), r"pattern must be one of .*'radial'.*got 'banded'"),
        (dict(pattern="a-shape", topk=4), r"topk and threshold only apply to pattern='dynamic'"),
        (dict(pattern="radial", threshold=0.9), r"topk and threshold .*'radial' is static"),
    ],
    ids=[
        "neither",
        "both",
        "topk-0",
        "topk-float",
        "topk-bool",
        "threshold-0",
        "threshold-above-1",
        "threshold-str",
        "block-0",
        "block-bool",
        "local-0",
        "sinks-negative",
        "pattern-unknown",
        "a-shape-topk",
        "radial-threshold",
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match="BlockSparse: " + match):
        BlockSparse(**kwargs)


def _qkv(heads=4, kv_heads=2, n=8):
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randn(1, heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
    )


def test_op_rejects_bias():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"bias must be None .*shape \(1, 4, 8, 8\)"):
        OP(q, k, v, None, torch.zeros(1, 4, 8, 8), 0.5, True, 4, 1, None, 1, 1, "dynamic")


def test_op_rejects_bad_args():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"block_sparse_attention: block .* got 0"):
        OP(q, k, v, None, None, 0.5, True, 0, 1, None, 1, 1, "dynamic")
    with pytest.raises(ValueError, match=r"exactly one of topk .*topk=None, threshold=None"):
        OP(q, k, v, None, None, 0.5, True, 4, None, None, 1, 1, "dynamic")
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\] .*got 2.0"):
        OP(q, k, v, None, None, 0.5, True, 4, None, 2.0, 1, 1, "dynamic")
    with pytest.raises(ValueError, match=r"pattern must be one of .* got 'diag'"):
        OP(q, k, v, None, None, 0.5, True, 4, None, None, 1, 1, "diag")
    with pytest.raises(ValueError, match=r"local_blocks must be a positive int .*got 0"):
        OP(q, k, v, None, None, 0.5, True, 4, 2, None, 0, 1, "dynamic")


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: OP(q, k, v, m, None, 0.5, True, 4, 1, None, 1, 1, "dynamic"),
        lambda q, k, v, m: block_sparse_attention_gather(q, k, v, m, block=4, topk=1),
        lambda q, k, v, m: block_sparse_attention_reference(q, k, v, m, block=4, topk=1),
    ],
    ids=["op", "gather", "reference"],
)
def test_input_validation(fn):
    q, k, v = _qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        fn(q, k, v, None)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_mask must be a bool tensor .*got torch.float32"):
        fn(q, k, v, torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match=r"kv_mask must be broadcastable to \[B, H, M\]"):
        fn(q, k, v, torch.ones(1, 3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q, k and v must share one dtype"):
        fn(q, k.double(), v, None)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, N, D\], got shape \(4, 8, 4\)"):
        fn(q[0], k, v, None)
    with pytest.raises(ValueError, match=r"k head dim must equal q head dim 4"):
        fn(q, k[..., :3], v, None)


def test_gather_rejects_bad_max_scores():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"max_scores must be a positive int or None, got 0"):
        block_sparse_attention_gather(q, k, v, topk=1, max_scores=0)


# -- the variant and export ---------------------------------------------------------------------


def _site(mask=MaskKind.CAUSAL, cross=False):
    return AttentionSite(
        name="layers.0.attn",
        module_type="Attention",
        spelling="sdpa",
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        value_dim=16,
        scale=0.25,
        mask=mask,
        cross=cross,
    )


def test_variant_supports_and_builds():
    config = BlockSparse(block=32, threshold=0.9, local_blocks=2, sink_blocks=0)
    variant = get_variant(config)
    assert not variant.accepts_bias
    for kind in (MaskKind.NONE, MaskKind.CAUSAL, MaskKind.PADDING, MaskKind.CAUSAL_PADDING):
        assert variant.supports(config, _site(kind)) is None
    assert "mask kind 'bias'" in variant.supports(config, _site(MaskKind.BIAS))
    assert "mask kind 'other'" in variant.supports(config, _site(MaskKind.OTHER))
    assert "causal cross-attention" in variant.supports(config, _site(cross=True))
    assert variant.supports(config, _site(MaskKind.PADDING, cross=True)) is None
    call = variant.build(config, _site())
    assert call.op is torch.ops.attnopt.block_sparse_attention.default
    assert call.extra_args == (0.25, True, 32, None, 0.9, 2, 0, "dynamic")


@pytest.mark.parametrize(
    "config",
    [BlockSparse(topk=8), BlockSparse(block=32, threshold=0.95), BlockSparse(pattern="radial")],
    ids=["topk", "threshold", "radial"],
)
def test_config_round_trips_through_json(config):
    import json

    assert config_from_dict(json.loads(config.to_json())) == config
    assert config.to_dict()["variant"] == "block_sparse"


def test_describe():
    assert BlockSparse(topk=8).describe() == "BlockSparse(topk=8)"
    assert BlockSparse(pattern="a-shape", local_blocks=4).describe() == (
        "BlockSparse(local_blocks=4, pattern='a-shape')"
    )


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, kv_mask):
        return OP(q, k, v, kv_mask, None, 0.25, True, 8, 3, None, 1, 1, "dynamic")


def test_export_with_dynamic_sequence_length():
    gen = torch.Generator().manual_seed(6)

    def inputs(n):
        return (
            torch.randn(2, 4, n, 16, generator=gen),
            torch.randn(2, 2, n, 16, generator=gen),
            torch.randn(2, 2, n, 8, generator=gen),
            torch.rand(2, 1, n, generator=gen) > 0.2,
        )

    seq = torch.export.Dim("seq", min=2, max=4096)
    dynamic = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "kv_mask": {2: seq}}
    exported = torch.export.export(_Attention(), inputs(37), dynamic_shapes=dynamic)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.attnopt.block_sparse_attention.default]
    module = exported.module()
    for n in (5, 300):
        q, k, v, kv_mask = inputs(n)
        expected = block_sparse_attention_reference(
            q, k, v, kv_mask, block=8, topk=3, scale=0.25, causal=True
        )
        torch.testing.assert_close(module(q, k, v, kv_mask), expected, atol=1e-5, rtol=1e-5)


# -- end to end on the tiny zoo ------------------------------------------------------------------

# Blocks of 4 positions: the 29 tokens span 8 blocks, all kept.
EVERY_BLOCK = {
    "topk": BlockSparse(block=4, topk=64),
    "threshold": BlockSparse(block=4, threshold=1.0),
}
ZOO = [
    pytest.param(model, impl, kind, id=f"{model}-{impl}-{kind}")
    for model, impl, kind in [
        ("tiny-llama", "sdpa", "threshold"),
        ("tiny-llama", "eager", "topk"),
        ("tiny-qwen2", "sdpa", "topk"),
        ("tiny-gpt2", "eager", "threshold"),
        ("tiny-bert", "sdpa", "threshold"),
        ("tiny-vit", "eager", "topk"),
        ("tiny-t5", "sdpa", "topk"),
    ]
]


def _inputs(model, seq_len: int):
    from attnopt.capture import example_inputs_for

    inputs = example_inputs_for(model, batch=2, seq_len=seq_len, seed=1)
    inputs.pop("use_cache", None)
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        mask[0, : seq_len // 4] = 0  # left padding
        mask[1, seq_len - seq_len // 5 :] = 0  # right padding
    return inputs


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name,impl,kind", ZOO)
def test_keeping_every_block_is_exact_end_to_end(name, impl, kind):
    model = tiny_model(name, attn_implementation=impl)
    inputs = _inputs(model, 29)
    optimized = attnopt.optimize(model, EVERY_BLOCK[kind])
    report = optimized.report
    assert report.applied, str(report)
    for site in report.skipped:
        # Only what the variant cannot honour is skipped: T5's position bias.
        assert "mask kind 'bias'" in site.reason, site.reason
    assert bool(report.skipped) == (name == "tiny-t5")
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.block_sparse_attention.default in ops
    with torch.no_grad():
        actual, expected = _main(optimized(**inputs)), _main(model(**inputs))
    mask = inputs.get("attention_mask")
    if mask is not None and actual.shape[:2] == mask.shape:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_sparse_config_runs_end_to_end():
    """A genuinely sparse setting rewrites every site and changes the output a little."""
    model = tiny_model("tiny-llama")
    inputs = _inputs(model, 64)
    optimized = attnopt.optimize(model, BlockSparse(block=8, topk=2))
    assert len(optimized.report.applied) == len(optimized.report.sites) == 2
    with torch.no_grad():
        out, ref = _main(optimized(**inputs)), _main(model(**inputs))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref)
