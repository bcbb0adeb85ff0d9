"""Replace attention sites with ``attnopt`` ops.

Each applied site becomes: one node that brings q/k/v into the op layout
(:func:`prepare_qkv`), one node that builds the mask the variant takes
(:func:`site_kv_mask` for structured masks, :func:`site_bias` otherwise), the
variant's op node, and one node restoring the site's original layout and dtype
(:func:`restore_layout`). The original nodes become dead and are removed.

A site whose mask the variant cannot honour is left as it was, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx

from attnopt.config import AttentionConfig
from attnopt.kernels import ParamRef, get_variant
from attnopt.passes._graph import fake_run, fake_tensor, remove_dead, val
from attnopt.passes.find_attention import SitePlan, keys_present, last_row_keep, replay_bias
from attnopt.site import AttentionSite

__all__ = [
    "SiteResult",
    "prepare_qkv",
    "restore_layout",
    "rewrite_attention",
    "site_bias",
    "site_kv_mask",
    "site_kv_mask_from_input",
    "site_module_key",
]


@dataclasses.dataclass
class SiteResult:
    """What the rewrite did to one site."""

    site: AttentionSite
    config: AttentionConfig | None
    applied: bool
    reason: str = ""

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def variant(self) -> str:
        return self.config.describe() if self.config is not None else "-"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "variant": self.config.to_dict() if self.config is not None else None,
            "applied": self.applied,
            "reason": self.reason,
            "site": self.site.to_dict(),
        }


# -- run-time helpers (call targets of the nodes the rewrite inserts) -------------------


def _batch_shape(query, key, value, kv_unrepeat):
    if kv_unrepeat is not None:
        return tuple(query.shape[:-2])
    return tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))


def _to_op_batch(t: torch.Tensor, batch: tuple, *, full: bool, keep_heads: bool = False):
    """Give ``t`` (batch dims broadcastable to ``batch``, then two trailing dims) the
    op's two batch dims ``[B, H]``; ``full`` expands them, ``keep_heads`` leaves a
    broadcast head dim of 1 alone (multi-query keys)."""
    tail = tuple(t.shape[t.dim() - 2 :])
    lead = t.dim() - 2
    for _ in range(len(batch) - lead):
        t = t.unsqueeze(0)
    if len(batch) <= 2:
        target = (1,) * (2 - len(batch)) + tuple(batch)
        t = t.reshape((1,) * (2 - len(batch)) + tuple(t.shape))
        if not full:
            return t
        heads = t.shape[1] if keep_heads and t.shape[1] == 1 else target[1]
        return t.expand(target[0], heads, *tail)
    flat = (math.prod(batch[:-1]), batch[-1])
    return t.expand(*batch, *tail).reshape(*flat, *tail)


def prepare_qkv(query, key, value, scale_factors, key_transposed, kv_unrepeat):
    """q, k, v in the op layout ``[B, H, N, D]``, ``[B, Hkv, M, D]``, ``[B, Hkv, M, Dv]``."""
    if key_transposed:
        key = key.transpose(-2, -1)
    for factor in scale_factors:
        query = query * factor.to(query.dtype).reshape(())
    batch = _batch_shape(query, key, value, kv_unrepeat)
    q = _to_op_batch(query, batch, full=True)
    if kv_unrepeat == "squeeze2":
        return q, key.squeeze(2), value.squeeze(2)
    if kv_unrepeat == "identity":
        return q, key, value
    multi_query = (
        key.dim() >= 3 and key.shape[-3] == 1 and value.dim() >= 3 and value.shape[-3] == 1
    )
    k = _to_op_batch(key, batch, full=True, keep_heads=multi_query and len(batch) == 2)
    v = _to_op_batch(value, batch, full=True, keep_heads=multi_query and len(batch) == 2)
    return q, k, v


def restore_layout(out, query, key, value, key_transposed, kv_unrepeat, dtype):
    """The op's ``[B, H, N, Dv]`` output back in the site's own shape and dtype."""
    if key_transposed:
        key = key.transpose(-2, -1)
    batch = _batch_shape(query, key, value, kv_unrepeat)
    out = out.reshape(*batch, *out.shape[-2:])
    return out if out.dtype == dtype else out.to(dtype)


def site_bias(steps, query, key, value, key_transposed, kv_unrepeat, *operands):
    """The site's whole additive mask, float32, broadcastable to the op's ``[B, H, N, M]``."""
    if key_transposed:
        key = key.transpose(-2, -1)
    batch = _batch_shape(query, key, value, kv_unrepeat)
    bias = replay_bias(steps, operands, device=query.device)
    while bias.dim() < 2:
        bias = bias.unsqueeze(0)
    return _to_op_batch(bias, batch, full=False)


def site_kv_mask(steps, query, key, value, key_transposed, kv_unrepeat, windowed, *operands):
    """Keys that are not padding, bool ``[B|1, H|1, M]``: those the last query row of
    the mask sees, or, for a sliding-window mask (``windowed``), those the query at
    each key's own position sees (the last row sees only its window)."""
    if windowed:
        m = key.shape[-1] if key_transposed else key.shape[-2]
        keep = keys_present(steps, operands, query.shape[-2], m)
    else:
        keep = last_row_keep(steps, operands)
    return _op_kv_mask(keep, query, key, value, key_transposed, kv_unrepeat)


