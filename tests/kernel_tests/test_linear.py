"""Linear attention: reference, chunked kernel and custom op against a naive
implementation written here from the definition (every feature map, causal and
bidirectional, decay, padding), plus gradients, errors, the variant's wiring, export
and end-to-end runs against transformers' attention registry.

Linear attention approximates softmax attention, so no configuration equals dense
attention; the exactness under test is of the kernels against the definition.
Metric: elementwise ``|out - naive| <= atol + rtol * |naive|`` where ``naive`` is the
fp64 computation on the same (already rounded) inputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnopt
from attnopt.config import config_from_dict
from attnopt.kernels import ParamRef, get_variant
from attnopt.kernels.linear import (
    FeatureMapParameters,
    Linear,
    linear_attention_chunked,
    linear_attention_reference,
)
from attnopt.kernels.linear.feature_maps import orthogonal_gaussian
from attnopt.site import AttentionSite, MaskKind
from attnopt.zoo import tiny_model
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches
from tests.test_models import _inputs, _main

TOLERANCE = KERNEL_TOLERANCE["linear"]
END_TO_END = 1e-4  # logits of the optimized model vs the registry reference

OP = torch.ops.attnopt.linear_attention
MAPS = ["elu", "relu", "softmax_rf", "hedgehog"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The problems here are tiny: a second intra-op thread only adds wake-up latency,
    which on a busy machine costs more than the work (tenfold in this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the naive truth ---------------------------------------------------------------------------


def naive_phi(x, kind, weight, bias, scale, query):
    """φ from its definition, fp64: x [B, H, L, D] with per-head hedgehog weights."""
    x = x.double()
    if kind == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    if kind == "relu":
        return x.clamp(min=0)
    if kind == "softmax_rf":
        w = weight.double()
        xs = x * math.sqrt(scale)
        expo = torch.einsum("bhld,dm->bhlm", xs, w) - (xs * xs).sum(-1, keepdim=True) / 2
        if query:
            expo = expo - expo.max(dim=-1, keepdim=True).values
        return torch.exp(expo) / math.sqrt(w.shape[1])
    z = torch.einsum("bhld,hdf->bhlf", x, weight.double()) + bias.double()[None, :, None, :]

    def softmax(t):
        e = torch.exp(t - t.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    return torch.cat([softmax(z), softmax(-z)], dim=-1)


def naive_linear(q, k, v, kv_mask, *, causal, feature_map, decay, eps, scale, tensors):
    """fp64 ``Σ_j a_ij v_j / (Σ_j a_ij + eps)`` with ``a_ij`` built pair by pair's rules."""
    qw, qb, kw, kb = tensors
    b, h, n, _ = q.shape
    m = k.shape[2]
    rep = h // k.shape[1]
    qf = naive_phi(q, feature_map, qw, qb, scale, query=True)
    kf = naive_phi(k, feature_map, kw, kb, scale, query=False).repeat_interleave(rep, 1)
    v = v.double().repeat_interleave(rep, 1)
    lam = torch.ones(h, dtype=torch.float64)
    if decay is not None:
        lam = lam * torch.tensor(decay, dtype=torch.float64)
    p = torch.arange(n)[:, None] + (m - n)  # query i sits at key position p
    j = torch.arange(m)[None, :]
    if causal:  # λ^(p−j) for j <= p, else 0
        weight = (j <= p) * lam[:, None, None] ** (p - j).clamp(min=0)
    else:
        weight = torch.ones(h, n, m, dtype=torch.float64)
    a = torch.einsum("bhnf,bhmf->bhnm", qf, kf) * weight
    if kv_mask is not None:
        a = a * kv_mask.unsqueeze(-2)
    return torch.einsum("bhnm,bhmd->bhnd", a, v) / (a.sum(-1, keepdim=True) + eps)


# -- random problems ---------------------------------------------------------------------------


