"""The public API: configs, policies, layer selection, reports and error paths."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import attnopt
from attnopt.zoo import tiny_model


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Stack(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(SelfAttention() for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _x(n: int = 20) -> torch.Tensor:
    return torch.randn(2, n, 32)


# -- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": True}, "window"),
        ({"window": 8, "sinks": -1}, "sinks"),
        ({"window": 8, "dilation": 0}, "dilation"),
    ],
    ids=["zero", "negative", "float", "bool", "negative-sinks", "zero-dilation"],
)
def test_sliding_window_config_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        attnopt.SlidingWindow(**kwargs)


@pytest.mark.parametrize(
    "config", [attnopt.Dense(), attnopt.SlidingWindow(64, sinks=4, dilation=2)], ids=str
)
def test_configs_round_trip_through_json(config):
    data = json.loads(config.to_json())
    assert data["variant"] == config.variant and data["version"] == config.version
    assert attnopt.config_from_dict(data) == config


def test_config_from_dict_errors():
    with pytest.raises(ValueError, match="unknown attention variant"):
        attnopt.config_from_dict({"variant": "nope"})
    with pytest.raises(ValueError, match="unknown field"):
        attnopt.config_from_dict({"variant": "sliding_window", "window": 4, "size": 3})
    with pytest.raises(ValueError, match="newer than this attnopt"):
        attnopt.config_from_dict({"variant": "sliding_window", "version": 99, "window": 4})


def test_configs_are_frozen():
    cfg = attnopt.SlidingWindow(8)
    with pytest.raises(AttributeError):
        cfg.window = 4


# -- optimize ----------------------------------------------------------------------------


def test_generic_module_and_report():
    model = Stack().eval()
    x = _x()
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=4), (x,))
    names = [s.name for s in optimized.report.sites]
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(s.site.mask is attnopt.MaskKind.CAUSAL for s in optimized.report.sites)
    text = str(optimized.report)
    assert "blocks.1" in text and "SlidingWindow(window=4)" in text
    assert "3 of 3 attention sites rewritten" in text
    json.loads(optimized.report.to_json())
    # Called like the original, positionally or by keyword, at another length.
    y = _x(37)
    torch.testing.assert_close(optimized(y), optimized(x=y))


def test_policy_and_layers_select_sites():
    model = Stack().eval()
    x = _x()
    policy = {"blocks.0": attnopt.SlidingWindow(4), re.compile(r"blocks\.2$"): attnopt.Dense()}
    report = attnopt.optimize(model, policy, (x,)).report
    assert report["blocks.0"].applied and report["blocks.0"].config == attnopt.SlidingWindow(4)
    assert not report["blocks.1"].applied
    assert report["blocks.1"].reason == "no config for this site in the policy"
    assert report["blocks.2"].config == attnopt.Dense()

    report = attnopt.optimize(model, attnopt.Dense(), (x,), layers="blocks.[12]").report
    assert [s.applied for s in report] == [False, True, True]
    assert report["blocks.0"].reason == "not selected by layers"

    report = attnopt.optimize(
        model, attnopt.Dense(), (x,), layers=lambda site: site.name.endswith("0")
    ).report
    assert [s.applied for s in report] == [True, False, False]
    with pytest.raises(KeyError, match="no site named"):
        report["blocks.9"]


def test_none_in_policy_leaves_site_exact():
    model = Stack().eval()
    x = _x()
    optimized = attnopt.optimize(model, {"blocks.1": attnopt.SlidingWindow(2), "*": None}, (x,))
    assert [s.applied for s in optimized.report] == [False, True, False]


def test_optimize_does_not_mutate_the_model():
    model = Stack().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    attnopt.optimize(model, attnopt.SlidingWindow(4), (_x(),))
    assert model.training and all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_skipped_site_says_why():
    # T5: self-attention carries a position bias, the rest is cross-attention.
    model = tiny_model("tiny-t5")
    report = attnopt.optimize(model, attnopt.SlidingWindow(4)).report
    reasons = {s.site.mask.value if not s.site.cross else "cross": s.reason for s in report}
    assert "bias" in reasons["bias"]
    assert "cross" in reasons["cross"]
    assert report.output_error.max_abs == 0.0


def test_hf_output_structure_is_kept():
    model = tiny_model("tiny-llama")
    optimized = attnopt.optimize(model, attnopt.Dense())
    ids = torch.randint(0, 256, (2, 12))
    out = optimized(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert optimized.config is model.config  # attributes come from the original
    # ... except those that would publish the unconverted model
    with pytest.raises(AttributeError, match=r"push_to_hub.*unconverted.*save_pretrained"):
        getattr(optimized, "push_to_hub")  # noqa: B009
    bert = tiny_model("tiny-bert")
    out = attnopt.optimize(bert, attnopt.Dense())(
        input_ids=ids, attention_mask=torch.ones_like(ids)
    )
    assert type(out).__name__ == "BaseModelOutputWithPastAndCrossAttentions" or hasattr(
        out, "last_hidden_state"
    )


def test_find_attention_reports_sites():
    sites = attnopt.find_attention(tiny_model("tiny-llama"))
    assert [s.name for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    site = sites[0]
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (4, 2, 16)
    assert site.mask is attnopt.MaskKind.CAUSAL_PADDING
    assert site.scale == pytest.approx(16**-0.5)
    assert site.to_dict()["mask"] == "causal+padding"


# -- error paths -------------------------------------------------------------------------


def test_non_hf_model_needs_example_inputs():
    with pytest.raises(attnopt.CaptureError, match="example_inputs is required"):
        attnopt.optimize(Stack(), attnopt.Dense())


def test_example_inputs_as_list_is_rejected():
    with pytest.raises(TypeError, match="tuple"):
        attnopt.optimize(Stack(), attnopt.Dense(), [_x()])


def test_inputs_not_matching_forward():
    with pytest.raises(TypeError, match="do not match"):
        attnopt.optimize(Stack(), attnopt.Dense(), {"y": _x()})


def test_bad_config_types():
    with pytest.raises(TypeError, match="variant config"):
        attnopt.optimize(Stack(), "sliding_window", (_x(),))
    with pytest.raises(TypeError, match="policy value"):
        attnopt.optimize(Stack(), {"*": 256}, (_x(),))
    with pytest.raises(TypeError, match="layers must be"):
        attnopt.optimize(Stack(), attnopt.Dense(), (_x(),), layers=3)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branching on data cannot be captured
            return x * 2
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SelfAttention()
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.attn(x))


def test_capture_failure_names_the_module():
    with pytest.raises(attnopt.CaptureError, match=r"submodule 'gate' \(DataDependent\)"):
        attnopt.optimize(Outer(), attnopt.Dense(), (_x(),))


def test_no_attention_found():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    with pytest.raises(ValueError, match="no attention found"):
        attnopt.optimize(model, attnopt.Dense(), (_x(),))


def test_moving_the_module_rebuilds_its_graphs():
    model = Stack().eval()
    x = _x()
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(4), (x,))
    expected = optimized(x)
    optimized.double()
    assert optimized.graph_module is not None  # rebuilt from the converted example inputs
    out = optimized(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)
    optimized.float()
