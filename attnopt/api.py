"""The public verbs: :func:`find_attention` and :func:`optimize`. Thin: they call the passes."""

from __future__ import annotations

import inspect
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from attnopt._compat import pytree
from attnopt.capture import (
    Call,
    Captured,
    bind_inputs,
    capture,
    copy_structure,
    eval_mode,
    example_inputs_for,
    grid_from_config,
    is_hf_model,
    window_from_module,
)
from attnopt.config import AttentionConfig, Policy, check_policy, matches, resolve_policy
from attnopt.passes.canonicalize_attention import canonicalize_attention
from attnopt.passes.find_attention import find_attention_sites
from attnopt.passes.rewrite_attention import SiteResult, rewrite_attention
from attnopt.report import OptimizationReport, compare_outputs
from attnopt.site import AttentionSite

__all__ = ["OptimizedModule", "find_attention", "optimize"]

LayerSelector = Union[str, "re.Pattern[str]", Sequence[str], Callable[[AttentionSite], bool], None]

_MAX_GRAPHS = 8


def _sites_of(captured: Captured, model: nn.Module) -> list[AttentionSite]:
    canonicalize_attention(captured.module)
    sites = find_attention_sites(captured.module, captured.args, captured.kwargs)
    grid = grid_from_config(model)
    for site in sites:
        site.grid = grid
        _declared_window(site, model)
    return sites


def _declared_window(site: AttentionSite, model: nn.Module) -> None:
    """Give a causal site the sliding window its layer declares when the example was
    too short to show it in the mask (a window the mask shows is already set; one the
    mask contradicts, or a site with no mask at all, is not the layer's real one)."""
    if site.window is not None or not site.mask.causal:
        return
    seen = getattr(site.plan, "mask_keys", None)
    window = window_from_module(model, site.name)
    if window is not None and seen is not None and seen <= window:
        site.window = window


def find_attention(model: nn.Module, example_inputs: Any = None) -> list[AttentionSite]:
    """Every attention site in ``model``.

    Args:
        model: any ``nn.Module``; not modified.
        example_inputs: a tuple of positional arguments or a dict of keyword arguments
            as ``model.forward`` takes them; optional for transformers models.

    Example:
        >>> import attnopt
        >>> model = attnopt.zoo.tiny_model("tiny-llama")
        >>> [s.name for s in attnopt.find_attention(model)]
        ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    """
    return _sites_of(capture(model, _cacheless(model, example_inputs)), model)


def _takes_use_cache(model: nn.Module) -> bool:
    return is_hf_model(model) and "use_cache" in inspect.signature(model.forward).parameters


def _cacheless(model: nn.Module, example_inputs: Any) -> Any:
    """The inputs to capture with: synthesised when None, and ``use_cache=False`` added
    for transformers models (graphs are captured without a cache)."""
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    if _takes_use_cache(model) and isinstance(example_inputs, dict):
        example_inputs = {**example_inputs, "use_cache": False}
    return example_inputs


def _selected(site: AttentionSite, layers: LayerSelector) -> bool:
    if layers is None:
        return True
    if callable(layers) and not isinstance(layers, (str, re.Pattern)):
        return bool(layers(site))
    patterns = [layers] if isinstance(layers, (str, re.Pattern)) else list(layers)

    return any(matches(p, site.name) for p in patterns)


def _check_layers(layers: Any) -> None:
    if layers is None or callable(layers) or isinstance(layers, (str, re.Pattern)):
        return
    if isinstance(layers, Sequence) and all(isinstance(p, (str, re.Pattern)) for p in layers):
        return
    raise TypeError(
        "layers must be a glob pattern, a compiled regex, a list of them, or a predicate "
        f"taking an AttentionSite; got {layers!r}"
    )


def _assign(sites, config, layers) -> tuple[dict[str, AttentionConfig | None], dict[str, str]]:
    assignment: dict[str, AttentionConfig | None] = {}
    reasons: dict[str, str] = {}
    for site in sites:
        if not _selected(site, layers):
            reasons[site.name] = "not selected by layers"
            continue
        chosen = resolve_policy(config, site.name)
        if chosen is None:
            reasons[site.name] = "no config for this site in the policy"
        assignment[site.name] = chosen
    return assignment, reasons


# Methods of the original (transformers) model that would act on it as if it were not
# converted; the wrapper refuses them instead of forwarding, with what to do instead.
_DROPS_CONVERSION = {
    "push_to_hub": "save it with save_pretrained(dir) (or `attnopt convert`) and upload "
    "that directory, which attnopt.load reads back",
}


