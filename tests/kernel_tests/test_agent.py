"""Agent attention: reference, pooled SDPA path and custom op against a naive
implementation written here from the definition, plus gradients, errors, export and
end-to-end rewrites of tiny ViT/BERT models.

Agent attention has no configuration that equals dense attention, so every check is
against the naive agent attention below (fp64, explicit loops over the pooling
segments). Metric: elementwise ``|out - naive| <= atol + rtol * |naive|``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnopt
from attnopt.capture import example_inputs_for
from attnopt.config import config_from_dict
from attnopt.kernels import get_variant
from attnopt.kernels.agent import Agent, agent_attention_pooled, agent_attention_reference
from attnopt.site import AttentionSite, MaskKind
from attnopt.zoo import tiny_model
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches

TOLERANCE = KERNEL_TOLERANCE["agent"]

OP = torch.ops.attnopt.agent_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every problem here is tiny: a second thread only adds synchronisation per op,
    which stalls badly when the CPU is shared (gradcheck runs thousands of ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the naive truth ---------------------------------------------------------------------------


def naive_segment(o, length, parts):
    """Positions of pooling segment ``o`` of ``parts`` over ``length`` (adaptive pooling)."""
    return range(math.floor(o * length / parts), math.ceil((o + 1) * length / parts))


def naive_agents(q, keep, num_agents, grid):
    """fp64 agents [B, H, n, D] and present [B, H, n]: mean of the kept queries of each
    segment, one agent and one token at a time."""
    B, H, N, D = q.shape
    cells = math.prod(grid) if grid else N
    extra = N - cells
    shape = tuple(grid) if grid else (N,)
    side = round(num_agents ** (1 / len(shape)))
    agents = torch.zeros(B, H, num_agents, D, dtype=torch.float64)
    present = torch.zeros(B, H, num_agents, dtype=torch.bool)
    for b, h in itertools.product(range(B), range(H)):
        for a, agent in enumerate(itertools.product(range(side), repeat=len(shape))):
            ranges = [naive_segment(o, L, side) for o, L in zip(agent, shape)]
            members = []
            for cell in itertools.product(*ranges):
                flat = extra + sum(c * math.prod(shape[i + 1 :]) for i, c in enumerate(cell))
                if keep[b, h, flat]:
                    members.append(q[b, h, flat].double())
            if members:
                agents[b, h, a] = torch.stack(members).mean(0)
                present[b, h, a] = True
    return agents, present


def naive_softmax_attention(q, k, v, visible, scale):
    """fp64 masked softmax attention with per-head keys; rows with no key are 0."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    visible = visible.expand_as(scores)
    any_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    return torch.einsum("bhnm,bhmd->bhnd", torch.softmax(scores, dim=-1) * any_key, v)


def naive_agent(q, k, v, kv_mask, *, num_agents, grid, scale):
    B, H, N, _ = q.shape
    rep = H // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    keep = torch.ones(B, H, N, dtype=torch.bool)
    if kv_mask is not None:
        keep = keep & kv_mask
    agents, present = naive_agents(q, keep, num_agents, grid)
    agent_values = naive_softmax_attention(agents, k, v, keep.unsqueeze(-2), scale)
    return naive_softmax_attention(q.double(), agents, agent_values, present.unsqueeze(-2), scale)


# -- random problems ---------------------------------------------------------------------------


