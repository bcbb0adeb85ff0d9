"""Small FX helpers shared by the passes: op sets, users, sub-graph evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from attnopt._compat import detect_fake_mode, pytree

aten = torch.ops.aten

# Nodes that only assert metadata: they never keep a value alive for our purposes.
ASSERT_OPS = {aten._assert_tensor_metadata.default}

# Ops that change a tensor's dtype/memory but not its values (for attention purposes).
CAST_OPS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.type_as.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
}
DROPOUT_OPS = {aten.dropout.default, aten.native_dropout.default}
MATMUL_OPS = {aten.matmul.default}
SOFTMAX_OPS = {aten.softmax.int}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
MUL_OPS = {aten.mul.Tensor, aten.mul.Scalar}
DIV_OPS = {aten.div.Tensor, aten.div.Scalar}
ADD_OPS = {aten.add.Tensor, aten.add.Scalar}
SUB_OPS = {aten.sub.Tensor, aten.sub.Scalar}
FILL_OPS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
WHERE_OPS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def is_call(node: Any, targets: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_call(u, ASSERT_OPS)]


def val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded on a node, or the literal."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def static_int(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.expr) if x.node.expr.is_number else None
        except (AttributeError, TypeError):
            return None
    return None


def is_scalar_operand(x: Any) -> bool:
    """A python number, or a node whose tensor has exactly one element."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    v = val(x)
    if isinstance(v, torch.Tensor):
        return all(static_int(s) == 1 for s in v.shape)
    return False


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def depends_on_input(node: fx.Node) -> bool:
    return any(a.op == "placeholder" for a in ancestors([node]))


def remove_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase ``nodes`` once nothing uses them (with assertions hanging off them), then
    dead code. Explicit because DCE keeps ops it deems impure, such as dropout and
    SDPA (which take a seed)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(nodes, key=lambda x: order.get(x, -1), reverse=True):
        for u in list(n.users):
            if is_call(u, ASSERT_OPS):
                graph.erase_node(u)
        if not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    # Tensors whose only users are metadata assertions are dead too (e.g. the [N, M] mask
    # the model built once no site reads it); erase the assertions, then them.
    while True:
        checks = [
            u
            for n in graph.nodes
            if n.op != "placeholder" and n.users and not real_users(n)
            for u in n.users
        ]
        if not checks:
            return
        for u in checks:
            graph.erase_node(u)
        graph.eliminate_dead_code()


def extract(gm: fx.GraphModule, outputs: list[fx.Node]) -> fx.GraphModule:
    """A module computing ``outputs`` from the placeholders they need.

    Its placeholders keep their names; call it with keyword arguments.
    """
    needed = ancestors(outputs)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph)


def input_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Placeholder name → value, for an unlifted exported module called with (args, kwargs)."""
    flat, _ = pytree.tree_flatten((args, kwargs))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(names) != len(flat):
        raise ValueError(f"graph has {len(names)} inputs, got {len(flat)} values")
    return dict(zip(names, flat))


def evaluate(gm: fx.GraphModule, outputs: list[fx.Node], inputs: dict[str, Any]) -> list[Any]:
    """Run just the part of ``gm`` that computes ``outputs``."""
    sub = extract(gm, outputs)
    names = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        return list(sub(**{k: inputs[k] for k in names}))


def fake_run(fn, *args: Any) -> Any:
    """Run ``fn`` on the fake values of node arguments, for ``meta['val']`` of new nodes."""
    vals = pytree.tree_map(lambda a: val(a) if isinstance(a, fx.Node) else a, args)
    mode = detect_fake_mode(pytree.tree_leaves(vals))
    if mode is None:
        return fn(*vals)
    with mode:
        return fn(*vals)


def fake_tensor(tensor: torch.Tensor, like: fx.Node) -> Any:
    """``tensor`` as a fake tensor of the mode that owns ``like``'s value."""
    mode = detect_fake_mode([val(like)])
    return mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor


def module_path(node: fx.Node) -> tuple[str, str]:
    """(path, qualified type name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    if isinstance(typ, type):
        typ = f"{typ.__module__}.{typ.__qualname__}"
    return path, str(typ)