def feature_tensors(kind, heads, kv_heads, head_dim, num_features, gen):
    """The map's tensors (random, not the identity init, so they matter)."""
    if kind == "softmax_rf":
        proj = orthogonal_gaussian(head_dim, num_features or 2 * head_dim, seed=7)
        return proj, None, proj, None
    if kind == "hedgehog":
        f = num_features or head_dim
        return (
            torch.randn(heads, head_dim, f, generator=gen) * 0.5,
            torch.randn(heads, f, generator=gen),
            torch.randn(kv_heads, head_dim, f, generator=gen) * 0.5,
            torch.randn(kv_heads, f, generator=gen),
        )
    return None, None, None, None


@st.composite
def problems(draw, dtype=torch.float32, max_len=300):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3) if kv_heads * r <= 4]))
    n = draw(st.one_of(st.sampled_from([1, 2, 63, 64, 65, 127]), st.integers(1, max_len)))
    m = max(1, n + draw(st.sampled_from([0, 0, 1, 17, 64, -5])))
    feature_map = draw(st.sampled_from(MAPS))
    causal = draw(st.booleans())
    decay = None
    if causal:
        decay = draw(
            st.one_of(
                st.none(),
                st.tuples(st.floats(0.5, 1.0)),
                st.lists(st.floats(0.3, 1.0), min_size=heads, max_size=heads).map(tuple),
            )
        )
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        m=m,
        head_dim=draw(st.sampled_from([1, 3, 16, 24])),
        value_dim=draw(st.sampled_from([1, 5, 16])),
        feature_map=feature_map,
        num_features=None
        if feature_map in ("elu", "relu")
        else draw(st.sampled_from([None, 5, 12])),
        causal=causal,
        decay=decay,
        chunk=draw(st.sampled_from([1, 7, 16, 64])),
        max_elements=draw(st.sampled_from([None, 3000])),
        mask=draw(st.sampled_from([None, "batch", "head", "keys", "empty"])),
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
        shape = {"batch": (b, 1, m), "head": (b, h, m), "keys": (m,), "empty": (b, 1, m)}[kind]
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask.view(-1, m)[:, -1] = False  # always some padding
        if kind == "empty":
            kv_mask[0] = False  # every query of batch 0 sees no key
    tensors = feature_tensors(
        case["feature_map"], h, hkv, case["head_dim"], case["num_features"], gen
    )
    return q, k, v, kv_mask, tensors


def run_all(case, q, k, v, kv_mask, tensors):
    """(name, output) of every implementation under test."""
    scale = 1.0 / math.sqrt(case["head_dim"])
    kw = dict(causal=case["causal"], feature_map=case["feature_map"], decay=case["decay"])
    named = dict(zip(("q_weight", "q_bias", "k_weight", "k_bias"), tensors, strict=True))
    yield "reference", linear_attention_reference(q, k, v, kv_mask, scale=scale, **kw, **named)
    yield (
        "chunked",
        linear_attention_chunked(
            q,
            k,
            v,
            kv_mask,
            scale=scale,
            chunk=case["chunk"],
            max_elements=case["max_elements"],
            **kw,
            **named,
        ),
    )
    yield (
        "chunked-pytorch",
        linear_attention_chunked(
            q,
            k,
            v,
            kv_mask,
            scale=scale,
            chunk=case["chunk"],
            max_elements=case["max_elements"],
            fused=False,
            **kw,
            **named,
        ),
    )
    decay = case["decay"]
    yield (
        "op",
        OP(
            q,
            k,
            v,
            kv_mask,
            None,
            scale,
            case["causal"],
            case["feature_map"],
            case["chunk"],
            None if decay is None else list(decay),
            1e-6,
            *tensors,
        ),
    )


def check_case(case):
    q, k, v, kv_mask, tensors = make_inputs(case)
    expected = naive_linear(
        q,
        k,
        v,
        kv_mask,
        causal=case["causal"],
        feature_map=case["feature_map"],
        decay=case["decay"],
        eps=1e-6,
        scale=1.0 / math.sqrt(case["head_dim"]),
        tensors=tensors,
    )
    for name, out in run_all(case, q, k, v, kv_mask, tensors):
        assert out.shape == expected.shape, name
        assert_matches(out, expected, case["dtype"], TOLERANCE)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no visible key must be exactly 0"


