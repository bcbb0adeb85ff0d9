"""Pass invariants: linted graphs, meta['val'] on new nodes, idempotence, autograd."""

from __future__ import annotations

import torch

import attnopt
from attnopt.capture import capture
from attnopt.passes.canonicalize_attention import canonicalize_attention
from attnopt.passes.find_attention import find_attention_sites
from attnopt.zoo import tiny_model


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