class OptimizedModule(nn.Module):
    """A model whose attention runs through attnopt ops, called like the original.

    It holds the original model (``_orig_mod``; parameters are shared, not copied)
    and one rewritten graph per input signature it has seen: calls with another
    structure, dtype or size outside a graph's dynamic range are captured and
    rewritten again with the same per-site configs (with a warning). Attributes the
    wrapper does not define (``config``, ``device``, ...) come from the original.
    Moving it (``.to()``, ``.half()``) drops the graphs; they are rebuilt on the
    next call. The graphs are captured in eval mode.

    Attributes:
        report: :class:`~attnopt.report.OptimizationReport` of the first capture.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AttentionConfig | Policy,
        layers: LayerSelector,
        captured: Captured,
        results: list[SiteResult],
        report: OptimizationReport,
        call_defaults: dict[str, Any],
        site_modules: nn.ModuleDict,
    ) -> None:
        super().__init__()
        self._orig_mod = model
        self._attn_config = config
        self._attn_layers = layers
        self._call_defaults = call_defaults
        self._graphs: list[tuple[Any, torch.fx.GraphModule]] = [
            (captured.signature, captured.module)
        ]
        self.attnopt_params = site_modules
        self._example = (captured.args, captured.kwargs)
        self._lock = threading.Lock()
        self.report = report
        self._assignment = {r.name: r.config for r in results}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self._modules.get("_orig_mod")
            if orig is None or name.startswith("__"):
                raise
            if name in _DROPS_CONVERSION:
                raise AttributeError(
                    f"OptimizedModule.{name}: the original model's {name} would publish "
                    f"the unconverted model and lose the attention rewrite; "
                    f"{_DROPS_CONVERSION[name]}"
                ) from None
            return getattr(orig, name)

    @property
    def original(self) -> nn.Module:
        """The wrapped original model (its parameters are the optimized model's)."""
        return self._modules["_orig_mod"]

    def _replace_parameters(self, values: dict[str, torch.Tensor]) -> None:
        """Give the optimized model new weights for the parameters named in ``values``
        (names in :attr:`original`) without touching the tensors it shares with the
        model given to :func:`optimize`.

        The wrapped model becomes a structural copy of it that shares every other
        parameter and buffer; the changed ones are new ``nn.Parameter`` tensors, and
        every captured graph's attribute that held an old tensor holds the new one.
        """
        named = dict(self.original.named_parameters(remove_duplicate=False))
        unknown = sorted(set(values) - set(named))
        if unknown:
            raise KeyError(f"_replace_parameters: no parameters named {unknown} in the model")
        fresh: dict[int, nn.Parameter] = {}
        for name, value in values.items():
            old = named[name]
            if id(old) not in fresh:
                new = value.detach().to(dtype=old.dtype, device=old.device).clone()
                fresh[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad)
        if not fresh:
            return
        clone = copy_structure(
            self.original, "give it new weights without changing the original", fresh
        )
        for _, graph in self._graphs:
            for module in graph.modules():
                for attr, t in list(module._parameters.items()):
                    if t is not None and id(t) in fresh:
                        module._parameters[attr] = fresh[id(t)]
                for attr, t in list(vars(module).items()):
                    if isinstance(t, torch.Tensor) and id(t) in fresh:
                        setattr(module, attr, fresh[id(t)])
        self._modules["_orig_mod"] = clone

    @property
    def attention_config(self) -> AttentionConfig | Policy:
        """The ``config`` given to :func:`optimize` (a config or a per-layer policy)."""
        return self._attn_config

    @property
    def layer_selector(self) -> LayerSelector:
        """The ``layers`` selector given to :func:`optimize` (not named ``layers``, which
        would hide an attribute of the original model)."""
        return self._attn_layers

    @property
    def site_configs(self) -> dict[str, AttentionConfig | None]:
        """Site name → the config applied to it (``None``: left as it was)."""
        return dict(self._assignment)

    @property
    def example_inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the first graph was captured with."""
        return self._example

    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        """The rewritten graphs captured so far (inspect their ops here)."""
        return [g for _, g in self._graphs]

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph for the example inputs given to :func:`optimize`."""
        args, kwargs = self._example
        return self._graph_for(args, kwargs)

    def _bind(self, args, kwargs):
        args, kwargs = bind_inputs(self._orig_mod, Call(args, kwargs))
        for k, v in self._call_defaults.items():
            kwargs.setdefault(k, v)
        return args, kwargs

    def _graph_for(self, args, kwargs) -> torch.fx.GraphModule:
        for signature, gm in self._graphs:
            if signature.accepts(args, kwargs):
                return gm
        with self._lock:
            if self._graphs:  # not after a move, which drops every graph on purpose
                warnings.warn(
                    "attnopt: these inputs fall outside the graphs captured so far (other "
                    "arguments, dtype, device or a size outside the dynamic range); capturing "
                    "and rewriting again",
                    stacklevel=3,
                )
            captured = capture(self._orig_mod, Call(args, kwargs))
            sites = _sites_of(captured, self._orig_mod)
            assignment = {s.name: self._assignment.get(s.name) for s in sites}
            rewrite_attention(captured.module, sites, assignment, site_modules=self.attnopt_params)
            self._graphs.insert(0, (captured.signature, captured.module))
            del self._graphs[_MAX_GRAPHS:]
            return captured.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._bind(args, kwargs)
        return self._graph_for(args, kwargs)(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Token generation for a transformers causal LM, with attnopt attention and caches.

        Takes and returns what ``transformers``' ``model.generate`` does (greedy,
        sampling, beam search, ``max_new_tokens``, left-padded batches with
        ``attention_mask``, ``streamer``). Each site decodes with its variant and a cache
        sized for it (see :mod:`attnopt.generation`); the original model is not touched.

        Example:
            >>> import attnopt, torch
            >>> model = attnopt.zoo.tiny_model("tiny-llama")
            >>> fast = attnopt.optimize(model, attnopt.SlidingWindow(8))
            >>> fast.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape
            torch.Size([1, 7])
        """
        from attnopt.generation import generate

        return generate(self, *args, **kwargs)

    def can_generate(self) -> bool:
        """Whether :meth:`generate` works for this model (a transformers causal LM)."""
        from attnopt.generation import can_generate

        return can_generate(self)

    def save_pretrained(self, save_directory: Any, *, tokenizer: Any = None, force: bool = False):
        """Save as a converted checkpoint (see :func:`attnopt.checkpoint.save`): the
        original's ``save_pretrained`` files plus the per-site configs and variant
        tensors; ``attnopt.checkpoint.load`` gives the optimized model back."""
        from attnopt.checkpoint import save

        return save(self, save_directory, force=force, tokenizer=tokenizer)

    def _apply(self, fn, recurse=True):
        # Graphs bake in devices and dtypes (and hold the old buffers): rebuild lazily,
        # from example inputs converted the same way as the parameters.
        out = super()._apply(fn, recurse)
        if "_example" in self.__dict__:
            args, kwargs = self._example
            convert = lambda t: fn(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            self._example = (pytree.tree_map(convert, args), pytree.tree_map(convert, kwargs))
            self._graphs = []
        return out


def optimize(
    model: nn.Module,
    config: AttentionConfig | Policy,
    example_inputs: Any = None,
    *,
    layers: LayerSelector = None,
    measure: bool = True,
) -> OptimizedModule:
    """Rewrite the attention in ``model`` into the variant(s) ``config`` names.

    Args:
        model: any ``nn.Module``; never modified (parameters are shared with the result).
        config: a variant config (``attnopt.SlidingWindow(256)``) for every site, or a
            per-layer policy ``{"model.layers.[0-3].*": cfg, "*": None}`` mapping
            site-name globs (or compiled regexes) to configs; first match wins,
            ``None`` leaves a site as it is.
        example_inputs: a tuple of positional args or a dict of keyword args as
            ``model.forward`` takes them; optional for transformers models.
        layers: restricts the rewrite to sites whose name matches a glob/regex (or
            any of a list), or for which a predicate ``f(site) -> bool`` is true.
        measure: run both models once on the example inputs and record the output
            difference in ``report.output_error``.

    Returns:
        An :class:`OptimizedModule` called exactly like ``model``; ``.report`` lists
        every site with its variant, whether it was applied, and why not.

    Example:
        >>> import attnopt
        >>> model = attnopt.zoo.tiny_model("tiny-llama")
        >>> fast = attnopt.optimize(model, attnopt.SlidingWindow(window=8))
        >>> len(fast.report.applied)
        2
    """
    check_policy(config)
    _check_layers(layers)
    call_defaults: dict[str, Any] = {"use_cache": False} if _takes_use_cache(model) else {}
    example_inputs = _cacheless(model, example_inputs)
    captured = capture(model, example_inputs)
    sites = _sites_of(captured, model)
    if not sites:
        raise ValueError(
            f"no attention found in {type(model).__name__}: attnopt looks for "
            f"scaled_dot_product_attention and softmax(q @ k^T) @ v; check that the model "
            f"computes attention in its forward for these inputs"
        )
    assignment, reasons = _assign(sites, config, layers)
    site_modules = nn.ModuleDict()
    results = rewrite_attention(captured.module, sites, assignment, reasons, site_modules)
    report = OptimizationReport(results)
    optimized = OptimizedModule(
        model, config, layers, captured, results, report, call_defaults, site_modules
    )
    if measure:
        with eval_mode(model), torch.no_grad():
            reference = model(*captured.args, **captured.kwargs)
            actual = captured.module(*captured.args, **captured.kwargs)
        report.output_error = compare_outputs(reference, actual)
    return optimized
