"""Hybrid softmax-window + linear attention: reference, blockwise kernel and custom op
against a naive implementation written here from the definition, plus exactness
(``window >= N`` is softmax attention, at op level and on real models), gradients
(including the feature maps and the mixing gate), errors, the variant's wiring,
export and end-to-end runs against transformers' attention registry.

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
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.kernels.hybrid import Hybrid, hybrid_attention_blockwise, hybrid_attention_reference
from attnopt.kernels.linear.feature_maps import FeatureMapParameters
from attnopt.site import AttentionSite, MaskKind
from attnopt.zoo import tiny_model
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches
from tests.kernel_tests.test_linear import MAPS, feature_tensors, naive_phi
from tests.test_models import _assert_close, _inputs

TOLERANCE = KERNEL_TOLERANCE["hybrid"]
EXACT = 1e-5  # window >= N against softmax attention (op level and end to end)
END_TO_END = 1e-4  # small windows: logits against the registry reference

OP = torch.ops.attnopt.hybrid_attention
NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The problems here are tiny: a second intra-op thread only adds wake-up latency,
    which on a busy machine costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the naive truth ---------------------------------------------------------------------------


def naive_hybrid(q, k, v, kv_mask, *, window, sinks, scale, feature_map, tensors, mix_logit):
    """fp64, unstabilised, straight from the definition:
    ``Σ_win g·e^s v + Σ_old (1−g)·φφ v`` over the same sum of weights (0 if none)."""
    qw, qb, kw, kb = tensors
    b, h, n, _ = q.shape
    m = k.shape[2]
    rep = h // k.shape[1]
    kd, vd = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), kd) * scale
    qf = naive_phi(q, feature_map, qw, qb, scale, query=True)
    kf = naive_phi(k, feature_map, kw, kb, scale, query=False).repeat_interleave(rep, 1)
    lin = torch.einsum("bhnf,bhmf->bhnm", qf, kf)
    p = torch.arange(n)[:, None] + (m - n)  # query i sits at key position p
    j = torch.arange(m)[None, :]
    in_window = (j <= p) & ((p - j < window) | (j < sinks))
    old = (j <= p - window) & (j >= sinks)
    if kv_mask is not None:
        in_window, old = in_window & kv_mask.unsqueeze(-2), old & kv_mask.unsqueeze(-2)
    g = torch.full((h,), 0.5, dtype=torch.float64)
    if mix_logit is not None:
        g = torch.sigmoid(mix_logit.double())
    g = g.view(1, h, 1, 1)
    weights = g * torch.exp(scores) * in_window + (1 - g) * lin * old
    den = weights.sum(-1, keepdim=True)
    out = torch.einsum("bhnm,bhmd->bhnd", weights, vd)
    return torch.where(den > 0, out / torch.where(den > 0, den, 1.0), 0.0)


# -- random problems ---------------------------------------------------------------------------


@st.composite
def problems(draw, dtype=torch.float32, max_len=300):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3) if kv_heads * r <= 4]))
    n = draw(st.one_of(st.sampled_from([1, 2, 63, 64, 65, 127]), st.integers(1, max_len)))
    m = max(1, n + draw(st.sampled_from([0, 0, 1, 17, 64, -5])))
    feature_map = draw(st.sampled_from(MAPS))
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        m=m,
        head_dim=draw(st.sampled_from([1, 3, 16, 24])),
        value_dim=draw(st.sampled_from([1, 5, 16])),
        window=draw(st.one_of(st.integers(1, 8), st.integers(1, m + 5))),
        sinks=draw(st.integers(0, 5)),
        feature_map=feature_map,
        num_features=None
        if feature_map in ("elu", "relu")
        else draw(st.sampled_from([None, 5, 12])),
        mixing=draw(st.booleans()),
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
    mix = torch.randn(h, generator=gen) * 2 if case["mixing"] else None
    return q, k, v, kv_mask, tensors, mix


def run_all(case, q, k, v, kv_mask, tensors, mix):
    """(name, output) of every implementation under test."""
    scale = 1.0 / math.sqrt(case["head_dim"])
    kw = dict(window=case["window"], sinks=case["sinks"], feature_map=case["feature_map"])
    named = dict(zip(NAMES, tensors, strict=True))
    yield (
        "reference",
        hybrid_attention_reference(q, k, v, kv_mask, scale=scale, mix_logit=mix, **kw, **named),
    )
    yield (
        "blockwise",
        hybrid_attention_blockwise(
            q,
            k,
            v,
            kv_mask,
            scale=scale,
            chunk=case["chunk"],
            max_elements=case["max_elements"],
            mix_logit=mix,
            **kw,
            **named,
        ),
    )
    yield (
        "blockwise-pytorch",
        hybrid_attention_blockwise(
            q, k, v, kv_mask, scale=scale, chunk=case["chunk"],
            max_elements=case["max_elements"], mix_logit=mix, fused=False, **kw, **named,
        ),
    )  # fmt: skip
    yield (
        "op",
        OP(
            q,
            k,
            v,
            kv_mask,
            None,
            scale,
            True,
            case["window"],
            case["sinks"],
            case["feature_map"],
            case["chunk"],
            *tensors,
            mix,
        ),
    )


def check_case(case):
    q, k, v, kv_mask, tensors, mix = make_inputs(case)
    expected = naive_hybrid(
        q,
        k,
        v,
        kv_mask,
        window=case["window"],
        sinks=case["sinks"],
        scale=1.0 / math.sqrt(case["head_dim"]),
        feature_map=case["feature_map"],
        tensors=tensors,
        mix_logit=mix,
    )
    for name, out in run_all(case, q, k, v, kv_mask, tensors, mix):
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
        window=37,
        sinks=4,
        feature_map="elu",
        num_features=None,
        mixing=False,
        chunk=64,
        max_elements=None,
        mask="batch",
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    **{f"long-{fm}": _case(feature_map=fm, mask="head") for fm in MAPS},
    "hedgehog-mixing": _case(feature_map="hedgehog", mixing=True, num_features=6, chunk=16),
    "window-1-no-sinks": _case(window=1, sinks=0, chunk=7),
    "window-not-dividing-chunk": _case(window=50, chunk=16, layout="bnhd"),
    "queries-at-end": _case(n=63, m=127, window=20, chunk=16, mask="keys"),
    "decode-one-query": _case(n=1, m=200, window=50, sinks=2, mask=None),
    "more-queries-than-keys": _case(n=40, m=25, window=6, chunk=7, mask="empty"),
    "mqa-many-groups": _case(heads=4, kv_heads=1, n=1000, m=1000, window=64, max_elements=5000),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype, max_len=130)))


@pytest.mark.parametrize(
    ("n", "m"), [(1, 1), (63, 63), (40, 101), (130, 130), (40, 25)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_window_covering_all_keys_is_softmax(n, m, feature_map):
    gen = torch.Generator().manual_seed(n * 1000 + m)
    q = torch.randn(2, 4, n, 24, generator=gen)
    k = torch.randn(2, 2, m, 24, generator=gen)
    v = torch.randn(2, 2, m, 12, generator=gen)
    kv_mask = torch.rand(2, 1, m, generator=gen) > 0.2
    tensors = feature_tensors(feature_map, 4, 2, 24, None, gen)
    mix = torch.randn(4, generator=gen)
    dense = dense_attention_reference(q, k, v, kv_mask, scale=0.3, causal=True)
    named = dict(zip(NAMES, tensors, strict=True))
    for window, sinks in ((m, 0), (m + 7, 3)):
        kw = dict(window=window, sinks=sinks, scale=0.3, feature_map=feature_map, mix_logit=mix)
        outs = {
            "reference": hybrid_attention_reference(q, k, v, kv_mask, **kw, **named),
            "blockwise": hybrid_attention_blockwise(q, k, v, kv_mask, chunk=16, **kw, **named),
            "op": OP(
                q, k, v, kv_mask, None, 0.3, True, window, sinks, feature_map, 16, *tensors, mix
            ),
        }
        for name, out in outs.items():
            torch.testing.assert_close(out, dense, atol=EXACT, rtol=EXACT, msg=name)


def test_extreme_scores_stay_finite():
    """Huge window scores (the linear part underflows) and hugely negative ones (the
    window part underflows) both keep the output a finite convex combination."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 200, 16, generator=gen)
    k = torch.randn(1, 2, 200, 16, generator=gen)
    v = torch.randn(1, 2, 200, 8, generator=gen)
    for scale in (40.0, -40.0, 1e-3):
        kw = dict(window=10, sinks=2, scale=scale)
        expected = hybrid_attention_reference(q.double(), k.double(), v.double(), **kw)
        out = hybrid_attention_blockwise(q, k, v, chunk=32, **kw)
        assert torch.isfinite(out).all()
        assert out.abs().max() <= v.abs().max() + 1e-4  # a convex combination of values
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` filled with NaN, so an output element the kernel forgets to
    write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


WRITE_CASES = ["long-softmax_rf", "hedgehog-mixing", "queries-at-end", "more-queries-than-keys"]


@pytest.mark.parametrize("case", [FIXED_CASES[c] for c in WRITE_CASES], ids=WRITE_CASES)
def test_every_output_element_is_written(case, nan_filled_empty):
    q, k, v, kv_mask, tensors, mix = make_inputs(case)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = OP(
        q,
        k,
        v,
        kv_mask,
        None,
        0.25,
        True,
        case["window"],
        case["sinks"],
        case["feature_map"],
        case["chunk"],
        *tensors,
        mix,
    )
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feature_map", "window", "sinks", "mixing"),
    [
        ("elu", 2, 0, False),
        ("relu", 3, 2, True),
        ("softmax_rf", 2, 1, False),
        ("hedgehog", 3, 1, True),
    ],
    ids=lambda x: str(x),
)
def test_gradcheck_op(feature_map, window, sinks, mixing):
    gen = torch.Generator().manual_seed(3)
    f64 = dict(generator=gen, dtype=torch.float64)
    q = torch.randn(1, 4, 7, 3, **f64, requires_grad=True)
    k = torch.randn(1, 2, 9, 3, **f64, requires_grad=True)
    v = torch.randn(1, 2, 9, 2, **f64, requires_grad=True)
    kv_mask = torch.tensor([True, False, True, True, True, True, False, True, True])
    tensors = [
        None if t is None else t.double() for t in feature_tensors(feature_map, 4, 2, 3, 4, gen)
    ]
    mix = torch.randn(4, **f64, requires_grad=True) if mixing else None
    if feature_map == "hedgehog":
        for t in tensors:
            t.requires_grad_(True)
    learned = [t for t in (*tensors, mix) if t is not None and t.requires_grad]

    def fn(q, k, v, *learned_now):
        swap = dict(zip(map(id, learned), learned_now, strict=True))
        ts = [None if t is None else swap.get(id(t), t) for t in (*tensors, mix)]
        return OP(q, k, v, kv_mask, None, 0.6, True, window, sinks, feature_map, 3, *ts)

    assert torch.autograd.gradcheck(fn, (q, k, v, *learned), fast_mode=True)


def test_opcheck():
    """Schema, fake tensor and autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 9, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 11, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 11, generator=gen) > 0.2
    hedgehog = [t.requires_grad_(True) for t in feature_tensors("hedgehog", 4, 2, 8, 6, gen)]
    mix = torch.randn(4, generator=gen, requires_grad=True)
    args = (q, k, v, kv_mask, None, 0.35, True)
    torch.library.opcheck(OP, (*args, 3, 1, "elu", 4, None, None, None, None, None))
    torch.library.opcheck(OP, (*args, 2, 0, "hedgehog", 3, *hedgehog, mix))


def test_grads_match_reference():
    """q, k, v, hedgehog weights and mixing logits through the blockwise kernel and the op."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 150, 16, generator=gen)
    k = torch.randn(2, 2, 170, 16, generator=gen)
    v = torch.randn(2, 2, 170, 8, generator=gen)
    grad = torch.randn(2, 4, 150, 8, generator=gen)
    kv_mask = torch.rand(2, 1, 170, generator=gen) > 0.2
    tensors = feature_tensors("hedgehog", 4, 2, 16, None, gen)
    mix = torch.randn(4, generator=gen)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, *tensors, mix)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    kw = dict(window=20, sinks=2, scale=0.25, feature_map="hedgehog")

    def named(ts):
        return dict(zip(NAMES, ts[:4], strict=True)) | {"mix_logit": ts[4]}

    expected = grads(
        lambda q, k, v, *ts: hybrid_attention_reference(q, k, v, kv_mask, **kw, **named(ts))
    )
    actual = {
        "blockwise": grads(
            lambda q, k, v, *ts: hybrid_attention_blockwise(
                q, k, v, kv_mask, chunk=16, **kw, **named(ts)
            )
        ),
        "op": grads(
            lambda q, k, v, *ts: OP(q, k, v, kv_mask, None, 0.25, True, 20, 2, "hedgehog", 16, *ts)
        ),
    }
    for name, got in actual.items():
        for label, a, b in zip(("q", "k", "v", *NAMES, "mix"), got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name} d{label}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(window=0), r"window must be a positive int .*got 0"),
        (dict(window=2.5), r"window must be a positive int .*got 2.5"),
        (dict(sinks=-1), r"sinks must be a non-negative int .*got -1"),
        (dict(feature_map="exp"), r"feature_map must be one of .*got 'exp'"),
        (dict(chunk=0), r"chunk must be a positive int, got 0"),
        (dict(num_features=4), r"num_features must be None for feature_map 'elu'"),
        (dict(mixing=1), r"mixing must be a bool, got 1"),
    ],
    ids=["window-0", "window-float", "sinks", "map", "chunk", "features", "mixing"],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match="Hybrid: " + match):
        Hybrid(**kwargs)


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
    window=3,
    sinks=1,
    feature_map="elu",
    chunk=4,
    tensors=(None, None, None, None),
    mix=None,
):
    return OP(q, k, v, kv_mask, bias, 0.5, causal, window, sinks, feature_map, chunk, *tensors, mix)


def test_op_rejects_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"hybrid_attention: bias must be None .*\(1, 4, 8, 8\)"):
        _op(q, k, v, bias=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"hybrid attention is causal only .*causal=False"):
        _op(q, k, v, causal=False)
    with pytest.raises(ValueError, match=r"window must be a positive int .*got 0"):
        _op(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"sinks must be a non-negative int .*got -2"):
        _op(q, k, v, sinks=-2)
    with pytest.raises(ValueError, match=r"feature_map must be one of .*got 'exp'"):
        _op(q, k, v, feature_map="exp")
    with pytest.raises(ValueError, match=r"chunk must be a positive int .*got 0"):
        _op(q, k, v, chunk=0)
    with pytest.raises(ValueError, match=r"mix_logit must be a float tensor \[H\] = \[4\] "):
        _op(q, k, v, mix=torch.zeros(2))
    with pytest.raises(ValueError, match=r"feature_map 'hedgehog' needs q_weight"):
        _op(q, k, v, feature_map="hedgehog")


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: _op(q, k, v, kv_mask=m),
        lambda q, k, v, m: hybrid_attention_blockwise(q, k, v, m, window=3),
        lambda q, k, v, m: hybrid_attention_reference(q, k, v, m, window=3),
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
    with pytest.raises(ValueError, match=r"k head dim must equal q head dim 4"):
        fn(q, k[..., :3], v, None)


# -- the variant -------------------------------------------------------------------------------


def _site(mask=MaskKind.CAUSAL, cross=False, heads=4):
    return AttentionSite(
        name="layers.0.attn",
        module_type="Attention",
        spelling="sdpa",
        num_heads=heads,
        num_kv_heads=2 if heads else None,
        head_dim=16,
        value_dim=16,
        scale=0.25,
        mask=mask,
        cross=cross,
    )


def test_variant_supports():
    config = Hybrid()
    variant = get_variant(config)
    assert not variant.accepts_bias
    for kind in (MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING):
        assert variant.supports(config, _site(kind)) is None
    for kind in (MaskKind.BIAS, MaskKind.OTHER):
        assert f"mask kind '{kind}'" in variant.supports(config, _site(kind))
    for kind in (MaskKind.NONE, MaskKind.PADDING):
        assert "causal sites only" in variant.supports(config, _site(kind))
    assert "cross-attention" in variant.supports(config, _site(MaskKind.CAUSAL, cross=True))
    assert "head count" in variant.supports(Hybrid(mixing=True), _site(heads=None))
    assert "heads were not recovered" in variant.supports(
        Hybrid(feature_map="hedgehog"), _site(heads=None)
    )


def test_variant_builds_and_owns_parameters():
    variant = get_variant(Hybrid())
    call = variant.build(Hybrid(window=32, sinks=2, chunk=16), _site())
    assert call.op is torch.ops.attnopt.hybrid_attention.default
    assert call.extra_args == (0.25, True, 32, 2, "elu", 16) + (None,) * 5
    config = Hybrid(feature_map="hedgehog", mixing=True)
    call = variant.build(config, _site())
    assert call.extra_args[6:] == tuple(ParamRef(n) for n in (*NAMES, "mix_logit"))
    params = variant.parameters(config, _site())
    assert isinstance(params, FeatureMapParameters)
    assert params.mix_logit.shape == (4,) and (params.mix_logit == 0).all()
    call = variant.build(Hybrid(feature_map="softmax_rf"), _site())
    assert call.extra_args[6:] == (ParamRef("projection"), None, ParamRef("projection"), None, None)


@pytest.mark.parametrize(
    "config",
    [Hybrid(), Hybrid(128, 0, "softmax_rf", 32, 48, True)],
    ids=["default", "everything"],
)
def test_config_round_trips_through_json(config):
    import json

    assert config_from_dict(json.loads(config.to_json())) == config
    assert config_from_dict(config.to_dict()) == config


def test_describe():
    assert Hybrid().describe() == "Hybrid()"
    assert Hybrid(window=16, mixing=True).describe() == "Hybrid(window=16, mixing=True)"


# -- export ------------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.params = FeatureMapParameters(
            "hedgehog", heads=4, kv_heads=2, head_dim=16, mixing=True
        )

    def forward(self, q, k, v, kv_mask):
        p = self.params
        ts = (p.q_weight, p.q_bias, p.k_weight, p.k_bias, p.mix_logit)
        return OP(q, k, v, kv_mask, None, 0.25, True, 8, 2, "hedgehog", 16, *ts)


def test_export_with_dynamic_sequence_length():
    gen = torch.Generator().manual_seed(6)

    def inputs(n):
        return (
            torch.randn(2, 4, n, 16, generator=gen),
            torch.randn(2, 2, n, 16, generator=gen),
            torch.randn(2, 2, n, 8, generator=gen),
            torch.rand(2, 1, n, generator=gen) > 0.2,
        )

    module = _Attention()
    seq = torch.export.Dim("seq", min=2, max=4096)
    dynamic = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "kv_mask": {2: seq}}
    exported = torch.export.export(module, inputs(37), dynamic_shapes=dynamic)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.attnopt.hybrid_attention.default]
    run = exported.module()
    for n in (5, 300):
        args = inputs(n)
        torch.testing.assert_close(run(*args), module(*args), atol=1e-6, rtol=1e-6)


# -- end to end --------------------------------------------------------------------------------

CAUSAL_MODELS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"]


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_window_covering_the_sequence_is_exact_end_to_end(name):
    model = tiny_model(name)
    config = Hybrid(window=4096, sinks=2, feature_map="hedgehog", mixing=True)
    optimized = attnopt.optimize(model, config)
    report = optimized.report
    assert len(report.applied) == len(report.sites) == 2, str(report)
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.hybrid_attention.default in ops
    inputs = _inputs(model, 29)
    with torch.no_grad():
        actual, expected = optimized(**inputs), model(**inputs)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual.logits[mask], expected.logits[mask], atol=EXACT, rtol=EXACT)


def _registry_hybrid(config: Hybrid, optimized):
    """Naive hybrid attention (fp64, full matrices) for transformers' registry."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        b, h, n, d = query.shape
        m = key.shape[-2]
        keep = torch.ones(b, 1, n, m, dtype=torch.bool)
        if attention_mask is not None:
            mask = attention_mask[..., :m]
            keep = keep & (mask if mask.dtype == torch.bool else mask > -1e4)
        # The padding mask alone (the last query row of the causal mask sees every key
        # that is not padding); the causal split into window and older keys is naive_hybrid's.
        keys = keep[:, :, -1]  # [b, 1, m]
        site_key = f"model__layers__{module.layer_idx}__self_attn"
        params = dict(optimized.attnopt_params.items()).get(site_key)
        tensors = (None,) * 4
        if config.feature_map == "hedgehog":
            tensors = (params.q_weight, params.q_bias, params.k_weight, params.k_bias)
        mix = params.mix_logit if config.mixing else None
        out = naive_hybrid(
            query,
            key,
            value,
            keys.expand(b, h, m),
            window=config.window,
            sinks=config.sinks,
            scale=scaling,
            feature_map=config.feature_map,
            tensors=tensors,
            mix_logit=mix,
        )
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize(
    "config",
    [Hybrid(window=5, sinks=2), Hybrid(window=4, sinks=1, feature_map="hedgehog", mixing=True)],
    ids=["elu", "hedgehog-mixing"],
)
def test_llama_small_window_matches_registry_reference(config):
    llama = tiny_model("tiny-llama")
    optimized = attnopt.optimize(llama, config)
    assert len(optimized.report.applied) == 2
    with torch.no_grad():  # move the trainable parts off their init so they matter
        gen = torch.Generator().manual_seed(0)
        for p in optimized.attnopt_params.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    name = f"attnopt_test_hybrid_{config.feature_map}_{config.mixing}"
    AttentionInterface.register(name, _registry_hybrid(config, optimized))
    AttentionMaskInterface.register(name, sdpa_mask)
    reference = copy.deepcopy(llama)
    reference.set_attn_implementation(name)
    inputs = _inputs(llama, 31)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        actual, expected = optimized(**inputs), reference(**inputs)
    torch.testing.assert_close(
        actual.logits[mask], expected.logits[mask], atol=END_TO_END, rtol=END_TO_END
    )
    if config.mixing:  # the maps and the gate train
        optimized(**inputs).logits.square().mean().backward()
        for pname, p in optimized.attnopt_params.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5"])
def test_sites_it_cannot_honour_are_left_exact(name):
    model = tiny_model(name)
    optimized = attnopt.optimize(model, Hybrid(window=4))
    report = optimized.report
    assert not report.applied
    reasons = {s.reason.split(";")[0] for s in report.skipped}
    if name == "tiny-bert":
        assert reasons == {
            "hybrid attention is implemented for causal sites only (its linear "
            "part is a running state of older keys)"
        }
    else:
        assert any("mask kind 'bias'" in r for r in reasons)
        assert any("cross-attention" in r for r in reasons)
    inputs = _inputs(model, 19)
    with torch.no_grad():
        _assert_close(model, inputs, optimized(**inputs), model(**inputs))
