"""Find attention in a canonicalised graph.

One matcher, two anchors:

* ``aten.scaled_dot_product_attention`` nodes;
* ``softmax`` nodes that sit in ``matmul(A, B) → score chain → softmax → prob chain →
  matmul(P, V)``, where the score chain is elementwise-affine in the scores (scalar
  ``mul``/``div``, ``add``/``sub`` of a bias, ``masked_fill``/``where`` with a fill,
  dtype casts) and the prob chain is casts and dropout. Every intermediate must have
  a single user (a reused intermediate is not attention we may replace), the
  softmax must run over the key axis, and keys must depend on the model's inputs
  (a softmax over learned parameters, such as a router, is not attention).

Because the score chain is affine, ``chain(x) = a·x + chain(0)`` wherever no fill
applies: ``a`` is the site's scale and ``chain(0)`` its additive mask, which the
rewrite reproduces at run time (:func:`replay_bias`) and discovery classifies by
evaluating it on the example inputs and on probes with padding
(:func:`classify_bias`). Causal masks of sliding-window layers, whose query ``i``
sees only keys ``i − W < j <= i``, are recognised as such (:func:`causal_window`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import fx

from attnopt.passes._graph import (
    ADD_OPS,
    CAST_OPS,
    DIV_OPS,
    DROPOUT_OPS,
    FILL_OPS,
    MATMUL_OPS,
    MUL_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    SUB_OPS,
    VIEW_OPS,
    WHERE_OPS,
    depends_on_input,
    evaluate,
    input_values,
    is_call,
    is_scalar_operand,
    module_path,
    real_users,
    static_int,
    val,
)
from attnopt.site import AttentionSite, MaskKind

aten = torch.ops.aten

__all__ = [
    "MASKED_AT_OR_BELOW",
    "SitePlan",
    "causal_window",
    "classify_bias",
    "find_attention_sites",
    "keys_present",
    "replay_bias",
]

# Additive mask values at or below this are "masked out": exp() of them is 0 in any dtype.
MASKED_AT_OR_BELOW = -1.0e4


@dataclasses.dataclass
class SitePlan:
    """Where a site's pieces are in the graph, and how its mask is built."""

    anchor: fx.Node  # node whose value the site produces (sdpa, or the P @ V matmul)
    query: fx.Node  # [..., N, D]
    key: fx.Node  # [..., M, D] when key_transposed is False, else [..., D, M]
    key_transposed: bool
    value: fx.Node  # [..., M, Dv]
    # Score-chain steps, outermost last; operands are ("ref", i) into ``operands``.
    steps: tuple[tuple[Any, ...], ...]
    operands: tuple[fx.Node, ...]
    scale: float  # constant part of the scale
    scale_refs: tuple[int, ...]  # operand indices whose product multiplies the scale
    causal_flag: bool  # SDPA is_causal
    kv_source: tuple[fx.Node, fx.Node] | None = None  # un-repeated (K, V) for grouped queries
    kv_unrepeat: str | None = None  # how to get [B, Hkv, M, D] from kv_source
    internal: tuple[fx.Node, ...] = ()
    dropout: float = 0.0
    mask_keys: int | None = None  # keys of the mask as evaluated on the example (None: no mask)
    # Placeholder whose ``!= 0`` is the site's key padding on the example and every probe
    # (a [B, M] attention mask), and the rank of the padding as the mask gives it.
    padding_input: str | None = None
    padding_rank: int = 0


def _ref(operands: list, node: Any) -> Any:
    if isinstance(node, fx.Node):
        operands.append(node)
        return ("ref", len(operands) - 1)
    return node


