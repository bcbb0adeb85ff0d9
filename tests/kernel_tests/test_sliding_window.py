"""Sliding-window attention: reference, blockwise kernel and custom op against a naive
implementation written here from the definition, plus gradients, errors and export.

Metric: elementwise ``|out - naive| <= atol + rtol * |naive|`` where ``naive`` is the
fp64 computation on the same (already rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import get_variant
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.kernels.sliding_window import (
    SlidingWindow,
    sliding_window_attention_blockwise,
    sliding_window_attention_reference,
)
from attnopt.site import AttentionSite, MaskKind
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches

TOLERANCE = KERNEL_TOLERANCE["sliding_window"]

OP = torch.ops.attnopt.sliding_window_attention


# -- the naive truth ---------------------------------------------------------------------------


def naive_visible(n, m, *, window, sinks, dilation, causal):
    """[N, M] bool, one (i, j) pair at a time, straight from the definition."""
    rows = []
    for i in range(n):
        p = i + m - n
        row = []
        for j in range(m):
            delta = p - j
            if causal:
                in_window = 0 <= delta < window * dilation and delta % dilation == 0
                sink = j < sinks and j <= p
            else:
                in_window = abs(delta) < window * dilation and abs(delta) % dilation == 0
                sink = j < sinks
            row.append(in_window or sink)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(n, m)


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


def naive_sliding_window(q, k, v, kv_mask, *, window, sinks, dilation, causal, scale):
    n, m = q.shape[2], k.shape[2]
    visible = naive_visible(n, m, window=window, sinks=sinks, dilation=dilation, causal=causal)
    if kv_mask is not None:
        visible = visible & kv_mask.unsqueeze(-2)
    return naive_attention(q, k, v, visible, scale)


# -- random problems ---------------------------------------------------------------------------


@st.composite
def problems(draw, dtype=torch.float32, max_len=300):
    kv_heads = draw(st.integers(1, 4))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3, 4) if kv_heads * r <= 4]))
    n = draw(st.one_of(st.sampled_from([1, 2, 63, 64, 65, 127]), st.integers(1, max_len)))
    m = n + draw(st.sampled_from([0, 0, 1, 17, 64]))  # extra keys: queries are the last N
    case = dict(
        batch=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        m=m,
        head_dim=draw(st.sampled_from([1, 3, 16, 24, 64])),
        value_dim=draw(st.sampled_from([1, 5, 16, 32])),
        window=draw(st.integers(1, n + 5)),
        sinks=draw(st.integers(0, 5)),
        dilation=draw(st.integers(1, 3)),
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "batch", "head", "keys", "empty"])),
        block_size=draw(st.sampled_from([None, 3, 16, 64])),
        max_scores=draw(st.sampled_from([None, 8000, 40000])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )
    return case


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
        shape = {"batch": (b, 1, m), "head": (b, h, m), "keys": (m,), "empty": (b, 1, m)}[kind]
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask.view(-1, m)[:, -1] = False  # always some padding
        if kind == "empty":
            kv_mask[0] = False  # every query of batch 0 sees no key (sinks are masked too)
    return q, k, v, kv_mask


def run_all(case, q, k, v, kv_mask):
    """(name, output) of every implementation under test."""
    window, sinks, dilation, causal = (case[x] for x in ("window", "sinks", "dilation", "causal"))
    kw = dict(window=window, sinks=sinks, dilation=dilation, causal=causal)
    scale = 1.0 / math.sqrt(case["head_dim"])
    yield "reference", sliding_window_attention_reference(q, k, v, kv_mask, scale=scale, **kw)
    blockwise = sliding_window_attention_blockwise(
        q,
        k,
        v,
        kv_mask,
        scale=scale,
        block_size=case["block_size"],
        max_scores=case["max_scores"],
        **kw,
    )
    yield "blockwise", blockwise
    yield "op", OP(q, k, v, kv_mask, None, scale, causal, window, sinks, dilation)


def check_case(case):
    q, k, v, kv_mask = make_inputs(case)
    expected = naive_sliding_window(
        q,
        k,
        v,
        kv_mask,
        window=case["window"],
        sinks=case["sinks"],
        dilation=case["dilation"],
        causal=case["causal"],
        scale=1.0 / math.sqrt(case["head_dim"]),
    )
    for name, out in run_all(case, q, k, v, kv_mask):
        assert out.shape == expected.shape, name
        assert_matches(out, expected, case["dtype"], TOLERANCE)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no visible key must be exactly 0"


# -- forward -----------------------------------------------------------------------------------


@settings(max_examples=70, deadline=None)
@given(problems())
def test_fp32_matches_naive(case):
    check_case(case)


def _case(**overrides):
    case = dict(
        batch=2,
        heads=4,
        kv_heads=2,
        n=300,
        m=300,
        head_dim=64,
        value_dim=32,
        window=37,
        sinks=4,
        dilation=1,
        causal=True,
        mask="batch",
        block_size=None,
        max_scores=None,
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    "long-causal-gqa": _case(),
    "long-bidirectional-dilated": _case(causal=False, dilation=3, window=20, layout="bnhd"),
    "queries-at-end": _case(n=63, m=127, window=64, mask="head"),
    "decode-one-query": _case(n=1, m=200, window=50, sinks=2, mask=None),
    "mqa-odd-block": _case(heads=4, kv_heads=1, n=257, m=257, block_size=64, mask="keys"),
    "more-queries-than-keys": _case(n=40, m=25, window=6, causal=False, mask="empty"),
    "one-row-blocks-tiny-groups": _case(
        n=50, m=61, window=9, dilation=2, block_size=1, max_scores=40
    ),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype, max_len=130)))


@pytest.mark.parametrize(
    ("n", "m", "causal"),
    [(1, 1, True), (63, 63, True), (63, 63, False), (40, 101, True), (100, 100, False)],
    ids=lambda x: str(x),
)
def test_window_covering_all_keys_is_dense(n, m, causal):
    gen = torch.Generator().manual_seed(n * 1000 + m)
    q = torch.randn(2, 4, n, 24, generator=gen)
    k = torch.randn(2, 2, m, 24, generator=gen)
    v = torch.randn(2, 2, m, 12, generator=gen)
    kv_mask = torch.rand(2, 1, m, generator=gen) > 0.2
    dense = dense_attention_reference(q, k, v, kv_mask, scale=0.3, causal=causal)
    for window in (m, m + 7):
        kw = dict(window=window, scale=0.3, causal=causal)
        outs = {
            "reference": sliding_window_attention_reference(q, k, v, kv_mask, **kw),
            "blockwise": sliding_window_attention_blockwise(q, k, v, kv_mask, **kw),
            "op": OP(q, k, v, kv_mask, None, 0.3, causal, window, 0, 1),
        }
        for name, out in outs.items():
            torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6, msg=name)


def test_long_sequence_many_groups():
    """Many blocks per group and many groups, GQA, sinks: the path the benchmark takes."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1500, 32, generator=gen)
    k = torch.randn(1, 2, 1500, 32, generator=gen)
    v = torch.randn(1, 2, 1500, 32, generator=gen)
    kw = dict(window=100, sinks=3, causal=True)
    expected = sliding_window_attention_reference(q, k, v, **kw)
    out = sliding_window_attention_blockwise(q, k, v, max_scores=1 << 15, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


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
    window, sinks, dilation, causal = (case[x] for x in ("window", "sinks", "dilation", "causal"))
    out = OP(q, k, v, kv_mask, None, 0.125, causal, window, sinks, dilation)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("causal", "window", "sinks", "dilation"),
    [(True, 2, 0, 1), (True, 3, 2, 2), (False, 2, 1, 1), (False, 2, 0, 3)],
    ids=lambda x: str(x),
)
def test_gradcheck_op(causal, window, sinks, dilation):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 8, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 8, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    kv_mask = torch.tensor([True, False, True, True, True, True, False, True])

    def fn(q, k, v):
        return OP(q, k, v, kv_mask, None, 0.6, causal, window, sinks, dilation)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    """Schema, fake tensor, autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 11, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 11, generator=gen) > 0.2
    torch.library.opcheck(OP, (q, k, v, kv_mask, None, 0.35, True, 3, 1, 2))
    torch.library.opcheck(OP, (q, k, v, None, None, 0.35, False, 4, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_grads(dtype):
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 90, 16, generator=gen).to(dtype)
    k = torch.randn(1, 2, 90, 16, generator=gen).to(dtype)
    v = torch.randn(1, 2, 90, 8, generator=gen).to(dtype)
    grad = torch.randn(1, 4, 90, 8, generator=gen).to(dtype)
    kv_mask = torch.rand(1, 1, 90, generator=gen) > 0.2

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.autograd.backward(fn(*inputs), grad.to(dtype))
        return [t.grad for t in inputs]

    want = grads(
        lambda q, k, v: sliding_window_attention_reference(
            q, k, v, kv_mask, window=9, sinks=2, causal=True
        ),
        torch.float64,
    )
    got = grads(lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, True, 9, 2, 1), dtype)
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
    kw = dict(window=20, sinks=2, dilation=2, scale=0.25, causal=causal)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    expected = grads(lambda q, k, v: sliding_window_attention_reference(q, k, v, kv_mask, **kw))
    actual = {
        "blockwise": grads(
            lambda q, k, v: sliding_window_attention_blockwise(
                q, k, v, kv_mask, block_size=16, **kw
            )
        ),
        "op": grads(lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, causal, 20, 2, 2)),
    }
    for name, got in actual.items():
        for label, a, b in zip("qkv", got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} d{label}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(window=0), r"window must be a positive int .*got 0"),
        (dict(window=True), r"window must be a positive int .*got True"),
        (dict(window=2.5), r"window must be a positive int .*got 2.5"),
        (dict(window=4, sinks=-1), r"sinks must be a non-negative int .*got -1"),
        (dict(window=4, sinks=False), r"sinks must be a non-negative int .*got False"),
        (dict(window=4, dilation=0), r"dilation must be a positive int .*got 0"),
    ],
    ids=["window-0", "window-bool", "window-float", "sinks-negative", "sinks-bool", "dilation-0"],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match="SlidingWindow: " + match):
        SlidingWindow(**kwargs)


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
        OP(q, k, v, None, torch.zeros(1, 4, 8, 8), 0.5, True, 4, 0, 1)


def test_op_rejects_bad_window_args():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"sliding_window_attention: window .* got 0"):
        OP(q, k, v, None, None, 0.5, True, 0, 0, 1)
    with pytest.raises(ValueError, match=r"dilation .* got -2"):
        OP(q, k, v, None, None, 0.5, True, 4, 0, -2)
    with pytest.raises(ValueError, match=r"sinks .* got -1"):
        OP(q, k, v, None, None, 0.5, True, 4, -1, 1)


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: OP(q, k, v, m, None, 0.5, True, 4, 0, 1),
        lambda q, k, v, m: sliding_window_attention_blockwise(q, k, v, m, window=4),
        lambda q, k, v, m: sliding_window_attention_reference(q, k, v, m, window=4),
    ],
    ids=["op", "blockwise", "reference"],
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
    config = SlidingWindow(64, sinks=4, dilation=2)
    variant = get_variant(config)
    assert not variant.accepts_bias
    for kind in (MaskKind.NONE, MaskKind.CAUSAL, MaskKind.PADDING, MaskKind.CAUSAL_PADDING):
        assert variant.supports(config, _site(kind)) is None
    assert "mask kind 'bias'" in variant.supports(config, _site(MaskKind.BIAS))
    assert "mask kind 'other'" in variant.supports(config, _site(MaskKind.OTHER))
    assert "cross-attention" in variant.supports(config, _site(cross=True))
    call = variant.build(config, _site())
    assert call.op is torch.ops.attnopt.sliding_window_attention.default
    assert call.extra_args == (0.25, True, 64, 4, 2)


def test_config_round_trips_through_json():
    from attnopt.config import config_from_dict

    config = SlidingWindow(128, sinks=4)
    assert config_from_dict(config.to_dict()) == config
    assert config.describe() == "SlidingWindow(window=128, sinks=4)"


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, kv_mask):
        return OP(q, k, v, kv_mask, None, 0.25, True, 8, 2, 1)


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
    assert targets == [torch.ops.attnopt.sliding_window_attention.default]
    module = exported.module()
    for n in (5, 300):
        q, k, v, kv_mask = inputs(n)
        expected = sliding_window_attention_reference(
            q, k, v, kv_mask, window=8, sinks=2, scale=0.25, causal=True
        )
        torch.testing.assert_close(module(q, k, v, kv_mask), expected, atol=1e-5, rtol=1e-5)
