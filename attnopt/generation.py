"""Token generation for optimized transformers causal LMs, through transformers' own API.

``OptimizedModule.generate(...)`` takes every argument ``transformers``' ``generate``
takes (greedy, sampling, beam search, ``max_new_tokens``, left-padded batches with an
attention mask, streamers, ...). Why not run the captured graphs: they are captured
without a cache (a graph per sequence length, recomputing the prefix every step).
Instead generation runs the Hugging Face model eagerly, through its two extension
points:

* the attention-function registry: attnopt registers ``"attnopt"`` in
  ``transformers.AttentionInterface`` (:func:`attnopt_attention`), which hands each
  layer's query and keys to that layer's cache (:mod:`attnopt.cache`): the prompt runs
  through the site's own ``attnopt::`` op, built by its variant's rewrite handler, and
  each new token through the variant's decode kernel (``kernels/<variant>/decode.py``);
* the cache classes: an :class:`~attnopt.cache.AttnoptCache` whose layer for each
  decoder layer is sized for its variant (a bounded window, a linear state, ...).

The per-site settings come from the optimized module's report, the same configs
and parameter modules the graph rewrite used; nothing is configured twice.

The original model is never touched: generation runs on a structural copy made for
each call (modules and config copied; parameters and buffers shared, not copied),
whose config selects the ``"attnopt"`` attention and whose attention modules know
their cache layer. So concurrent calls, and the original model used meanwhile, do
not interfere.
"""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any

import torch
from torch import nn

from attnopt.capture import copy_structure, is_hf_model
from attnopt.kernels.block_sparse import BlockSparse
from attnopt.kernels.dense import Dense
from attnopt.kernels.hybrid import Hybrid
from attnopt.kernels.linear import Linear
from attnopt.kernels.sliding_window import SlidingWindow, layer_window
from attnopt.passes.rewrite_attention import site_module_key
from attnopt.site import MaskKind

__all__ = [
    "ATTENTION_NAME",
    "DECODABLE",
    "attnopt_attention",
    "build_cache",
    "can_generate",
    "decode_model",
    "generate",
    "site_plans",
]

ATTENTION_NAME = "attnopt"
DECODABLE = (SlidingWindow, Linear, Hybrid, BlockSparse, Dense)

_REGISTER_LOCK = threading.Lock()
_CAUSAL = (MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING)
# generate() arguments that need a cache attnopt does not build (or that can roll it back).
_UNSUPPORTED = {
    "assistant_model": "assisted decoding rolls the cache back, which bounded caches cannot",
    "prompt_lookup_num_tokens": "prompt lookup rolls the cache back, which bounded caches cannot",
    "cache_implementation": "attnopt builds its own cache for each site's variant",
}


def attnopt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"attnopt"`` in transformers.

    ``query [B, H, N, D]`` and ``key``/``value`` as the layer's cache returned them; the
    cache layer attached to ``module`` runs the site's variant. ``attention_mask`` is
    unused: attnopt keeps padding and positions in its own cache. Returns
    ``([B, N, H, Dv], None)`` like transformers' attention functions.
    """
    layer = getattr(module, "_attnopt_layer", None)
    if layer is None:
        raise RuntimeError(
            f"attnopt attention ran for a {type(module).__name__} that has no attnopt cache "
            f"layer: the '{ATTENTION_NAME}' attention implementation only works inside "
            f"OptimizedModule.generate(), on the copy of the model it prepares"
        )
    scale = layer.plan.scale
    if scale is None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, key, value, float(scale))
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    with _REGISTER_LOCK:
        if AttentionInterface._global_mapping.get(ATTENTION_NAME) is not attnopt_attention:
            AttentionInterface.register(ATTENTION_NAME, attnopt_attention)


def _original(optimized: nn.Module) -> nn.Module:
    return optimized.original


def _why_not(optimized: nn.Module) -> str | None:
    model = _original(optimized)
    if not is_hf_model(model):
        return (
            f"generate() needs a transformers causal LM; the optimized model wraps "
            f"{type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"generate() supports decoder-only causal LMs; {type(model).__name__} is an "
            f"encoder-decoder"
        )
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        return f"{type(model).__name__} cannot generate (it is not a causal LM with an LM head)"
    return None


def can_generate(optimized: nn.Module) -> bool:
    """Whether :func:`generate` accepts this optimized model."""
    return _why_not(optimized) is None


def site_plans(optimized: nn.Module) -> list[Any]:
    """How every attention site of ``optimized`` runs while generating, from its report.

    Raises:
        NotImplementedError: a site's variant (or its mask) cannot be decoded token by
            token; the message names the site, the variant and what would work.
    """
    from attnopt.cache import SitePlan

    params = getattr(optimized, "attnopt_params", None)
    plans = []
    for result in optimized.report.sites:
        site, name = result.site, result.name
        config = result.config if result.applied else None
        what = config.describe() if config is not None else "its original attention"
        if site.cross:
            raise NotImplementedError(
                f"generate(): site {name!r} ({what}) is cross-attention; attnopt generates "
                f"with decoder-only causal LMs"
            )
        if config is not None and not isinstance(config, DECODABLE):
            raise NotImplementedError(
                f"generate(): site {name!r} uses {config.describe()}, which cannot decode "
                f"incrementally (a query's attention depends on the whole sequence, not on a "
                f"cache of the past). Variants that decode: "
                f"{', '.join(c.__name__ for c in DECODABLE)}; or leave this site as it was "
                f"with a policy such as {{{name!r}: None, '*': ...}}"
            )
        if site.mask not in _CAUSAL:
            raise NotImplementedError(
                f"generate(): site {name!r} ({what}) has mask kind '{site.mask}'; token-by-"
                f"token decoding needs causal attention (mask 'causal' or 'causal+padding'), "
                f"an additive bias or arbitrary mask cannot be rebuilt from the cache"
            )
        if "#" in name:
            raise NotImplementedError(
                f"generate(): site {name!r} ({what}) shares its module with other attention "
                f"sites; attnopt decodes one attention per module"
            )
        module = None
        if params is not None and site_module_key(name) in params:
            module = params[site_module_key(name)]
        if site.window is not None:
            # A sliding-window layer decodes within its window: left as it was, exactly
            # SlidingWindow(window); rewritten, only variants that honour the window apply.
            config = SlidingWindow(site.window) if config is None else config
            if isinstance(config, SlidingWindow):
                config = layer_window(config, site)
        plans.append(SitePlan(name=name, site=site, config=config, params=module))
    return plans


def decode_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for generation: its own modules and config, the same
    parameters and buffers (shared, not copied), in eval mode, with the ``"attnopt"``
    attention implementation selected."""
    clone = copy_structure(model, "run it with attnopt attention", caller="generate(): ")
    clone.eval()
    _register()
    configs = {id(m.config): m.config for m in clone.modules() if hasattr(m, "config")}
    for config in configs.values():
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_NAME
    return clone


