"""Canonicalise the spellings of attention into one form before matching.

After this pass every score and value product is ``aten.matmul`` and every softmax
is ``aten.softmax.int``:

* two-operand ``einsum`` contractions (one contracted index, at most one free index
  per operand) become ``permute → matmul → permute``;
* ``bmm`` becomes ``matmul`` (the same math for 3-D operands);
* ``baddbmm(bias, a, b, beta, alpha)`` becomes ``alpha·(a @ b) + beta·bias``;
* ``_softmax`` / ``_safe_softmax`` become ``softmax``.

A new spelling of attention is a new rule here, not a new pattern in the matcher.
The pass only rewrites into mathematically equal forms and is idempotent.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from attnopt.passes._graph import fake_run

aten = torch.ops.aten

__all__ = ["CanonicalizeResult", "canonicalize_attention"]


@dataclasses.dataclass
class CanonicalizeResult:
    modified: bool
    rewritten: dict[str, int]


def _new(graph: fx.Graph, target, args, kwargs=None, like: fx.Node | None = None) -> fx.Node:
    node = graph.call_function(target, tuple(args), kwargs or {})
    node.meta["val"] = fake_run(lambda *a: target(*a, **(kwargs or {})), *args)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def _einsum_plan(equation: str, ranks: list[int]):
    """Permutations that turn a two-operand contraction into matmul, or None."""
    if "..." in equation or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(s) != r for s, r in zip(ins, ranks)):
        return None
    a, b = ins
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or len(free_a) > 1 or len(free_b) > 1:
        return None
    if set(out) != set(batch) | set(free_a) | set(free_b):
        return None
    # Shared letters must be batch or contracted; a letter summed away from one side only
    # (e.g. "ij,jk->k") is not a plain product.
    if any(c not in out and c not in contracted for c in a + b):
        return None
    perm_a = [a.index(c) for c in batch + free_a + contracted]
    perm_b = [b.index(c) for c in batch + contracted + free_b]
    product = batch + free_a + free_b
    perm_out = [product.index(c) for c in out]
    return perm_a, perm_b, (len(free_a), len(free_b)), perm_out


def _lower_einsum(graph: fx.Graph, node: fx.Node) -> bool:
    equation, operands = node.args[0], node.args[1]
    if not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return False
    ranks = [o.meta["val"].dim() for o in operands]
    plan = _einsum_plan(equation, ranks)
    if plan is None:
        return False
    perm_a, perm_b, (na, nb), perm_out = plan
    a, b = operands
    with graph.inserting_before(node):
        if perm_a != list(range(len(perm_a))):
            a = _new(graph, aten.permute.default, (a, perm_a), like=node)
        if perm_b != list(range(len(perm_b))):
            b = _new(graph, aten.permute.default, (b, perm_b), like=node)
        # matmul needs a trailing matrix on both sides: add a unit free dim where missing.
        if na == 0:
            a = _new(graph, aten.unsqueeze.default, (a, -2), like=node)
        if nb == 0:
            b = _new(graph, aten.unsqueeze.default, (b, -1), like=node)
        out = _new(graph, aten.matmul.default, (a, b), like=node)
        if nb == 0:
            out = _new(graph, aten.squeeze.dim, (out, -1), like=node)
        if na == 0:
            out = _new(graph, aten.squeeze.dim, (out, -2), like=node)
        if perm_out != list(range(len(perm_out))):
            out = _new(graph, aten.permute.default, (out, perm_out), like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _lower_baddbmm(graph: fx.Graph, node: fx.Node) -> bool:
    bias, a, b = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    with graph.inserting_before(node):
        out = _new(graph, aten.matmul.default, (a, b), like=node)
        if alpha != 1:
            out = _new(graph, aten.mul.Tensor, (out, alpha), like=node)
        if beta != 0:
            term = bias if beta == 1 else _new(graph, aten.mul.Tensor, (bias, beta), like=node)
            out = _new(graph, aten.add.Tensor, (out, term), like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _lower_softmax(graph: fx.Graph, node: fx.Node) -> bool:
    x, dim = node.args[:2]
    dtype = None
    if node.target is aten._softmax.default and node.args[2]:
        dtype = torch.float32
    elif node.target is aten._safe_softmax.default:
        dtype = node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
    with graph.inserting_before(node):
        out = _new(graph, aten.softmax.int, (x, dim, dtype) if dtype else (x, dim), like=node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _bmm_to_matmul(graph: fx.Graph, node: fx.Node) -> bool:
    node.target = aten.matmul.default
    return True


_RULES = {
    aten.einsum.default: ("einsum", _lower_einsum),
    aten.bmm.default: ("bmm", _bmm_to_matmul),
    aten.baddbmm.default: ("baddbmm", _lower_baddbmm),
    aten._softmax.default: ("_softmax", _lower_softmax),
    aten._safe_softmax.default: ("_safe_softmax", _lower_softmax),
}


def canonicalize_attention(gm: fx.GraphModule) -> CanonicalizeResult:
    """Rewrite ``gm`` in place into the canonical spelling; returns what changed."""
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RULES:
            continue
        name, rule = _RULES[node.target]
        if rule(gm.graph, node):
            counts[name] = counts.get(name, 0) + 1
    if counts:
        gm.graph.lint()
        gm.recompile()
    return CanonicalizeResult(modified=bool(counts), rewritten=counts)