# -- forward -----------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
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
        head_dim=16,
        value_dim=8,
        feature_map="elu",
        num_features=None,
        causal=True,
        decay=None,
        chunk=64,
        max_elements=None,
        mask="batch",
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    **{f"causal-{fm}": _case(feature_map=fm) for fm in MAPS},
    **{f"bidirectional-{fm}": _case(feature_map=fm, causal=False, mask="head") for fm in MAPS},
    "decay-per-head": _case(decay=(0.9, 0.5, 1.0, 0.99), chunk=16, mask="head"),
    "decay-shared-hedgehog": _case(decay=(0.95,), feature_map="hedgehog", num_features=5),
    "queries-at-end": _case(n=63, m=127, chunk=16, decay=(0.8,)),
    "decode-one-query": _case(n=1, m=200, feature_map="softmax_rf", mask=None),
    "more-queries-than-keys": _case(n=40, m=25, chunk=7, mask="empty"),
    "mqa-many-groups": _case(heads=4, kv_heads=1, n=1000, m=1000, max_elements=1000),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype, max_len=130)))


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("decay", [None, (0.9,)], ids=["no-decay", "decay"])
def test_causal_chunk_size_does_not_change_the_result(feature_map, decay):
    """Chunks that divide N, that do not, of one position, and longer than N."""
    case = _case(n=257, m=257, feature_map=feature_map, decay=decay, mask="head")
    q, k, v, kv_mask, tensors = make_inputs(case)
    named = dict(zip(("q_weight", "q_bias", "k_weight", "k_bias"), tensors, strict=True))
    kw = dict(scale=0.25, causal=True, feature_map=feature_map, decay=decay, **named)
    expected = naive_linear(
        q,
        k,
        v,
        kv_mask,
        causal=True,
        feature_map=feature_map,
        decay=decay,
        eps=1e-6,
        scale=0.25,
        tensors=tensors,
    )
    for chunk in (1, 16, 30, 64, 257, 1000):
        out = linear_attention_chunked(q, k, v, kv_mask, chunk=chunk, **kw)
        assert_matches(out, expected, torch.float32, TOLERANCE)