def build_cache(optimized: nn.Module, clone: nn.Module) -> Any:
    """An :class:`~attnopt.cache.AttnoptCache` for one generation with ``clone``, each
    layer attached to its attention module in ``clone``."""
    from attnopt.cache import AttnoptCache, SitePlan, make_layer

    plans = site_plans(optimized)
    by_index: dict[int, Any] = {}
    for plan in plans:
        try:
            module = clone.get_submodule(plan.name)
        except AttributeError:
            raise RuntimeError(
                f"generate(): site {plan.name!r} is not a module of {type(clone).__name__}"
            ) from None
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or idx in by_index:
            raise NotImplementedError(
                f"generate(): site {plan.name!r} ({type(module).__name__}) has no distinct "
                f"integer layer_idx (got {idx!r}), so transformers' cache cannot address it"
            )
        layer = make_layer(plan)
        module._attnopt_layer = layer  # on the copy only: the original's modules stay as they were
        by_index[idx] = layer
    if not by_index:
        raise RuntimeError("generate(): the optimized model has no attention site to decode")
    count = max(by_index) + 1
    layers = []
    for i in range(count):
        if i in by_index:
            layers.append(by_index[i])
        else:  # a layer with no attention site: never updated, still addressable
            layers.append(make_layer(SitePlan(f"<layer {i}>", plans[0].site, None)))
    return AttnoptCache(layers)


def _capture_padding(module: nn.Module, args: tuple, kwargs: dict) -> None:
    from attnopt.cache import AttnoptCache

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, AttnoptCache):
        cache.set_padding(kwargs.get("attention_mask"))


def _cache_argument(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(optimized: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``transformers``' ``generate`` for an optimized causal LM, with attnopt caches.

    Takes and returns what ``model.generate`` does. See the module docstring.

    Raises:
        TypeError: the model is not a transformers decoder-only causal LM, or a cache
            was passed (attnopt builds its own).
        ValueError: ``use_cache=False`` (each step would recompute the whole sequence;
            call the optimized model's forward for that).
        NotImplementedError: a site cannot be decoded incrementally, or a generation
            mode needs to roll the cache back (assisted decoding, prompt lookup).
    """
    reason = _why_not(optimized)
    if reason is not None:
        raise TypeError(reason)
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise TypeError(
                f"generate(): {name} must not be given; attnopt builds a cache sized for each "
                f"site's variant (got {type(kwargs[name]).__name__})"
            )
        kwargs.pop(name, None)
    for name, why in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"generate(): {name} is not supported: {why}")
    if kwargs.get("use_cache", True) is False:
        raise ValueError(
            "generate(use_cache=False) would recompute the whole sequence at every step; "
            "attnopt generation decodes through its caches (leave use_cache unset), or call "
            "the optimized model's forward on the full sequence instead"
        )
    model = _original(optimized)
    clone = decode_model(model)
    clone.generation_config = copy.deepcopy(optimized.generation_config)
    cache = build_cache(optimized, clone)
    clone.register_forward_pre_hook(_capture_padding, with_kwargs=True)
    return clone.generate(*args, **{_cache_argument(clone): cache}, **kwargs)