@st.composite
def problems(draw, dtype=torch.float32):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3) if kv_heads * r <= 4]))
    rank = draw(st.sampled_from([0, 0, 1, 2, 2, 3]))
    grid = tuple(draw(st.integers(1, {1: 40, 2: 12, 3: 5}[rank])) for _ in range(rank))
    side = draw(st.integers(1, 4))
    if rank:
        num_agents, extra = side**rank, draw(st.sampled_from([0, 1, 4]))
        n = extra + math.prod(grid)
    else:
        n = draw(st.one_of(st.sampled_from([1, 2, 63, 64, 65]), st.integers(1, 200)))
        num_agents, extra = draw(st.integers(1, 70)), 0
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        n=n,
        grid=grid,
        num_agents=num_agents,
        head_dim=draw(st.sampled_from([1, 3, 16, 24])),
        value_dim=draw(st.sampled_from([1, 5, 16])),
        mask=draw(st.sampled_from([None, "batch", "head", "keys", "empty"])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, n = case["batch"], case["heads"], case["kv_heads"], case["n"]
    dtype = case["dtype"]

    def randn(heads, dim):
        if case["layout"] == "bnhd":  # [B, N, H, D] storage seen through a transpose
            return torch.randn(b, n, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, n, dim, generator=gen).to(dtype)

    q = randn(h, case["head_dim"])
    k = randn(hkv, case["head_dim"])
    v = randn(hkv, case["value_dim"])
    kind = case["mask"]
    kv_mask = None
    if kind is not None:
        shape = {"batch": (b, 1, n), "head": (b, h, n), "keys": (n,), "empty": (b, 1, n)}[kind]
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask.view(-1, n)[:, -1] = False  # always some padding
        if kind == "empty":
            kv_mask[0] = False  # batch 0 is all padding: no agent, no key
    return q, k, v, kv_mask


def run_all(case, q, k, v, kv_mask):
    """(name, output) of every implementation under test."""
    kw = dict(num_agents=case["num_agents"], grid=case["grid"])
    scale = 1.0 / math.sqrt(case["head_dim"])
    yield "reference", agent_attention_reference(q, k, v, kv_mask, scale=scale, **kw)
    yield "pooled", agent_attention_pooled(q, k, v, kv_mask, scale=scale, **kw)
    yield "op", OP(q, k, v, kv_mask, None, scale, case["num_agents"], list(case["grid"]))


def check_case(case):
    q, k, v, kv_mask = make_inputs(case)
    expected = naive_agent(
        q,
        k,
        v,
        kv_mask,
        num_agents=case["num_agents"],
        grid=case["grid"],
        scale=1.0 / math.sqrt(case["head_dim"]),
    )
    for name, out in run_all(case, q, k, v, kv_mask):
        assert out.shape == expected.shape, name
        assert_matches(out, expected, case["dtype"], TOLERANCE)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no agent must be exactly 0"


# -- forward -----------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(problems())
def test_fp32_matches_naive(case):
    check_case(case)


def _case(**overrides):
    case = dict(
        batch=2,
        heads=4,
        kv_heads=2,
        n=1 + 14 * 14,
        grid=(14, 14),
        num_agents=49,
        head_dim=32,
        value_dim=16,
        mask="batch",
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    "vit-7x7-agents": _case(),
    "uneven-grid-pooling": _case(n=2 + 10 * 13, grid=(10, 13), num_agents=16, layout="bnhd"),
    "more-agents-than-tokens": _case(n=2 + 3 * 3, grid=(3, 3), num_agents=25, mask="head"),
    "video-3d": _case(n=4 * 6 * 5, grid=(4, 6, 5), num_agents=8, mask=None),
    "sequence-63": _case(n=63, grid=(), num_agents=10, mask="keys"),
    "one-token": _case(n=1, grid=(), num_agents=3, mask=None),
    "mqa-all-padding": _case(heads=4, kv_heads=1, n=40, grid=(), num_agents=7, mask="empty"),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype)))