def _walk_scores(softmax: fx.Node, operands: list):
    """From the softmax input back to the score matmul; returns (matmul, steps, internal)."""
    steps: list[tuple] = []
    internal: list[fx.Node] = []
    node = softmax.args[0]
    while True:
        if not isinstance(node, fx.Node) or len(real_users(node)) != 1:
            return None
        if is_call(node, MATMUL_OPS):
            internal.append(node)
            return node, tuple(reversed(steps)), internal
        internal.append(node)
        args = node.args
        if is_call(node, CAST_OPS):
            node = args[0]
        elif is_call(node, MUL_OPS) or is_call(node, DIV_OPS):
            a, b = args[0], args[1]
            if is_call(node, MUL_OPS) and not _is_chain(a) and _is_chain(b):
                a, b = b, a
            if not is_scalar_operand(b) or not isinstance(a, fx.Node):
                return None
            kind = "mul" if is_call(node, MUL_OPS) else "div"
            if kind == "div" and (node.kwargs.get("rounding_mode") is not None):
                return None
            steps.append((kind, _ref(operands, b)))
            node = a
        elif is_call(node, ADD_OPS) or is_call(node, SUB_OPS):
            a, b = args[0], args[1]
            alpha = node.kwargs.get("alpha", 1)
            sign = -1 if is_call(node, SUB_OPS) else 1
            if not _is_chain(a):
                if sign < 0:  # t - chain is not affine with a positive scale
                    return None
                a, b = b, a
            steps.append(("add", _ref(operands, b), sign * alpha))
            node = a
        elif is_call(node, FILL_OPS):
            steps.append(("fill", _ref(operands, args[1]), _ref(operands, args[2]), False))
            node = args[0]
        elif is_call(node, WHERE_OPS):
            cond, a, b = args[0], args[1], args[2]
            if (
                isinstance(b, fx.Node)
                and _is_chain(b)
                and not (isinstance(a, fx.Node) and _is_chain(a))
            ):
                steps.append(("fill", _ref(operands, cond), _ref(operands, a), False))
                node = b
            elif isinstance(a, fx.Node) and _is_chain(a):
                steps.append(("fill", _ref(operands, cond), _ref(operands, b), True))
                node = a
            else:
                return None
        else:
            return None


def _is_chain(node: Any) -> bool:
    """Does ``node`` lie on a path up to a matmul through chain ops (not a mask operand)?"""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        if is_call(node, MATMUL_OPS):
            return True
        if is_call(node, CAST_OPS):
            node = node.args[0]
        elif is_call(node, MUL_OPS | DIV_OPS | ADD_OPS | SUB_OPS):
            a, b = node.args[0], node.args[1]
            return _is_chain(a) or (isinstance(b, fx.Node) and _is_chain(b))
        elif is_call(node, FILL_OPS):
            node = node.args[0]
        elif is_call(node, WHERE_OPS):
            return any(isinstance(x, fx.Node) and _is_chain(x) for x in node.args[1:3])
        else:
            return False
        seen += 1
    return False


def _walk_probs(softmax: fx.Node):
    """From the softmax forward to the P @ V matmul; returns (matmul, dropout_p, internal)."""
    internal: list[fx.Node] = [softmax]
    node = softmax
    dropout = 0.0
    while True:
        users = real_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if is_call(user, MATMUL_OPS):
            return (user, dropout, internal) if user.args[0] is node else None
        if is_call(user, CAST_OPS):
            node = user
        elif is_call(user, DROPOUT_OPS):
            # Effective probability: dropout(p, train=False) does nothing.
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            dropout = float(user.args[1]) if train and len(user.args) > 1 else 0.0
            if user.target is aten.native_dropout.default:
                outs = [u for u in real_users(user) if u.args[1] == 0]
                if len(outs) != 1 or len(real_users(user)) != 1:
                    return None
                internal.append(user)
                user = outs[0]
            node = user
        else:
            return None
        internal.append(node)


def _unrepeated_kv(node: fx.Node):
    """If ``node`` repeats K/V heads (repeat_kv or repeat_interleave), return (source, how)."""
    if is_call(node, VIEW_OPS):
        src = node.args[0]
        if is_call(src, {aten.expand.default}):
            before, after = val(src.args[0]), val(src)
            if (
                before is not None
                and after.dim() == 5
                and static_int(before.shape[2]) == 1
                and static_int(after.shape[2]) not in (None, 1)
                and val(node).dim() == 4
            ):
                return src.args[0], "squeeze2"
    if is_call(node, {aten.repeat_interleave.self_int}):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if dim in (1, -3) and val(node).dim() == 4:
            return node.args[0], "identity"
    return None