def test_padding_keys_contribute_nothing():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 50, 8, generator=gen)
    k = torch.randn(2, 2, 50, 8, generator=gen)
    v = torch.randn(2, 2, 50, 8, generator=gen)
    kv_mask = torch.rand(2, 1, 50, generator=gen) > 0.4
    k2, v2 = k.clone(), v.clone()
    hidden = ~kv_mask[:, 0]  # [B, M]
    k2[hidden.unsqueeze(1).expand_as(k2[..., 0])] = 1e3
    v2[hidden.unsqueeze(1).expand_as(v2[..., 0])] = -1e3
    for causal in (True, False):
        kw = dict(scale=0.3, causal=causal, chunk=16)
        a = linear_attention_chunked(q, k, v, kv_mask, **kw)
        b = linear_attention_chunked(q, k2, v2, kv_mask, **kw)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_long_sequence_many_groups_matches_reference():
    """Many groups, decay, GQA: the path the benchmark takes, against the reference."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3000, 32, generator=gen)
    k = torch.randn(1, 2, 3000, 32, generator=gen)
    v = torch.randn(1, 2, 3000, 32, generator=gen)
    for kw in (dict(causal=True, decay=(0.999, 0.99, 0.9, 1.0)), dict(causal=False)):
        expected = linear_attention_reference(q, k, v, **kw)
        out = linear_attention_chunked(q, k, v, max_elements=1 << 14, **kw)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` filled with NaN, so an output element the kernel forgets to
    write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


WRITE_CASES = ["causal-hedgehog", "bidirectional-softmax_rf", "queries-at-end", "decode-one-query"]


@pytest.mark.parametrize("case", [FIXED_CASES[c] for c in WRITE_CASES], ids=WRITE_CASES)
def test_every_output_element_is_written(case, nan_filled_empty):
    q, k, v, kv_mask, tensors = make_inputs(case)
    for t in (q, k, v):
        t.requires_grad_(True)
    decay = None if case["decay"] is None else list(case["decay"])
    out = OP(
        q,
        k,
        v,
        kv_mask,
        None,
        0.25,
        case["causal"],
        case["feature_map"],
        case["chunk"],
        decay,
        1e-6,
        *tensors,
    )
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature_map", "causal", "decay"),
    [
        ("elu", True, None),
        ("elu", False, None),
        ("relu", True, [0.8]),
        ("softmax_rf", True, None),
        ("softmax_rf", False, None),
        ("hedgehog", True, [0.9, 0.7, 1.0, 0.5]),
        ("hedgehog", False, None),
    ],
    ids=lambda x: str(x),
)
def test_gradcheck_op(feature_map, causal, decay):
    gen = torch.Generator().manual_seed(3)
    f64 = dict(generator=gen, dtype=torch.float64)
    q = torch.randn(1, 4, 7, 3, **f64, requires_grad=True)
    k = torch.randn(1, 2, 9, 3, **f64, requires_grad=True)
    v = torch.randn(1, 2, 9, 2, **f64, requires_grad=True)
    kv_mask = torch.tensor([True, False, True, True, True, True, False, True, True])
    tensors = [
        None if t is None else t.double() for t in feature_tensors(feature_map, 4, 2, 3, 4, gen)
    ]
    if feature_map == "hedgehog":
        for t in tensors:
            t.requires_grad_(True)
    inputs = (q, k, v, *(t for t in tensors if t is not None and t.requires_grad))

    def fn(q, k, v, *learned):
        ts = list(tensors)
        if learned:
            ts = list(learned)
        return OP(q, k, v, kv_mask, None, 0.6, causal, feature_map, 3, decay, 1e-6, *ts)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_opcheck():
    """Schema, fake tensor and autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 11, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 11, generator=gen) > 0.2
    hedgehog = [t.requires_grad_(True) for t in feature_tensors("hedgehog", 4, 2, 8, 6, gen)]
    rf = feature_tensors("softmax_rf", 4, 2, 8, None, gen)
    args = (q, k, v, kv_mask, None, 0.35)
    torch.library.opcheck(OP, (*args, True, "elu", 4, [0.9], 1e-6, None, None, None, None))
    torch.library.opcheck(OP, (*args, False, "softmax_rf", 4, None, 1e-6, *rf))
    torch.library.opcheck(OP, (*args, True, "hedgehog", 3, None, 1e-6, *hedgehog))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_grads_match_reference(causal):
    """q, k, v and hedgehog weight gradients of the chunked kernel and of the op."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 150, 16, generator=gen)
    k = torch.randn(2, 2, 170, 16, generator=gen)
    v = torch.randn(2, 2, 170, 8, generator=gen)
    grad = torch.randn(2, 4, 150, 8, generator=gen)
    kv_mask = torch.rand(2, 1, 170, generator=gen) > 0.2
    tensors = feature_tensors("hedgehog", 4, 2, 16, None, gen)
    decay = (0.99, 0.9, 0.95, 1.0) if causal else None

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, *tensors)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    kw = dict(scale=0.25, causal=causal, feature_map="hedgehog", decay=decay)
    names = ("q_weight", "q_bias", "k_weight", "k_bias")
    expected = grads(
        lambda q, k, v, *ts: linear_attention_reference(
            q, k, v, kv_mask, **kw, **dict(zip(names, ts, strict=True))
        )
    )
    op_decay = None if decay is None else list(decay)
    actual = {
        "chunked": grads(
            lambda q, k, v, *ts: linear_attention_chunked(
                q, k, v, kv_mask, chunk=16, **kw, **dict(zip(names, ts, strict=True))
            )
        ),
        "op": grads(
            lambda q, k, v, *ts: OP(
                q, k, v, kv_mask, None, 0.25, causal, "hedgehog", 16, op_decay, 1e-6, *ts
            )
        ),
    }
    for name, got in actual.items():
        for label, a, b in zip(("q", "k", "v", *names), got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name} d{label}")


def test_buffer_projection_gets_no_gradient():
    """softmax_rf's projection is a fixed buffer: the backward must not ask for it."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=gen, requires_grad=True) for _ in range(3))
    rf = feature_tensors("softmax_rf", 2, 2, 8, None, gen)
    out = OP(q, k, v, None, None, 0.35, True, "softmax_rf", 8, None, 1e-6, *rf)
    out.sum().backward()
    assert rf[0].grad is None
    assert all(t.grad is not None for t in (q, k, v))


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(feature_map="cosine"), r"feature_map must be one of .*got 'cosine'"),
        (dict(chunk=0), r"chunk must be a positive int, got 0"),
        (dict(chunk=True), r"chunk must be a positive int, got True"),
        (dict(decay=0.0), r"decay must be None, a number in \(0, 1\] .*got 0.0"),
        (dict(decay=1.5), r"decay must be None, a number in \(0, 1\] .*got 1.5"),
        (dict(decay=()), r"decay must be None, a number in \(0, 1\] .*got \(\)"),
        (dict(decay=(0.9, "x")), r"decay must be None, .*got \(0.9, 'x'\)"),
        (dict(num_features=8), r"num_features must be None for feature_map 'elu'"),
        (dict(feature_map="softmax_rf", num_features=0), r"num_features must be a positive"),
        (dict(eps=0.0), r"eps must be a positive finite number, got 0.0"),
        (dict(eps=float("nan")), r"eps must be a positive finite number, got nan"),
    ],
    ids=[
        "map",
        "chunk-0",
        "chunk-bool",
        "decay-0",
        "decay-above-1",
        "decay-empty",
        "decay-str",
        "features-elu",
        "features-0",
        "eps-0",
        "eps-nan",
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match="Linear: " + match):
        Linear(**kwargs)


