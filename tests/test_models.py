"""End-to-end: attnopt.optimize on a zoo of tiny transformers models.

Exactness isolates the plumbing (``Dense()`` and ``SlidingWindow(window >= N)`` must
reproduce the original model), and small windows are checked against an
independent reference: the same model running a masked-attention function we
register with transformers' own attention registry, written here from the
definition of the window and sharing no code with attnopt.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnopt
from attnopt.capture import example_inputs_for
from attnopt.zoo import tiny_model

MODELS = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-gpt2",
    "tiny-bert",
    "tiny-vit",
    "tiny-t5",
]
IMPLS = ["sdpa", "eager"]
CASES = [pytest.param(m, i, id=f"{m}-{i}") for m in MODELS for i in IMPLS]
TEXT_CASES = [c for c in CASES if not c.values[0].startswith("tiny-vit")]
# Attention layers per model: 2 self-attention layers, T5 has 2 encoder self, 2 decoder
# self and 2 cross-attention layers.
SITES = {"tiny-t5": 6}
ATOL = RTOL = 1e-5


def _reference_attention(window: int, sinks: int):
    """Masked softmax attention with a sliding window, for transformers' registry."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        b, h, n, d = query.shape
        m = key.shape[-2]
        rep = h // key.shape[1]
        key = key.repeat_interleave(rep, dim=1).double()
        value = value.repeat_interleave(rep, dim=1).double()
        scale = d**-0.5 if scaling is None else scaling
        scores = query.double() @ key.transpose(-1, -2) * scale
        keep = torch.ones(b, 1, n, m, dtype=torch.bool)
        if attention_mask is not None:
            mask = attention_mask[..., :m]
            keep = keep & (mask if mask.dtype == torch.bool else mask > -1e4)
        qpos = torch.arange(n).view(n, 1) + (m - n)
        kpos = torch.arange(m).view(1, m)
        if getattr(module, "is_causal", False):
            keep = keep & (kpos <= qpos)
            near = qpos - kpos < window
        else:
            near = (qpos - kpos).abs() < window
        keep = keep & (near | (kpos < sinks))
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = (probs @ value).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _reference_model(model, window: int, sinks: int):
    name = f"attnopt_test_window_{window}_{sinks}"
    AttentionInterface.register(name, _reference_attention(window, sinks))
    # A custom attention name gets no mask unless a mask builder is registered for it.
    AttentionMaskInterface.register(name, sdpa_mask)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


def _inputs(model, seq_len: int, *, seed: int = 1, pad: bool = True):
    inputs = example_inputs_for(model, batch=2, seq_len=seq_len, seed=seed)
    inputs.pop("use_cache", None)
    if pad and "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        mask[0, : seq_len // 4] = 0  # left padding
        mask[1, seq_len - seq_len // 5 :] = 0  # right padding
    return inputs


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_close(model, inputs, actual, expected):
    """Compare where the output means something: not at padded query positions."""
    a, e = _main(actual), _main(expected)
    mask = inputs.get("attention_mask")
    if mask is not None and a.shape[:2] == mask.shape:
        a, e = a[mask.bool()], e[mask.bool()]
    torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name, impl):
    key = (name, impl)
    if key not in models:
        models[key] = tiny_model(name, attn_implementation=impl)
    return models[key]


@pytest.mark.parametrize("name,impl", CASES)
def test_dense_is_exact_and_finds_every_layer(models, name, impl):
    model = _model(models, name, impl)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized = attnopt.optimize(model, attnopt.Dense())
    report = optimized.report
    assert len(report.sites) == SITES.get(name, 2)
    assert all(s.applied for s in report.sites), str(report)
    assert report.output_error.max_abs < ATOL
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.dense_attention.default in ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    assert torch.ops.aten.softmax.int not in ops

    inputs = _inputs(model, 23)
    with torch.no_grad():
        _assert_close(model, inputs, optimized(**inputs), model(**inputs))
    # optimize() leaves the model as it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("name,impl", CASES)
def test_window_covering_the_sequence_is_exact(models, name, impl):
    model = _model(models, name, impl)
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=4096, sinks=2))
    inputs = _inputs(model, 29)
    with torch.no_grad():
        _assert_close(model, inputs, optimized(**inputs), model(**inputs))


@pytest.mark.parametrize("name,impl", CASES)
def test_small_window_matches_masked_reference(models, name, impl):
    model = _model(models, name, impl)
    window, sinks = 5, 2
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=window, sinks=sinks))
    report = optimized.report
    if name == "tiny-t5":
        # T5's self-attention carries a relative position bias and the rest is
        # cross-attention: a sliding window honours neither, and says so.
        assert not report.applied
        assert all(s.reason for s in report.skipped)
        reference = model
    else:
        assert len(report.applied) == len(report.sites)
        reference = _reference_model(model, window, sinks)
    inputs = _inputs(model, 31)
    with torch.no_grad():
        _assert_close(model, inputs, optimized(**inputs), reference(**inputs))


@pytest.mark.parametrize("name,impl", TEXT_CASES)
def test_graph_captured_at_64_runs_at_other_lengths(models, name, impl):
    model = _model(models, name, impl)
    example = example_inputs_for(model, seq_len=64)
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=16), example)
    # T5's sites are all skipped (position bias, cross-attention): it must stay exact.
    reference = model if name == "tiny-t5" else _reference_model(model, 16, 0)
    for n in (100, 257):
        inputs = _inputs(model, n, seed=n)
        with torch.no_grad():
            _assert_close(model, inputs, optimized(**inputs), reference(**inputs))
    assert len(optimized.graphs) == 1, "a new length must not need a new capture"


def test_new_input_structure_is_captured_again(models):
    model = _model(models, "tiny-llama", "sdpa")
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=6))
    ids = torch.randint(0, 256, (1, 19))  # batch 1 and no attention_mask: a new signature
    with pytest.warns(UserWarning, match="capturing and rewriting again"):
        out = optimized(ids)
    reference = _reference_model(model, 6, 0)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(ids).logits, atol=ATOL, rtol=RTOL)
    assert len(optimized.graphs) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized(torch.randint(0, 256, (1, 40)))  # same signature again: no new capture


def _quadratic_nodes(graph_module) -> list[str]:
    """Nodes whose value ends in two equal symbolic sizes: an [N, N] tensor."""
    out = []
    for node in graph_module.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            n, m = v.shape[-2], v.shape[-1]
            if isinstance(n, torch.SymInt) and str(n) == str(m):
                out.append(f"{node.name} {tuple(v.shape)}")
    return out


@pytest.mark.parametrize("name,impl", TEXT_CASES)
def test_no_n_by_n_mask_survives_when_every_site_is_rewritten(models, name, impl):
    # The [B, 1, N, N] mask transformers builds from attention_mask is dead once every
    # site reads its key padding from attention_mask itself.
    model = _model(models, name, impl)
    fast = attnopt.optimize(model, attnopt.SlidingWindow(4), measure=False)
    if len(fast.report.applied) != len(fast.report.sites):
        pytest.skip(f"{name}: some sites keep dense attention (and its mask)")
    graphs = fast.graphs.values() if isinstance(fast.graphs, dict) else fast.graphs
    for gm in graphs:
        assert not _quadratic_nodes(gm), _quadratic_nodes(gm)
    # ... and the result still honours padding: checked against the masked reference.
    inputs = _inputs(model, 24, seed=7)
    ref = _reference_model(model, 4, 0)
    with torch.no_grad():
        _assert_close(model, inputs, fast(**inputs), ref(**inputs))
