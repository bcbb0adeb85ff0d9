"""Dense attention: reference and custom op against a naive implementation written here,
plus gradients (q, k, v and a broadcast bias), errors and the variant's wiring.

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
from attnopt.kernels.dense import Dense, dense_attention_reference
from attnopt.site import AttentionSite, MaskKind

# dtype -> (atol, rtol) of every implementation against the fp64 naive result.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

OP = torch.ops.attnopt.dense_attention


def naive_dense(q, k, v, kv_mask, bias, scale, causal):
    """fp64 attention with the mask built one (i, j) pair at a time; empty rows are 0."""
    b, h, n, _ = q.shape
    m = k.shape[2]
    rows = [[(not causal) or j <= i + m - n for j in range(m)] for i in range(n)]
    visible = torch.tensor(rows, dtype=torch.bool).reshape(n, m).expand(b, h, n, m)
    if kv_mask is not None:
        visible = visible & kv_mask.unsqueeze(-2)
    rep = h // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~visible, float("-inf"))
    any_key = torch.isfinite(scores).any(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


@st.composite
def problems(draw, dtype=torch.float32, max_len=300):
    kv_heads = draw(st.integers(1, 4))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3, 4) if kv_heads * r <= 4]))
    n = draw(st.one_of(st.sampled_from([1, 2, 63, 127]), st.integers(1, max_len)))
    return dict(
        batch=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        m=n + draw(st.sampled_from([0, 0, 1, 40])),
        head_dim=draw(st.sampled_from([1, 3, 24, 64])),
        value_dim=draw(st.sampled_from([1, 5, 32])),
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "batch", "head", "empty"])),
        bias=draw(st.sampled_from([None, "full", "heads", "keys", "neg-inf"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, n, m = (case[x] for x in ("batch", "heads", "kv_heads", "n", "m"))
    dtype = case["dtype"]
    q = torch.randn(b, h, n, case["head_dim"], generator=gen).to(dtype)
    k = torch.randn(b, hkv, m, case["head_dim"], generator=gen).to(dtype)
    v = torch.randn(b, hkv, m, case["value_dim"], generator=gen).to(dtype)
    kv_mask = None
    if case["mask"] is not None:
        shape = (b, h, m) if case["mask"] == "head" else (b, 1, m)
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask[..., -1] = False
        if case["mask"] == "empty":
            kv_mask[0] = False
    bias = None
    if case["bias"] is not None:
        shape = {"full": (b, h, n, m), "heads": (h, 1, 1), "keys": (m,), "neg-inf": (1, h, n, m)}
        bias = torch.randn(shape[case["bias"]], generator=gen)
        if case["bias"] == "neg-inf":
            bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) > 0.5, float("-inf"))
            bias[..., 0, :] = float("-inf")  # first query sees nothing
    return q, k, v, kv_mask, bias


def check_case(case):
    q, k, v, kv_mask, bias = make_inputs(case)
    scale = 1.0 / math.sqrt(case["head_dim"])
    expected = naive_dense(q, k, v, kv_mask, bias, scale, case["causal"])
    outs = {
        "reference": dense_attention_reference(q, k, v, kv_mask, bias, causal=case["causal"]),
        "op": OP(q, k, v, kv_mask, bias, scale, case["causal"]),
    }
    atol, rtol = TOLERANCE[case["dtype"]]
    for name, out in outs.items():
        assert out.dtype == case["dtype"], name
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol, msg=name)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no visible key must be exactly 0"
        if case["bias"] == "neg-inf":
            assert (out[:, :, 0] == 0).all(), f"{name}: a row masked by the bias must be 0"


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fp32_matches_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype, max_len=130)))


def test_matches_sdpa_where_sdpa_is_defined():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 63, 24, generator=gen)
    k = torch.randn(2, 4, 63, 24, generator=gen)
    v = torch.randn(2, 4, 63, 16, generator=gen)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = OP(q, k, v, None, None, 1.0 / math.sqrt(24), True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bias_shape", [(1, 4, 5, 7), (4, 1, 1), (5, 7), (7,)], ids=lambda s: "bias" + str(list(s))
)
def test_gradcheck_op(bias_shape):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    kv_mask = torch.rand(2, 1, 7, generator=gen) > 0.3

    def fn(q, k, v, bias):
        return OP(q, k, v, kv_mask, bias, 0.7, True)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_opcheck():
    """Schema, fake tensor, autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 5, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 7, 4, generator=gen, requires_grad=True)
    bias = torch.randn(4, 1, 7, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 7, generator=gen) > 0.2
    torch.library.opcheck(OP, (q, k, v, kv_mask, bias, 0.35, True))
    torch.library.opcheck(OP, (q, k, v, None, None, 0.35, False))


def test_grads_without_bias_grad():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    bias = torch.randn(6, 6, generator=gen, dtype=torch.float64)  # constant bias

    def fn(q, k, v):
        return OP(q, k, v, None, bias, 0.35, False)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fp32_grads_match_naive():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 40, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 50, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 50, 8, generator=gen, requires_grad=True)
    bias = torch.randn(4, 40, 50, generator=gen, requires_grad=True)
    kv_mask = torch.rand(2, 1, 50, generator=gen) > 0.2
    grad = torch.randn(2, 4, 40, 8, generator=gen)
    inputs = (q, k, v, bias)
    got = torch.autograd.grad(OP(q, k, v, kv_mask, bias, 0.25, True), inputs, grad)
    want = torch.autograd.grad(naive_dense(q, k, v, kv_mask, bias, 0.25, True), inputs, grad)
    for label, a, b in zip(["q", "k", "v", "bias"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"d{label}")


def test_input_validation():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 8, 4, generator=gen)
    k = torch.randn(1, 2, 8, 4, generator=gen)
    v = torch.randn(1, 2, 8, 4, generator=gen)
    for fn in (
        lambda *a: OP(*a, 0.5, False),
        lambda *a: dense_attention_reference(*a),
    ):
        with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads"):
            fn(q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), None, None)
        with pytest.raises(ValueError, match=r"kv_mask must be a bool tensor .*torch.int64"):
            fn(q, k, v, torch.ones(1, 1, 8, dtype=torch.long), None)
        with pytest.raises(ValueError, match=r"bias must be broadcastable to \[B, H, N, M\]"):
            fn(q, k, v, None, torch.zeros(3, 8))
        with pytest.raises(ValueError, match=r"bias must be a floating-point tensor .*torch.bool"):
            fn(q, k, v, None, torch.ones(8, 8, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"v must be \[B, Hkv, M, Dv\]"):
            fn(q, k, v[:, :, :5], None, None)


def test_variant_wiring():
    config = Dense()
    site = AttentionSite(
        name="blocks.3.attn",
        module_type="Attention",
        spelling="softmax",
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        value_dim=16,
        scale=0.125,
        mask=MaskKind.BIAS,
        cross=True,
    )
    variant = get_variant(config)
    assert variant.accepts_bias
    assert variant.supports(config, site) is None
    call = variant.build(config, site)
    assert call.op is torch.ops.attnopt.dense_attention.default
    assert call.extra_args == (0.125, False)
    assert config.to_dict() == {"variant": "dense", "version": 1}