def _qkv(heads=4, kv_heads=2, n=8):
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randn(1, heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
    )


def _op(
    q,
    k,
    v,
    *,
    kv_mask=None,
    bias=None,
    causal=True,
    feature_map="elu",
    chunk=4,
    decay=None,
    eps=1e-6,
    tensors=(None, None, None, None),
):
    return OP(q, k, v, kv_mask, bias, 0.5, causal, feature_map, chunk, decay, eps, *tensors)


def test_op_rejects_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"linear_attention: bias must be None .*\(1, 4, 8, 8\)"):
        _op(q, k, v, bias=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"feature_map must be one of .*got 'exp'"):
        _op(q, k, v, feature_map="exp")
    with pytest.raises(ValueError, match=r"chunk must be a positive int .*got 0"):
        _op(q, k, v, chunk=0)
    with pytest.raises(ValueError, match=r"decay must be None, a number in \(0, 1\].*\[1.2\]"):
        _op(q, k, v, decay=[1.2])
    with pytest.raises(ValueError, match=r"decay must have 1 value or one per query head \(4\)"):
        _op(q, k, v, decay=[0.9, 0.9])
    with pytest.raises(ValueError, match=r"decay is defined for causal attention only"):
        _op(q, k, v, decay=[0.9], causal=False)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number .*got -1.0"):
        _op(q, k, v, eps=-1.0)


def test_op_rejects_bad_feature_tensors():
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(0)
    hh = feature_tensors("hedgehog", 4, 2, 4, 3, gen)
    with pytest.raises(ValueError, match=r"feature_map 'hedgehog' needs q_weight"):
        _op(q, k, v, feature_map="hedgehog")
    with pytest.raises(ValueError, match=r"q_weight must be None for feature_map 'elu'"):
        _op(q, k, v, tensors=hh)
    with pytest.raises(ValueError, match=r"hedgehog k_weight must be \[Hkv, D, F\] .*\(4, 4, 3\)"):
        _op(q, k, v, feature_map="hedgehog", tensors=(hh[0], hh[1], hh[0], hh[3]))
    with pytest.raises(ValueError, match=r"hedgehog q_bias must be \[H, F\] .*got shape \(2, 3\)"):
        _op(q, k, v, feature_map="hedgehog", tensors=(hh[0], hh[3], hh[2], hh[3]))
    rf = orthogonal_gaussian(5, 8, 0)
    with pytest.raises(ValueError, match=r"projection \[D, m\] with D = 4, got shape \(5, 8\)"):
        _op(q, k, v, feature_map="softmax_rf", tensors=(rf, None, rf, None))


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: _op(q, k, v, kv_mask=m),
        lambda q, k, v, m: linear_attention_chunked(q, k, v, m),
        lambda q, k, v, m: linear_attention_reference(q, k, v, m),
    ],
    ids=["op", "chunked", "reference"],
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


