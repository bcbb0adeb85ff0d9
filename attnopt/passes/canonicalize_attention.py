"""Canonicalise the spellings of attention into one form before matching.

After this pass every score and value product is ``aten.matmul`` and every softmax
is ``aten.softmax.int``:

* two-operand ``einsum`` contractions (one contracted index, at most one free index
  per operand) become ``permute → matmul → permute``;
* ``bmm`` becomes ``matmul`` (the same math for 3-D operands);
* ``baddbmm(bias, a, b, beta, alpha)`` becomes ``alpha·(a @ b) + beta·bias``;
* ``_softmax`` / ``_safe_softmax`` become ``softmax``;
* a scalar ``mul``/``div`` of an operand of a score product (pre-scaled ``q`` or
  ``k``, possibly followed by transposes and reshapes) moves after the product, so
  the scale sits in the score chain where the matcher reads it.

A new spelling of attention is a new rule here, not a new pattern in the matcher.
The pass only rewrites into mathematically equal forms and is idempotent.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from attnopt.passes._graph import (
    ADD_OPS,
    CAST_OPS,
    DIV_OPS,
    FILL_OPS,
    MATMUL_OPS,
    MUL_OPS,
    SOFTMAX_OPS,
    SUB_OPS,
    WHERE_OPS,
    fake_run,
    is_call,
    is_scalar_operand,
    real_users,
    val,
)

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


# Ops a pre-scale may pass through on its way to the score product: scaling commutes
# with them, and they keep the shape and dtype of a scalar-scaled tensor.
_SHAPE_OPS = {
    aten.permute.default,
    aten.transpose.int,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.clone.default,
    aten.contiguous.default,
}
_SCORE_CHAIN_OPS = CAST_OPS | MUL_OPS | DIV_OPS | ADD_OPS | SUB_OPS | FILL_OPS | WHERE_OPS


def _feeds_softmax(node: fx.Node) -> bool:
    """Is ``node`` a score product: does a single-user score chain lead to a softmax?"""
    for _ in range(64):
        users = real_users(node)
        if len(users) != 1:
            return False
        node = users[0]
        if is_call(node, SOFTMAX_OPS):
            return True
        if not is_call(node, _SCORE_CHAIN_OPS):
            return False
    return False


def _pre_scale(operand: object):
    """``(consumer, scaled, t, s)`` when ``operand`` is ``scaled = t * s`` (or ``t / s``)
    for a scalar ``s``, seen through single-user shape ops; ``consumer`` is the shape
    op using ``scaled``, or None when the product uses it directly."""
    consumer = None
    node = operand
    while is_call(node, _SHAPE_OPS) and len(node.users) == 1:
        consumer, node = node, node.args[0]
    if not (is_call(node, MUL_OPS | DIV_OPS) and len(node.users) == 1):
        return None
    a, b = node.args[0], node.args[1]
    if is_call(node, MUL_OPS) and is_scalar_operand(a) and not is_scalar_operand(b):
        a, b = b, a  # s * t
    if is_call(node, DIV_OPS) and node.kwargs.get("rounding_mode") is not None:
        return None
    if not isinstance(a, fx.Node) or not is_scalar_operand(b):
        return None
    before, after = val(a), val(node)
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    if before.dtype != after.dtype or before.shape != after.shape:
        return None  # the scalar promotes or broadcasts: not a pure rescaling
    if after.dtype == torch.float16:
        # In fp16 a pre-scale may be what keeps q·kᵀ finite; moving it after the product
        # could overflow a site that is later left unrewritten.
        return None
    return consumer, node, a, b


def _sink_pre_scales(graph: fx.Graph, node: fx.Node) -> int:
    """Move scalar pre-scales of a score product's operands after the product."""
    if not _feeds_softmax(node):
        return 0
    moved = 0
    for operand in node.args[:2]:
        found = _pre_scale(operand)
        if found is None:
            continue
        consumer, scaled, source, factor = found
        (consumer or node).replace_input_with(scaled, source)
        with graph.inserting_after(node):
            out = _new(graph, scaled.target, (node, factor), like=scaled)
        node.replace_all_uses_with(out, delete_user_cb=lambda u, out=out: u is not out)
        graph.erase_node(scaled)
        moved += 1
    return moved


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
    # After the lowerings above, so products spelled as einsum/bmm/baddbmm are matmuls.
    for node in list(gm.graph.nodes):
        if is_call(node, MATMUL_OPS) and (moved := _sink_pre_scales(gm.graph, node)):
            counts["pre_scale"] = counts.get("pre_scale", 0) + moved
    if counts:
        gm.graph.lint()
        gm.recompile()
    return CanonicalizeResult(modified=bool(counts), rewritten=counts)
