"""Pass invariants: linted graphs, meta['val'] on new nodes, idempotence, autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import attnopt
from attnopt.capture import capture
from attnopt.config import AttentionConfig
from attnopt.kernels import OpCall, ParamRef, Variant, register_variant
from attnopt.passes.canonicalize_attention import canonicalize_attention
from attnopt.passes.find_attention import find_attention_sites
from attnopt.zoo import tiny_model
from tests.test_api import Stack


def test_canonicalize_is_idempotent_and_keeps_meta():
    captured = capture(tiny_model("tiny-t5", attn_implementation="eager"))
    gm = captured.module
    first = canonicalize_attention(gm)
    second = canonicalize_attention(gm)
    assert not second.modified and second.rewritten == {}
    gm.graph.lint()
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is not torch.ops.aten._assert_tensor_metadata.default
        ):
            assert "val" in node.meta, node.format_node()
    assert first.modified is bool(first.rewritten)


def test_rewritten_graph_has_no_sites_left_and_meta_on_new_nodes():
    model = tiny_model("tiny-gpt2", attn_implementation="eager")
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=4))
    gm = optimized.graph_module
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "call_function" and "attnopt" in str(node.target):
            assert isinstance(node.meta.get("val"), torch.Tensor)
    # Running discovery again finds nothing: a second rewrite would change nothing.
    canonicalize_attention(gm)
    captured = capture(model)
    assert find_attention_sites(gm, captured.args, captured.kwargs) == []


def test_gradients_through_dense_rewrite_match_the_original():
    model = tiny_model("tiny-llama", attn_implementation="eager")
    optimized = attnopt.optimize(model, attnopt.Dense())
    ids = torch.randint(0, 256, (2, 14))
    mask = torch.ones_like(ids)

    def grads(fn):
        model.zero_grad()
        fn(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, actual = grads(model), grads(optimized)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def _gained_dense(q, k, v, kv_mask, bias, scale, gain):
    """Test-only variant op (a plain function works as a call target): dense * gain."""
    return torch.ops.attnopt.dense_attention(q, k, v, kv_mask, bias, scale, True) * gain


@dataclasses.dataclass(frozen=True)
class GainedDense(AttentionConfig):
    variant = "test_gained_dense"


register_variant(
    Variant(
        GainedDense,
        supports=lambda c, s: None if s.mask is attnopt.MaskKind.CAUSAL else "causal only",
        build=lambda c, s: OpCall(_gained_dense, (s.scale, ParamRef("gain"))),
        parameters=lambda c, s: nn.ParameterDict({"gain": nn.Parameter(torch.ones(()))}),
    )
)


def test_variant_parameters_live_on_the_optimized_module():
    """Per-site trainable tensors are owned by the optimized model, used, and trained."""
    model = Stack().eval()
    x = torch.randn(2, 12, 32)
    optimized = attnopt.optimize(model, GainedDense(), (x,))
    names = [n for n, _ in optimized.named_parameters() if n.startswith("attnopt_params")]
    assert names == [f"attnopt_params.blocks__{i}.gain" for i in range(3)]
    assert "attnopt_params.blocks__0.gain" in optimized.state_dict()
    torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)

    optimized.attnopt_params["blocks__1"]["gain"].data.fill_(0.0)  # block 1: attention off
    with torch.no_grad():
        h = x + model.blocks[0](x)
        h = h + model.blocks[1].out.bias  # the output projection of a zero attention
        expected = h + model.blocks[2](h)
    torch.testing.assert_close(optimized(x), expected, atol=1e-5, rtol=1e-5)
    optimized(x).sum().backward()
    assert optimized.attnopt_params["blocks__2"]["gain"].grad is not None
    # A new input signature is captured again with the same parameter modules.
    with pytest.warns(UserWarning, match="capturing"):
        optimized(torch.randn(1, 9, 32))
    assert len(list(optimized.attnopt_params.parameters())) == 3