def site_kv_mask_from_input(mask, rank, query, key, value, key_transposed, kv_unrepeat):
    """:func:`site_kv_mask` read straight from the model's ``[B, M]`` attention-mask input
    (``!= 0``), when discovery found the two equal: no ``[N, M]`` mask is built."""
    keep = mask != 0
    if rank == 3:
        keep = keep.unsqueeze(1)
    return _op_kv_mask(keep, query, key, value, key_transposed, kv_unrepeat)


def _op_kv_mask(keep, query, key, value, key_transposed, kv_unrepeat):
    """Key padding ``keep [..., M]`` in the op's batch layout ``[B|1, H|1, M]``."""
    if key_transposed:
        key = key.transpose(-2, -1)
    batch = _batch_shape(query, key, value, kv_unrepeat)
    while keep.dim() < 1:
        keep = keep.unsqueeze(0)
    return _to_op_batch(keep.unsqueeze(-2), batch, full=False).squeeze(-2)


# -- the pass ---------------------------------------------------------------------------------


def _insert(graph: fx.Graph, target, args: tuple, like: fx.Node) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = fake_run(target, *args)
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _placeholder(graph: fx.Graph, name: str | None) -> fx.Node | None:
    if name is None:
        return None
    return next((n for n in graph.nodes if n.op == "placeholder" and n.name == name), None)


def _generic_reason(site: AttentionSite, plan: SitePlan) -> str | None:
    if plan.key_transposed and plan.kv_unrepeat is not None:  # pragma: no cover - by construction
        return "internal: grouped keys must not be transposed"
    if site.head_dim <= 0:
        return "head dimension is not static; cannot choose a kernel"
    return None


def site_module_key(name: str) -> str:
    """Key of a site's parameter module (module names may not contain dots)."""
    return name.replace(".", "__")


def _param_nodes(gm, graph, variant, config, site, extra_args, site_modules, like) -> tuple:
    if not any(isinstance(a, ParamRef) for a in extra_args):
        return tuple(extra_args)
    key = site_module_key(site.name)
    if key not in site_modules:
        site_modules[key] = variant.parameters(config, site)
    module = site_modules[key]
    attr = f"attnopt_site_{key}"
    if not hasattr(gm, attr):
        gm.add_submodule(attr, module)
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    out = []
    for a in extra_args:
        if isinstance(a, ParamRef):
            if a.name not in tensors:
                raise KeyError(f"{type(config).__name__} refers to unknown parameter {a.name!r}")
            node = graph.get_attr(f"{attr}.{a.name}")
            node.meta["val"] = fake_tensor(tensors[a.name], like)
            out.append(node)
        else:
            out.append(a)
    return tuple(out)