def _plan_softmax(node: fx.Node) -> SitePlan | None:
    x = val(node.args[0])
    if x is None or x.dim() < 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None or dim % x.dim() != x.dim() - 1:
        return None  # softmax over a non-key axis
    operands: list[fx.Node] = []
    found = _walk_scores(node, operands)
    if found is None:
        return None
    scores_mm, steps, internal_scores = found
    forward = _walk_probs(node)
    if forward is None:
        return None
    pv, dropout, internal_probs = forward
    query, key_t = scores_mm.args[0], scores_mm.args[1]
    value = pv.args[1]
    if not all(isinstance(t, fx.Node) for t in (query, key_t, value)):
        return None
    q, kt, v = val(query), val(key_t), val(value)
    if q is None or kt is None or v is None or min(q.dim(), kt.dim(), v.dim()) < 2:
        return None
    if not (depends_on_input(key_t) and depends_on_input(value)):
        return None  # keys/values are parameters: a router or a learned mixture
    key, key_transposed = key_t, True
    if is_call(key_t, {aten.transpose.int}):
        d0, d1 = (d % kt.dim() for d in key_t.args[1:3])
        if {d0, d1} == {kt.dim() - 1, kt.dim() - 2}:
            key, key_transposed = key_t.args[0], False
    elif is_call(key_t, {aten.permute.default}):
        perm = list(key_t.args[1])
        n = len(perm)
        if perm[:-2] == list(range(n - 2)) and perm[-2:] == [n - 1, n - 2]:
            key, key_transposed = key_t.args[0], False
    plan = SitePlan(
        anchor=pv,
        query=query,
        key=key,
        key_transposed=key_transposed,
        value=value,
        steps=steps,
        operands=tuple(operands),
        scale=1.0,
        scale_refs=(),
        causal_flag=False,
        internal=tuple(internal_scores + internal_probs + [pv]),
        dropout=dropout,
    )
    return _fold_scale(plan)


def _plan_sdpa(node: fx.Node) -> SitePlan | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    scale = bound.get("scale")
    head_dim = static_int(val(query).shape[-1])
    if scale is None:
        if head_dim is None:
            return None
        scale = 1.0 / math.sqrt(head_dim)
    operands: list[fx.Node] = []
    steps: tuple = ()
    if mask is not None:
        ref = _ref(operands, mask)
        if val(mask).dtype == torch.bool:
            steps = (("fill", ref, float("-inf"), True),)
        else:
            steps = (("add", ref, 1),)
    plan = SitePlan(
        anchor=node,
        query=query,
        key=key,
        key_transposed=False,
        value=value,
        steps=steps,
        operands=tuple(operands),
        scale=float(scale),
        scale_refs=(),
        causal_flag=bool(bound.get("is_causal", False)),
        internal=(node,),
        dropout=float(bound.get("dropout_p", 0.0) or 0.0),
    )
    if bound.get("enable_gqa"):
        plan.kv_source, plan.kv_unrepeat = (key, value), "identity"
    return plan


def _fold_scale(plan: SitePlan) -> SitePlan:
    """Split the product of scalar mul/div steps into a constant and run-time factors."""
    scale = 1.0
    refs: list[int] = []
    for step in plan.steps:
        if step[0] in ("mul", "div"):
            x = step[1]
            if isinstance(x, tuple):
                const = _constant(plan.operands[x[1]])
                if const is None:
                    if step[0] == "div":
                        return None  # a run-time divisor: keep it simple and leave the site
                    refs.append(x[1])
                    continue
                x = const
            scale = scale * x if step[0] == "mul" else scale / x
    plan.scale, plan.scale_refs = float(scale), tuple(refs)
    return plan