# -- the variant -------------------------------------------------------------------------------


def _site(mask=MaskKind.CAUSAL, cross=False, heads=4, kv_heads=2):
    return AttentionSite(
        name="layers.0.attn",
        module_type="Attention",
        spelling="sdpa",
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=16,
        value_dim=16,
        scale=0.25,
        mask=mask,
        cross=cross,
    )


def test_variant_supports():
    variant = get_variant(Linear())
    assert not variant.accepts_bias
    for kind in (MaskKind.NONE, MaskKind.CAUSAL, MaskKind.PADDING, MaskKind.CAUSAL_PADDING):
        assert variant.supports(Linear(), _site(kind)) is None
    assert variant.supports(Linear(), _site(MaskKind.PADDING, cross=True)) is None
    for kind in (MaskKind.BIAS, MaskKind.OTHER):
        reason = variant.supports(Linear(), _site(kind))
        assert "cannot honour an additive position bias" in reason
        assert f"mask kind '{kind}'" in reason
    decayed = Linear(decay=0.9)
    assert variant.supports(decayed, _site(MaskKind.CAUSAL_PADDING)) is None
    assert "causal attention only" in variant.supports(decayed, _site(MaskKind.PADDING))
    per_head = Linear(decay=(0.9, 0.8))
    assert "2 values (one per head) but the site has 4 heads" in variant.supports(per_head, _site())
    assert variant.supports(Linear(decay=(0.9,) * 4), _site()) is None
    hedgehog = Linear("hedgehog")
    assert "heads were not recovered" in variant.supports(hedgehog, _site(heads=None))


def test_variant_builds_with_parameter_refs():
    variant = get_variant(Linear())
    call = variant.build(Linear(decay=(0.9, 0.8, 0.7, 0.6), chunk=32), _site())
    assert call.op is torch.ops.attnopt.linear_attention.default
    assert call.extra_args == (0.25, True, "elu", 32, [0.9, 0.8, 0.7, 0.6], 1e-6) + (None,) * 4
    call = variant.build(Linear("softmax_rf", decay=0.5), _site())
    assert call.extra_args[4] == [0.5]
    ref = ParamRef("projection")
    assert call.extra_args[6:] == (ref, None, ref, None)
    call = variant.build(Linear("hedgehog"), _site())
    assert call.extra_args[6:] == tuple(
        ParamRef(n) for n in ("q_weight", "q_bias", "k_weight", "k_bias")
    )


def test_variant_parameters():
    variant = get_variant(Linear())
    rf = variant.parameters(Linear("softmax_rf", num_features=40), _site())
    assert dict(rf.named_buffers())["projection"].shape == (16, 40)
    assert list(rf.parameters()) == []
    again = variant.parameters(Linear("softmax_rf", num_features=40), _site())
    torch.testing.assert_close(again.projection, rf.projection)  # fixed seed per site
    hh = variant.parameters(Linear("hedgehog"), _site())
    shapes = {n: tuple(p.shape) for n, p in hh.named_parameters()}
    assert shapes == {
        "q_weight": (4, 16, 16),
        "q_bias": (4, 16),
        "k_weight": (2, 16, 16),
        "k_bias": (2, 16),
    }
    torch.testing.assert_close(hh.q_weight[2], torch.eye(16))
    assert isinstance(hh, FeatureMapParameters)