def test_padding_tokens_do_not_change_valid_outputs():
    """Padding is out of the agents and the aggregation: changing padded tokens' q, k, v
    leaves the outputs at the other positions unchanged."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=gen) for _ in range(3))
    kv_mask = torch.rand(1, 1, 50, generator=gen) > 0.4
    out = OP(q, k, v, kv_mask, None, 0.3, 9, [])
    noise = [torch.where(kv_mask[..., None], t, torch.randn_like(t)) for t in (q, k, v)]
    valid = kv_mask[0, 0]
    torch.testing.assert_close(OP(*noise, kv_mask, None, 0.3, 9, [])[:, :, valid], out[:, :, valid])


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` filled with NaN, so an element the op forgets to write shows up."""
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
    out = OP(q, k, v, kv_mask, None, 0.125, case["num_agents"], list(case["grid"]))
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "num_agents", "grid", "mask"),
    [(7, 3, [], "keys"), (1 + 6, 4, [2, 3], "keys"), (8, 8, [2, 2, 2], None), (6, 2, [], "head")],
    ids=["sequence", "grid-2d-extra", "grid-3d", "per-head-mask"],
)
def test_gradcheck_op(n, num_agents, grid, mask):
    # The backward differentiates the forward with torch.func (~20 ms a call): tiny shapes.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, n, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    kv_mask = None
    if mask == "keys":
        kv_mask = torch.rand(n, generator=gen) > 0.2
    elif mask == "head":
        kv_mask = torch.rand(1, 2, n, generator=gen) > 0.3

    def fn(q, k, v):
        return OP(q, k, v, kv_mask, None, 0.6, num_agents, grid)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    """Schema, fake tensor, autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 2 + 20, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 2 + 20, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 2 + 20, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 22, generator=gen) > 0.2
    torch.library.opcheck(OP, (q, k, v, kv_mask, None, 0.35, 4, [4, 5]))
    torch.library.opcheck(OP, (q, k, v, None, None, 0.35, 5, []))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_grads(dtype):
    gen = torch.Generator().manual_seed(8)
    n = 1 + 9 * 10
    q = torch.randn(1, 4, n, 16, generator=gen).to(dtype)
    k = torch.randn(1, 2, n, 16, generator=gen).to(dtype)
    v = torch.randn(1, 2, n, 8, generator=gen).to(dtype)
    grad = torch.randn(1, 4, n, 8, generator=gen).to(dtype)
    kv_mask = torch.rand(1, 1, n, generator=gen) > 0.2

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.autograd.backward(fn(*inputs), grad.to(dtype))
        return [t.grad for t in inputs]

    want = grads(
        lambda q, k, v: agent_attention_reference(
            q, k, v, kv_mask, num_agents=9, grid=(9, 10), scale=0.25
        ),
        torch.float64,
    )
    got = grads(lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, 9, [9, 10]), dtype)
    atol, rtol = TOLERANCE[dtype]
    for label, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=f"d{label}")


def test_grads_match_reference():
    gen = torch.Generator().manual_seed(4)
    n = 3 + 12 * 11
    q = torch.randn(2, 4, n, 16, generator=gen)
    k = torch.randn(2, 2, n, 16, generator=gen)
    v = torch.randn(2, 2, n, 8, generator=gen)
    grad = torch.randn(2, 4, n, 8, generator=gen)
    kv_mask = torch.rand(2, 4, n, generator=gen) > 0.2
    kw = dict(num_agents=16, grid=(12, 11), scale=0.25)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    expected = grads(lambda q, k, v: agent_attention_reference(q, k, v, kv_mask, **kw))
    actual = {
        "pooled": grads(lambda q, k, v: agent_attention_pooled(q, k, v, kv_mask, **kw)),
        "op": grads(lambda q, k, v: OP(q, k, v, kv_mask, None, 0.25, 16, [12, 11])),
    }
    for name, got in actual.items():
        for label, a, b in zip("qkv", got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} d{label}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_agents", "match"),
    [(0, r"got 0"), (-3, r"got -3"), (True, r"got True"), (4.0, r"got 4.0")],
    ids=["zero", "negative", "bool", "float"],
)
def test_config_validation(num_agents, match):
    with pytest.raises(ValueError, match=r"Agent: num_agents must be a positive int .*" + match):
        Agent(num_agents=num_agents)


def _qkv(heads=4, kv_heads=2, n=1 + 4 * 5):
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randn(1, heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
    )


def test_op_rejects_bias():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"bias must be None .*shape \(1, 4, 21, 21\)"):
        OP(q, k, v, None, torch.zeros(1, 4, 21, 21), 0.5, 4, [4, 5])


@pytest.mark.parametrize(
    ("num_agents", "grid", "match"),
    [
        (0, [], r"num_agents must be a positive int"),
        (5, [4, 5], r"num_agents must be a perfect square to pool a 2-D grid \(4, 5\)"),
        (4, [2, 2, 5], r"num_agents must be a perfect cube"),
        (4, [5, 5], r"fewer than the grid \(5, 5\) holds \(25\)"),
        (4, [4, 0], r"grid must be empty \(pool over the sequence\) or 1 to 3 positive ints"),
        (1, [1, 1, 1, 1], r"grid must be empty"),
    ],
    ids=["agents-0", "not-square", "not-cube", "grid-too-big", "grid-0", "grid-4d"],
)
def test_op_rejects_bad_arguments(num_agents, grid, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"agent_attention: .*" + match):
        OP(q, k, v, None, None, 0.5, num_agents, grid)


def test_op_rejects_cross_attention():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q has 21 tokens but k has 20"):
        OP(q, k[:, :, 1:], v[:, :, 1:], None, None, 0.5, 4, [])


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: OP(q, k, v, m, None, 0.5, 4, [4, 5]),
        lambda q, k, v, m: agent_attention_pooled(q, k, v, m, num_agents=4, grid=(4, 5)),
        lambda q, k, v, m: agent_attention_reference(q, k, v, m, num_agents=4, grid=(4, 5)),
    ],
    ids=["op", "pooled", "reference"],
)
def test_input_validation(fn):
    q, k, v = _qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        fn(q, k, v, None)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_mask must be a bool tensor .*got torch.float32"):
        fn(q, k, v, torch.ones(1, 1, 21))
    with pytest.raises(ValueError, match=r"kv_mask must be broadcastable to \[B, H, M\]"):
        fn(q, k, v, torch.ones(1, 3, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q, k and v must share one dtype"):
        fn(q, k.double(), v, None)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, N, D\], got shape \(4, 21, 4\)"):
        fn(q[0], k, v, None)


# -- the variant and export ---------------------------------------------------------------------


def _site(mask=MaskKind.NONE, cross=False, grid=(8, 8)):
    return AttentionSite(
        name="layers.0.attention",
        module_type="ViTAttention",
        spelling="sdpa",
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        value_dim=16,
        scale=0.25,
        mask=mask,
        cross=cross,
        grid=grid,
    )


def test_variant_supports_and_builds():
    config = Agent(num_agents=16)
    variant = get_variant(config)
    assert not variant.accepts_bias
    for kind in (MaskKind.NONE, MaskKind.PADDING):
        assert variant.supports(config, _site(kind)) is None
    assert "mask kind 'bias'" in variant.supports(config, _site(MaskKind.BIAS))
    assert "mask kind 'other'" in variant.supports(config, _site(MaskKind.OTHER))
    for kind in (MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING):
        assert variant.supports(config, _site(kind)).startswith("agent attention is not causal")
    assert "cross-attention" in variant.supports(config, _site(cross=True))
    assert "perfect cube" in variant.supports(config, _site(grid=(4, 8, 8)))
    assert variant.supports(Agent(num_agents=64), _site(grid=(4, 8, 8))) is None
    assert variant.supports(Agent(num_agents=15), _site(grid=None)) is None
    call = variant.build(config, _site())
    assert call.op is torch.ops.attnopt.agent_attention.default
    assert call.extra_args == (0.25, 16, [8, 8])
    assert variant.build(config, _site(grid=None)).extra_args == (0.25, 16, [])


def test_config_round_trips_through_json():
    import json

    config = Agent(num_agents=16)
    assert config_from_dict(json.loads(config.to_json())) == config
    assert Agent().num_agents == 49
    assert config.describe() == "Agent(num_agents=16)"


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, kv_mask):
        return OP(q, k, v, kv_mask, None, 0.25, 9, [6, 7])


def test_export_with_dynamic_extra_tokens():
    gen = torch.Generator().manual_seed(6)

    def inputs(batch, n):
        return (
            torch.randn(batch, 4, n, 16, generator=gen),
            torch.randn(batch, 2, n, 16, generator=gen),
            torch.randn(batch, 2, n, 8, generator=gen),
            torch.rand(batch, 1, n, generator=gen) > 0.2,
        )

    seq = torch.export.Dim("seq", min=42, max=4096)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = {name: {0: batch, 2: seq} for name in ("q", "k", "v", "kv_mask")}
    exported = torch.export.export(_Attention(), inputs(2, 43), dynamic_shapes=dynamic)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.attnopt.agent_attention.default]
    module = exported.module()
    for b, n in ((1, 42), (3, 50)):
        q, k, v, kv_mask = inputs(b, n)
        expected = agent_attention_reference(
            q, k, v, kv_mask, num_agents=9, grid=(6, 7), scale=0.25
        )
        torch.testing.assert_close(module(q, k, v, kv_mask), expected, atol=1e-5, rtol=1e-5)


# -- end to end on tiny transformers models ------------------------------------------------------


def _registered_agent(num_agents, grid):
    """This file's naive agent attention for transformers' registry (no attnopt code)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        b, h, n, d = query.shape
        kv_mask = None
        if attention_mask is not None:
            mask = attention_mask[..., -1, :n]  # [B, 1, N]: padding is per key
            kv_mask = mask if mask.dtype == torch.bool else mask > -1e4
        scale = d**-0.5 if scaling is None else scaling
        out = naive_agent(
            query, key, value, kv_mask, num_agents=num_agents, grid=grid, scale=scale
        ).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _reference_model(model, num_agents, grid):
    name = f"attnopt_test_agent_{num_agents}_{'x'.join(map(str, grid))}"
    AttentionInterface.register(name, _registered_agent(num_agents, grid))
    AttentionMaskInterface.register(name, sdpa_mask)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name, impl):
    if (name, impl) not in models:
        models[name, impl] = tiny_model(name, attn_implementation=impl)
    return models[name, impl]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit_matches_registered_naive_agent_attention(models, impl):
    model = _model(models, "tiny-vit", impl)
    optimized = attnopt.optimize(model, Agent(num_agents=16))
    report = optimized.report
    assert len(report.applied) == len(report.sites) == 2, str(report)
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.agent_attention.default in ops
    assert report.output_error.max_abs > 1e-4  # an approximation: it does change the output
    reference = _reference_model(model, 16, (8, 8))
    inputs = example_inputs_for(model, batch=2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            _main(optimized(**inputs)), _main(reference(**inputs)), atol=1e-5, rtol=1e-5
        )


def test_text_encoder_pools_the_sequence_and_honours_padding(models):
    model = _model(models, "tiny-bert", "sdpa")
    inputs = example_inputs_for(model, batch=2, seq_len=29, seed=1)
    inputs.pop("use_cache", None)
    inputs["attention_mask"][0, :6] = 0
    inputs["attention_mask"][1, 23:] = 0
    optimized = attnopt.optimize(model, Agent(num_agents=5), inputs)
    assert len(optimized.report.applied) == 2
    reference = _reference_model(model, 5, ())
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            _main(optimized(**inputs))[keep],
            _main(reference(**inputs))[keep],
            atol=1e-5,
            rtol=1e-5,
        )


def test_causal_model_is_skipped_with_reason(models):
    model = _model(models, "tiny-llama", "sdpa")
    optimized = attnopt.optimize(model, Agent(num_agents=4))
    assert not optimized.report.applied
    assert all(s.reason.startswith("agent attention is not causal") for s in optimized.report)
    inputs = example_inputs_for(model, batch=2, seq_len=12, seed=2)
    inputs.pop("use_cache", None)
    with torch.no_grad():
        torch.testing.assert_close(_main(optimized(**inputs)), _main(model(**inputs)))