def _constant(node: fx.Node) -> float | None:
    """Value of a scalar node that depends on no input or parameter, else None."""
    from attnopt.passes._graph import ancestors

    anc = ancestors([node])
    if any(a.op in ("placeholder", "get_attr") for a in anc):
        return None
    gm = node.graph.owning_module
    try:
        (value,) = evaluate(gm, [node], {})
    except Exception:  # any failure means "not a constant we can fold"
        return None
    return float(value.reshape(()).item()) if isinstance(value, torch.Tensor) else float(value)


def _resolve_kv(plan: SitePlan) -> None:
    if plan.kv_source is not None:
        return
    key = plan.key if not plan.key_transposed else None
    if key is None:
        return
    k_src = _unrepeated_kv(key)
    v_src = _unrepeated_kv(plan.value)
    if k_src and v_src and k_src[1] == v_src[1]:
        plan.kv_source, plan.kv_unrepeat = (k_src[0], v_src[0]), k_src[1]


# -- mask replay and classification --------------------------------------------------------


def _operand(x: Any, operands: tuple, device) -> Any:
    t = operands[x[1]] if isinstance(x, tuple) and len(x) == 2 and x[0] == "ref" else x
    if isinstance(t, torch.Tensor):
        return t if t.dtype == torch.bool else t.to(torch.float32)
    return t


def replay_bias(steps, operands, device=None) -> torch.Tensor:
    """``chain(0)``: the additive mask a site's score chain applies, in float32.

    ``-inf``/very negative entries are masked keys. Its shape is the broadcast of the
    mask operands (e.g. ``[B, 1, N, M]``), or ``[]`` when there is no mask.
    """
    if device is None:
        device = next((o.device for o in operands if isinstance(o, torch.Tensor)), "cpu")
    acc = torch.zeros((), dtype=torch.float32, device=device)
    for step in steps:
        kind = step[0]
        if kind == "mul":
            acc = acc * _operand(step[1], operands, device)
        elif kind == "div":
            acc = acc / _operand(step[1], operands, device)
        elif kind == "add":
            acc = acc + _operand(step[1], operands, device) * step[2]
        elif kind == "fill":
            cond = _operand(step[1], operands, device)
            cond = cond.bool() if isinstance(cond, torch.Tensor) else bool(cond)
            if step[3]:
                cond = ~cond
            fill = _operand(step[2], operands, device)
            fill = torch.as_tensor(fill, dtype=torch.float32, device=device)
            acc = torch.where(cond, fill, acc)
        else:  # pragma: no cover - steps are produced by this module only
            raise ValueError(f"unknown mask step {kind!r}")
    return acc


def last_row_keep(steps, operands) -> torch.Tensor:
    """Keys visible to the last query, ``[..., M]`` bool, computed in O(M) per batch."""
    return (replay_bias(steps, _query_row(operands, -1)) > MASKED_AT_OR_BELOW).squeeze(-2)


def _query_row(operands: tuple, i: int) -> tuple:
    """The mask operands restricted to query row ``i`` (operands broadcast over rows
    are left whole)."""
    return tuple(
        o[..., i:, :][..., :1, :]
        if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-2] != 1
        else o
        for o in operands
    )


def classify_bias(bias: torch.Tensor, causal_flag: bool) -> MaskKind:
    """Classify an evaluated additive mask (``[..., n, M]``, n = N or 1)."""
    if bias.dim() < 2:
        bias = bias.reshape((1,) * (2 - bias.dim()) + tuple(bias.shape))
    keep = bias > MASKED_AT_OR_BELOW
    finite = torch.where(keep, bias, torch.zeros((), dtype=bias.dtype))
    if bool((finite.abs() > 1e-6).any()):
        return MaskKind.BIAS
    n, m = keep.shape[-2], keep.shape[-1]
    last = keep[..., -1:, :]
    padded = not bool(last.all())
    if n == 1:
        kind = MaskKind.PADDING if padded else MaskKind.NONE
        if causal_flag:
            kind = MaskKind.CAUSAL_PADDING if padded else MaskKind.CAUSAL
        return kind
    if bool(keep.all()):
        return MaskKind.CAUSAL if causal_flag else MaskKind.NONE
    tri = torch.ones(n, m, dtype=torch.bool, device=keep.device).tril(m - n)
    if causal_flag:
        keep = keep & tri
    for expected, kind in (
        (tri & last, MaskKind.CAUSAL_PADDING if padded else MaskKind.CAUSAL),
        (last.expand_as(keep), None if causal_flag else MaskKind.PADDING),
    ):
        if kind is None:
            continue
        expected = expected.expand_as(keep) if expected.shape != keep.shape else expected
        # Rows where the structured mask shows nothing are don't-care: their outputs are
        # meaningless (fully padded queries) and models fill them arbitrarily.
        rows = expected.any(-1, keepdim=True)
        if bool(((keep == expected) | ~rows).all()):
            return kind
    return MaskKind.OTHER