@pytest.mark.parametrize(
    "config",
    [
        Linear(),
        Linear("softmax_rf", num_features=32, decay=(0.9, 0.8)),
        Linear("hedgehog", eps=1e-4),
    ],
    ids=["default", "rf-decay-tuple", "hedgehog"],
)
def test_config_round_trips_through_json(config):
    import json

    assert config_from_dict(json.loads(config.to_json())) == config
    assert config_from_dict(config.to_dict()) == config


def test_describe():
    assert Linear().describe() == "Linear()"
    assert Linear("relu", decay=0.9).describe() == "Linear(feature_map='relu', decay=0.9)"


# -- export ------------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, feature_map):
        super().__init__()
        self.params = FeatureMapParameters(feature_map, heads=4, kv_heads=2, head_dim=16)
        self.feature_map = feature_map

    def forward(self, q, k, v, kv_mask):
        p = dict(self.params.named_parameters()) | dict(self.params.named_buffers())
        names = ("q_weight", "q_bias", "k_weight", "k_bias")
        if self.feature_map == "softmax_rf":
            names = ("projection", None, "projection", None)
        ts = [p[n] if n else None for n in names]
        return OP(q, k, v, kv_mask, None, 0.25, True, self.feature_map, 16, [0.9], 1e-6, *ts)


@pytest.mark.parametrize("feature_map", ["softmax_rf", "hedgehog"])
def test_export_with_dynamic_sequence_length(feature_map):
    gen = torch.Generator().manual_seed(6)

    def inputs(n):
        return (
            torch.randn(2, 4, n, 16, generator=gen),
            torch.randn(2, 2, n, 16, generator=gen),
            torch.randn(2, 2, n, 8, generator=gen),
            torch.rand(2, 1, n, generator=gen) > 0.2,
        )

    module = _Attention(feature_map)
    seq = torch.export.Dim("seq", min=2, max=4096)
    dynamic = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "kv_mask": {2: seq}}
    exported = torch.export.export(module, inputs(37), dynamic_shapes=dynamic)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.attnopt.linear_attention.default]
    run = exported.module()
    for n in (5, 300):
        args = inputs(n)
        torch.testing.assert_close(run(*args), module(*args), atol=1e-6, rtol=1e-6)


# -- end to end --------------------------------------------------------------------------------


def _site_params(optimized, module):
    """The attnopt parameter module of a llama/mistral/qwen2 attention layer."""
    return optimized.attnopt_params[f"model__layers__{module.layer_idx}__self_attn"]