def _apply(
    gm: fx.GraphModule,
    site: AttentionSite,
    config: AttentionConfig,
    site_modules: dict,
) -> str | None:
    plan: SitePlan = site.plan
    variant = get_variant(config)
    reason = _generic_reason(site, plan) or variant.supports(config, site)
    if reason:
        return reason
    structured = site.mask.structured
    if not structured and not variant.accepts_bias:
        return f"{type(config).__name__} cannot honour mask kind {site.mask.value!r}"
    windowed = site.window is not None
    if windowed and not variant.accepts_window:
        return (
            f"{config.describe()} cannot honour this layer's own sliding window ({site.window} "
            f"keys per query); site left as it was (SlidingWindow can take it, or leave the "
            f"layer out of the policy)"
        )
    graph = gm.graph
    anchor = plan.anchor
    key, value = plan.kv_source if plan.kv_source else (plan.key, plan.value)
    key_t = plan.key_transposed and plan.kv_source is None
    scale_nodes = tuple(plan.operands[i] for i in plan.scale_refs)
    layout = (key_t, plan.kv_unrepeat)
    with graph.inserting_before(anchor):
        qkv = _insert(graph, prepare_qkv, (plan.query, key, value, scale_nodes, *layout), anchor)
        q, k, v = (_insert(graph, operator.getitem, (qkv, i), anchor) for i in range(3))
        kv_mask = bias = None
        source = _placeholder(graph, plan.padding_input)
        if structured and site.mask.padding and source is not None:
            # From the [B, M] input: the [N, M] mask the model builds goes dead with its
            # last user (only rewritten sites: dense ones still read it).
            kv_mask = _insert(
                graph,
                site_kv_mask_from_input,
                (source, plan.padding_rank, plan.query, key, value, *layout),
                anchor,
            )
        elif structured and site.mask.padding:
            kv_mask = _insert(
                graph,
                site_kv_mask,
                (plan.steps, plan.query, key, value, *layout, windowed, *plan.operands),
                anchor,
            )
        elif not structured:
            bias = _insert(
                graph,
                site_bias,
                (plan.steps, plan.query, key, value, *layout, *plan.operands),
                anchor,
            )
        # Variants read the folded scale from the site: dynamic factors are already in q.
        call = variant.build(config, dataclasses.replace(site, scale=plan.scale))
        extra = _param_nodes(
            gm, graph, variant, config, site, call.extra_args, site_modules, plan.query
        )
        out = _insert(graph, call.op, (q, k, v, kv_mask, bias, *extra), anchor)
        dtype = val(anchor).dtype
        result = _insert(
            graph, restore_layout, (out, plan.query, key, value, *layout, dtype), anchor
        )
    anchor.replace_all_uses_with(result)
    remove_dead(graph, plan.internal)
    return None


def rewrite_attention(
    gm: fx.GraphModule,
    sites: list[AttentionSite],
    assignment: dict[str, AttentionConfig | None],
    reasons: dict[str, str] | None = None,
    site_modules: dict | None = None,
) -> list[SiteResult]:
    """Rewrite ``gm`` in place: each site named in ``assignment`` gets its config.

    ``reasons`` gives the reason reported for sites with no config. ``site_modules``
    (e.g. an ``nn.ModuleDict``) holds the variants' per-site parameter modules by
    :func:`site_module_key`: existing ones are reused, new ones are added to it.
    """
    if site_modules is None:
        site_modules = {}
    results = []
    for site in sites:
        config = assignment.get(site.name)
        if config is None:
            why = (reasons or {}).get(site.name, "no config for this site")
            results.append(SiteResult(site, None, False, why))
            continue
        reason = _apply(gm, site, config, site_modules)
        results.append(SiteResult(site, config, reason is None, reason or ""))
    gm.graph.lint()
    gm.recompile()
    return results