def keys_present(steps, operands, n: int, m: int) -> torch.Tensor:
    """Keys that are not padding, ``[..., M]`` bool, in O(N + M) per batch: key ``j``
    is present when query row ``j − (M − N)``, the query at its position, sees it (a
    causal query sees its own key, even in a sliding window); keys before the first
    query's position as the first query row sees them. For masks where the last row
    does not see every present key (sliding windows)."""
    off = m - n

    def diagonal(o: Any) -> Any:
        if not isinstance(o, torch.Tensor) or o.dim() == 0:
            return o
        o = o.reshape((1,) * max(0, 2 - o.dim()) + tuple(o.shape))
        full = o.expand(*o.shape[:-2], n, m)  # a view: no [N, M] tensor is made
        return full.diagonal(offset=off, dim1=-2, dim2=-1).unsqueeze(-2)  # [..., 1, N]

    keep = _rows(replay_bias(steps, tuple(diagonal(o) for o in operands)) > MASKED_AT_OR_BELOW)
    keep = keep.expand(*keep.shape[:-1], n)  # [..., 1, N]
    if off > 0:
        before = _rows(replay_bias(steps, _query_row(operands, 0)) > MASKED_AT_OR_BELOW)
        lead = torch.broadcast_shapes(keep.shape[:-1], before.shape[:-1])
        before = before.expand(*before.shape[:-1], m)[..., :off]
        keep = torch.cat([before.expand(*lead, off), keep.expand(*lead, n)], dim=-1)
    return keep.squeeze(-2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with at least two dims (leading ones added)."""
    return x.reshape((1,) * max(0, 2 - x.dim()) + tuple(x.shape))


def causal_window(bias: torch.Tensor) -> int | None:
    """The window ``W`` of an evaluated additive mask that is causal attention limited
    to a sliding window, query ``i`` seeing keys ``i − W < j <= i`` (minus padding),
    or None when it is not one (or the window covers every key). Rows of padded
    queries, and rows that see nothing, are don't-care."""
    found = _window_and_padding(bias)
    return None if found is None else found[0]


def _window_and_padding(bias: torch.Tensor) -> tuple[int, bool] | None:
    """:func:`causal_window`, and whether any key is padding (``(W, padded)``)."""
    if bias.dim() < 2:
        return None
    keep = bias > MASKED_AT_OR_BELOW
    if bool((torch.where(keep, bias, torch.zeros((), dtype=bias.dtype)).abs() > 1e-6).any()):
        return None
    n, m = keep.shape[-2], keep.shape[-1]
    off = m - n
    if off < 0:
        return None
    q_pos = torch.arange(n, device=keep.device)[:, None] + off
    k_pos = torch.arange(m, device=keep.device)[None, :]
    present = keep.diagonal(offset=off, dim1=-2, dim2=-1)  # [..., N]: each query its own key
    seen = keep.any(-1)
    if not bool(seen.any()):
        return None
    first = torch.where(keep, k_pos, m).amin(-1)  # [..., N] first visible key per row
    span = torch.where(seen & present, q_pos[:, 0] - first + 1, 0)
    window = int(span.max())
    if window >= m or window < 1:
        return None
    # As keys_present reads a mask lazily: keys before the first query as row 0 sees them.
    key_present = torch.cat([keep[..., 0, :off], present], dim=-1)
    expected = (k_pos <= q_pos) & (k_pos > q_pos - window) & key_present.unsqueeze(-2)
    care = present.unsqueeze(-1) & expected.any(-1, keepdim=True)
    if bool(((keep == expected) | ~care).all()):
        return window, not bool(present.all())
    return None


def _classify(bias: torch.Tensor, causal_flag: bool) -> tuple[MaskKind, int | None]:
    """:func:`classify_bias`, and for masks it calls 'other', a causal sliding window:
    ``(causal or causal+padding, W)``."""
    kind = classify_bias(bias, causal_flag)
    if kind is not MaskKind.OTHER:
        return kind, None
    found = _window_and_padding(bias)
    if found is None:
        return kind, None
    window, padded = found
    return (MaskKind.CAUSAL_PADDING if padded else MaskKind.CAUSAL), window


def _combine(kinds: list[tuple[MaskKind, int | None]]) -> tuple[MaskKind, int | None]:
    windows = {w for _, w in kinds}
    if len(windows) > 1:
        return MaskKind.OTHER, None
    window = windows.pop()
    kinds = [k for k, _ in kinds]
    if MaskKind.BIAS in kinds:
        return MaskKind.BIAS, None
    if MaskKind.OTHER in kinds:
        return MaskKind.OTHER, None
    causal = {k.causal for k in kinds}
    if len(causal) > 1:
        return MaskKind.OTHER, None
    padded = any(k.padding for k in kinds)
    if causal.pop():
        return (MaskKind.CAUSAL_PADDING if padded else MaskKind.CAUSAL), window
    return (MaskKind.PADDING if padded else MaskKind.NONE), None


def _looks_like_mask(value: Any) -> bool:
    """A ``[B, M]`` tensor of 0s and 1s (``M >= 2``): an attention mask, as far as can be told."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] < 2:
        return False
    return value.numel() > 0 and bool(((value == 0) | (value == 1)).all())


def _probes(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of the inputs with padding put into anything that looks like an attention mask."""
    probes = []
    for name, value in inputs.items():
        if not _looks_like_mask(value):
            continue
        b, m = value.shape
        pad = max(1, m // 4)
        probed = value.clone()
        probed[0, :pad] = 0  # left padding
        if b > 1:
            probed[1, m - pad :] = 0  # right padding
        probes.append({**inputs, name: probed})
    return probes


def _padding(plan: SitePlan, operands: tuple, bias: torch.Tensor, window: int | None):
    """The key padding a structured mask gives, ``[..., M]`` bool (as the rewrite reads it)."""
    if window is not None:
        return keys_present(plan.steps, operands, bias.shape[-2], bias.shape[-1])
    return last_row_keep(plan.steps, operands)


def _padding_sources(keep: torch.Tensor, inputs: dict[str, Any], names: set[str]) -> set[str]:
    """Which of the inputs ``names`` (``[B, M]`` masks) equal ``keep`` (``[B, 1, M]`` or
    ``[B, M]``) as ``!= 0``."""
    if keep.dim() not in (2, 3) or (keep.dim() == 3 and keep.shape[1] != 1):
        return set()
    flat = keep.reshape(keep.shape[0], keep.shape[-1])
    return {
        name
        for name in names
        if flat.shape == inputs[name].shape and bool((flat == (inputs[name] != 0)).all())
    }


def _mask_kinds(
    gm: fx.GraphModule, plans: list[SitePlan], args, kwargs
) -> list[tuple[MaskKind, int | None]]:
    wanted = sorted({o for p in plans for o in p.operands}, key=_order(gm))
    if not wanted:
        return [(MaskKind.CAUSAL if p.causal_flag else MaskKind.NONE, None) for p in plans]
    base = input_values(gm, args, kwargs)
    runs = [base, *_probes(base)]
    masks = {name for name, value in base.items() if _looks_like_mask(value)}
    sources: list[set[str]] = [set(masks) for _ in plans]
    ranks: list[int] = [0 for _ in plans]
    kinds: list[list[tuple[MaskKind, int | None]]] = [[] for _ in plans]
    for inputs in runs:
        values = dict(zip(wanted, evaluate(gm, wanted, inputs)))
        for i, p in enumerate(plans):
            operands = tuple(values[o] for o in p.operands)
            bias = replay_bias(p.steps, operands)
            kind, window = _classify(bias, p.causal_flag)
            kinds[i].append((kind, window))
            if bias.dim() >= 1:
                p.mask_keys = max(p.mask_keys or 0, int(bias.shape[-1]))
            if sources[i] and kind.structured and bias.dim() >= 2:
                keep = _padding(p, operands, bias, window)
                ranks[i] = keep.dim()
                sources[i] &= _padding_sources(keep, inputs, sources[i])
            else:
                sources[i] = set()
    for p, found, rank in zip(plans, sources, ranks):
        p.padding_input = min(found) if found else None
        p.padding_rank = rank
    return [_combine(k) for k in kinds]


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


# -- sites ---------------------------------------------------------------------------------


def _site(
    plan: SitePlan, spelling: str, node: fx.Node, mask: tuple[MaskKind, int | None]
) -> AttentionSite:
    mask, window = mask
    q, v = val(plan.query), val(plan.value)
    k = val(plan.key)
    n_q = q.shape[-2]
    n_k = k.shape[-1] if plan.key_transposed else k.shape[-2]
    cross = str(n_q) != str(n_k)
    heads = kv_heads = None
    batch_rank = max(q.dim(), k.dim(), v.dim()) - 2
    if batch_rank >= 1:
        heads = static_int(q.shape[-3]) if q.dim() >= 3 else None
        src = val(plan.kv_source[0]) if plan.kv_source else k
        if plan.kv_unrepeat == "squeeze2":
            kv_heads = static_int(src.shape[1])
        elif src.dim() >= 3:
            kv_heads = static_int(src.shape[-3])
    if batch_rank == 1:  # heads flattened into the batch: recover them from the reshape
        heads = _unflattened_heads(plan.query)
        kv_heads = _unflattened_heads(plan.key) or heads
    path, typ = module_path(node)
    return AttentionSite(
        name=path,
        module_type=typ,
        spelling=spelling,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=static_int(q.shape[-1]) or -1,
        value_dim=static_int(v.shape[-1]) or -1,
        scale=None if plan.scale_refs else plan.scale,
        mask=mask,
        window=window,
        cross=cross,
        dropout=plan.dropout,
        plan=plan,
    )


def _unflattened_heads(node: fx.Node) -> int | None:
    for _ in range(4):
        if is_call(node, VIEW_OPS):
            src = val(node.args[0])
            if src is not None and src.dim() == 4:
                return static_int(src.shape[1])
            return None
        if is_call(node, {aten.transpose.int, aten.permute.default, aten.contiguous.default}):
            node = node.args[0]
            continue
        return None
    return None


def find_attention_sites(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[AttentionSite]:
    """All attention sites of a canonicalised graph, with masks classified on the inputs."""
    found: list[tuple[SitePlan, str, fx.Node]] = []
    for node in gm.graph.nodes:
        if is_call(node, SDPA_OPS):
            plan = _plan_sdpa(node)
            spelling = "sdpa"
        elif is_call(node, SOFTMAX_OPS):
            plan = _plan_softmax(node)
            spelling = "softmax"
        else:
            continue
        if plan is None:
            continue
        _resolve_kv(plan)
        found.append((plan, spelling, node))
    kinds = _mask_kinds(gm, [f[0] for f in found], args, kwargs)
    sites = [_site(p, s, n, k) for (p, s, n), k in zip(found, kinds)]
    # Unique names: "#k" when one module holds several attentions.
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.name] = counts.get(s.name, 0) + 1
    seen: dict[str, int] = {}
    for s in sites:
        if counts[s.name] > 1:
            i = seen.get(s.name, 0)
            seen[s.name] = i + 1
            s.name = f"{s.name or '<root>'}#{i}"
        elif not s.name:
            s.name = "<root>"
    return sites