def _registry_linear(config: Linear, optimized):
    """Naive linear attention (fp64, full matrices) for transformers' registry."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        b, h, n, d = query.shape
        m = key.shape[-2]
        tensors = (None, None, None, None)
        if config.feature_map == "softmax_rf":
            proj = _site_params(optimized, module).projection
            tensors = (proj, None, proj, None)
        elif config.feature_map == "hedgehog":
            p = _site_params(optimized, module)
            tensors = (p.q_weight, p.q_bias, p.k_weight, p.k_bias)
        keep = torch.ones(b, 1, n, m, dtype=torch.bool)
        if attention_mask is not None:
            mask = attention_mask[..., :m]
            keep = keep & (mask if mask.dtype == torch.bool else mask > -1e4)
        qpos = torch.arange(n).view(n, 1) + (m - n)
        kpos = torch.arange(m).view(1, m)
        causal = getattr(module, "is_causal", False)
        if causal:
            keep = keep & (kpos <= qpos)
        qf = naive_phi(query, config.feature_map, tensors[0], tensors[1], scaling, query=True)
        kf = naive_phi(key, config.feature_map, tensors[2], tensors[3], scaling, query=False)
        rep = h // key.shape[1]
        kf = kf.repeat_interleave(rep, dim=1)
        a = (qf @ kf.transpose(-1, -2)) * keep
        if config.decay is not None:
            lam = torch.tensor(config.decay, dtype=torch.float64).reshape(-1, 1, 1)
            a = a * lam ** (qpos - kpos).clamp(min=0)
        out = a @ value.double().repeat_interleave(rep, dim=1)
        out = (out / (a.sum(-1, keepdim=True) + config.eps)).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _registry_model(model, name, attention):
    AttentionInterface.register(name, attention)
    # A custom attention name gets no mask unless a mask builder is registered for it.
    AttentionMaskInterface.register(name, sdpa_mask)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama")


@pytest.mark.parametrize(
    "config",
    [
        Linear(),
        Linear("relu", decay=(0.9, 0.8, 0.95, 1.0), chunk=8),
        Linear("softmax_rf", chunk=16, num_features=24),
        Linear("hedgehog", decay=0.9, chunk=5),
    ],
    ids=["elu", "relu-decay-per-head", "softmax_rf", "hedgehog-decay"],
)
def test_llama_matches_registry_reference(llama, config):
    optimized = attnopt.optimize(llama, config)
    report = optimized.report
    assert len(report.applied) == len(report.sites) == 2, str(report)
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.linear_attention.default in ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    if config.feature_map == "hedgehog":
        with torch.no_grad():  # move the maps off their identity init so they matter
            gen = torch.Generator().manual_seed(0)
            for p in optimized.attnopt_params.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    name = f"attnopt_test_linear_{config.feature_map}_{config.decay is not None}"
    reference = _registry_model(llama, name, _registry_linear(config, optimized))
    inputs = _inputs(llama, 31)
    with torch.no_grad():
        actual, expected = optimized(**inputs), reference(**inputs)
    torch.testing.assert_close(
        actual.logits[inputs["attention_mask"].bool()],
        expected.logits[inputs["attention_mask"].bool()],
        atol=END_TO_END,
        rtol=END_TO_END,
    )
    if config.feature_map == "hedgehog":
        _check_hedgehog_maps_train(optimized)
    if config.feature_map == "softmax_rf":
        _check_projection_is_a_saved_buffer(optimized)


def _check_hedgehog_maps_train(optimized):
    names = sorted(n for n, _ in optimized.named_parameters() if n.startswith("attnopt_params"))
    assert names == sorted(
        f"attnopt_params.model__layers__{i}__self_attn.{p}"
        for i in range(2)
        for p in ("k_bias", "k_weight", "q_bias", "q_weight")
    )
    ids = torch.randint(0, 256, (2, 24))
    optimized(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.square().mean().backward()
    for name, p in optimized.attnopt_params.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _check_projection_is_a_saved_buffer(optimized):
    state = optimized.state_dict()
    keys = [k for k in state if k.startswith("attnopt_params")]
    assert keys == [f"attnopt_params.model__layers__{i}__self_attn.projection" for i in range(2)]
    assert state[keys[0]].shape == (16, 24)  # tiny-llama head_dim 16, num_features 24
    assert not torch.equal(state[keys[0]], state[keys[1]])  # drawn per site
    assert list(optimized.attnopt_params.parameters()) == []


def test_bert_bidirectional_matches_registry_reference():
    bert = tiny_model("tiny-bert")
    config = Linear("elu")
    optimized = attnopt.optimize(bert, config)
    assert len(optimized.report.applied) == 2
    reference = _registry_model(bert, "attnopt_test_linear_bert", _registry_linear(config, None))
    inputs = _inputs(bert, 27)
    with torch.no_grad():
        actual, expected = optimized(**inputs), reference(**inputs)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(
        actual.last_hidden_state[mask],
        expected.last_hidden_state[mask],
        atol=END_TO_END,
        rtol=END_TO_END,
    )


def test_t5_refuses_biased_sites_and_takes_cross_attention():
    t5 = tiny_model("tiny-t5")
    optimized = attnopt.optimize(t5, Linear())
    report = optimized.report
    for site in report.sites:
        if site.site.mask is MaskKind.BIAS:
            assert not site.applied
            assert "cannot honour an additive position bias" in site.reason
        else:
            assert site.site.cross and site.applied
    assert len(report.applied) == 2 and len(report.skipped) == 4
    inputs = _inputs(t5, 17)
    with torch.no_grad():
        out = optimized(**inputs)
    assert torch.isfinite(_main(out)).all()
