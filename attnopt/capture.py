"""Model → FX graph, through ``torch.export`` (non-strict).

Why export and not ``torch.fx.symbolic_trace``: symbolic tracing fails on
transformers 5 models, while non-strict export runs the real Python and keeps
``scaled_dot_product_attention`` as one node. We export in eval mode with the
batch and sequence dimensions dynamic, so one graph serves many input sizes.

Inputs are normalised to keyword arguments bound to ``forward``'s signature, so
``model(ids)`` and ``model(input_ids=ids)`` share a graph; an
:class:`InputSignature` records what a captured graph accepts (structure, dtypes,
static sizes and the range of each dynamic size), and the caller recaptures when a
call falls outside it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from attnopt._compat import pytree

__all__ = [
    "Call",
    "CaptureError",
    "Captured",
    "InputSignature",
    "bind_inputs",
    "capture",
    "copy_structure",
    "example_inputs_for",
    "grid_from_config",
    "is_hf_model",
    "window_from_module",
]


class CaptureError(RuntimeError):
    """The model could not be turned into a graph."""


def copy_structure(
    model: nn.Module,
    purpose: str,
    replace: Mapping[int, torch.Tensor] | None = None,
    *,
    caller: str = "",
) -> nn.Module:
    """A copy of ``model``'s modules and attributes that shares its parameters and
    buffers, except those whose ``id`` is in ``replace`` (taken from there instead).

    Where the model's attributes cannot be deep-copied, the error reads ``"{caller}could
    not copy the structure of {Model} to {purpose} (...)"``."""
    replace = replace or {}
    shared = itertools.chain(model.parameters(), model.buffers())
    memo: dict[int, Any] = {id(t): replace.get(id(t), t) for t in shared}
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:  # deepcopy raises whatever the model's attributes raise
        raise RuntimeError(
            f"{caller}could not copy the structure of {type(model).__name__} to {purpose} "
            f"({type(e).__name__}: {e})"
        ) from e


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is an optional dependency
        return False
    return isinstance(model, PreTrainedModel)


# -- example inputs ---------------------------------------------------------------


def example_inputs_for(
    model: nn.Module, *, batch: int = 2, seq_len: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Synthesise keyword inputs for a Hugging Face model from its config.

    Text models get random token ids (and an all-ones attention mask), vision
    models random pixel values at the configured image size, encoder-decoders
    decoder token ids too. Caches are turned off.

    Raises:
        CaptureError: the model is not a transformers model, or its inputs cannot be
            derived from the config; pass ``example_inputs`` instead.
    """
    if not is_hf_model(model):
        raise CaptureError(
            f"example_inputs is required for {type(model).__name__}: attnopt synthesises inputs "
            f"only for Hugging Face transformers models. Pass example_inputs=(args...) or "
            f"{{'name': value}} as {type(model).__name__}.forward takes them."
        )
    config = model.config
    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    main = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(
            batch, channels, *size, generator=gen, dtype=_model_dtype(model)
        ).to(device)
    elif main in ("input_ids", "decoder_input_ids") or "input_ids" in params:
        vocab = getattr(text_config, "vocab_size", None)
        if not vocab:
            raise CaptureError(
                f"cannot synthesise token ids for {type(model).__name__}: its config has no "
                f"vocab_size; pass example_inputs={{'input_ids': ...}}"
            )
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
        inputs["input_ids"] = ids
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            # A different length from the encoder's keeps the two sequence sizes apart in
            # the graph, so cross-attention is recognisable.
            dec_len = max(2, seq_len - 4)
            inputs["decoder_input_ids"] = torch.randint(
                0, vocab, (batch, dec_len), generator=gen
            ).to(device)
    else:
        raise CaptureError(
            f"cannot synthesise inputs for {type(model).__name__} (main input "
            f"{main!r}); pass example_inputs as its forward takes them"
        )
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def grid_from_config(model: nn.Module) -> tuple[int, ...] | None:
    """The patch grid of a vision/video transformers model, from its config.

    ``(image_size / patch_size)`` per side for images; video configs with
    ``num_frames`` and ``tubelet_size`` add a leading time axis.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = getattr(config, "vision_config", None) or config
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not image or not patch:
        return None
    image = tuple(image) if isinstance(image, (list, tuple)) else (image, image)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    grid = tuple(i // p for i, p in zip(image, patch))
    frames, tubelet = getattr(config, "num_frames", None), getattr(config, "tubelet_size", None)
    if frames and tubelet:
        grid = (frames // (tubelet[0] if isinstance(tubelet, (list, tuple)) else tubelet), *grid)
    return grid


def window_from_module(model: nn.Module, name: str) -> int | None:
    """The sliding window a transformers attention module declares, or None.

    Its ``sliding_window`` attribute when it has one (Qwen2, Gemma: ``None`` on full-
    attention layers); else its config's: ``layer_types[layer_idx]`` must be
    ``"sliding_attention"`` when the config lists layer types, and
    ``use_sliding_window`` must not be False (Mistral has neither: every layer)."""
    try:
        module = model.get_submodule(name.split("#", 1)[0]) if name != "<root>" else model
    except AttributeError:
        return None
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        config = getattr(module, "config", None)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            return None
        types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
        if types is not None:
            if not isinstance(idx, int) or not 0 <= idx < len(types):
                return None
            if types[idx] != "sliding_attention":
                return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    return window


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


# -- binding inputs to forward --------------------------------------------------------


@dataclasses.dataclass
class Call:
    """Positional and keyword arguments of one call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def bind_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``example_inputs`` (a tuple of positional args, a dict of kwargs, or a
    :class:`Call`) to the arguments of ``model.forward``: keyword arguments wherever
    the signature allows, with ``None`` dropped where ``None`` is the default."""
    if isinstance(example_inputs, Call):
        args, kwargs = tuple(example_inputs.args), dict(example_inputs.kwargs)
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, list):
        raise TypeError(
            "example_inputs must be a tuple of positional arguments or a dict of keyword "
            "arguments, got a list; wrap it as tuple(...) if these are positional arguments"
        )
    else:
        args, kwargs = (example_inputs,), {}
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"inputs do not match {type(model).__name__}.forward{_safe_sig(model)}: {e}"
        ) from None
    out_args: list[Any] = []
    out_kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out_args.extend(value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            out_kwargs.update({k: v for k, v in value.items() if v is not None})
        elif param.kind is inspect.Parameter.POSITIONAL_ONLY or out_args:
            out_args.append(value)
        elif value is None and param.default is None:
            continue
        else:
            out_kwargs[name] = value
    return tuple(out_args), out_kwargs


def _safe_sig(model: nn.Module) -> str:
    try:
        return str(inspect.signature(model.forward))
    except (TypeError, ValueError):
        return "(...)"


# -- input signatures ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Leaf:
    kind: str  # "tensor" or "value"
    dtype: torch.dtype | None = None
    device: str | None = None
    dims: tuple[Any, ...] = ()  # int for a static size, (min, max) for a dynamic one
    value: Any = None


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """What one captured graph accepts."""

    spec: pytree.TreeSpec
    leaves: tuple[_Leaf, ...]

    @staticmethod
    def of_program(
        program: torch.export.ExportedProgram, module: torch.fx.GraphModule, args, kwargs
    ) -> InputSignature:
        flat, spec = pytree.tree_flatten((args, kwargs))
        ranges = {str(k): (int(v.lower), v.upper) for k, v in program.range_constraints.items()}
        # The unlifted module's placeholders are exactly the flattened user inputs.
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        leaves = []
        for value, node in zip(flat, placeholders):
            if isinstance(value, torch.Tensor):
                fake = node.meta.get("val")
                dims = []
                for i, size in enumerate(value.shape):
                    sym = fake.shape[i] if fake is not None else size
                    if isinstance(sym, torch.SymInt):
                        lo, hi = ranges.get(str(sym), (2, None))
                        hi = None if hi is None or not str(hi).lstrip("-").isdigit() else int(hi)
                        dims.append((lo, hi))
                    else:
                        dims.append(int(size))
                leaves.append(_Leaf("tensor", value.dtype, str(value.device), tuple(dims)))
            else:
                leaves.append(_Leaf("value", value=value))
        return InputSignature(spec, tuple(leaves))

    def accepts(self, args, kwargs) -> bool:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec or len(flat) != len(self.leaves):
            return False
        for value, leaf in zip(flat, self.leaves):
            if leaf.kind == "value":
                if isinstance(value, torch.Tensor) or value != leaf.value:
                    return False
                continue
            if not isinstance(value, torch.Tensor):
                return False
            if value.dtype != leaf.dtype or str(value.device) != leaf.device:
                return False
            if value.dim() != len(leaf.dims):
                return False
            for size, dim in zip(value.shape, leaf.dims):
                if isinstance(dim, int):
                    if size != dim:
                        return False
                else:
                    lo, hi = dim
                    if size < lo or (hi is not None and size > hi):
                        return False
        return True


# -- capture ----------------------------------------------------------------------------


@dataclasses.dataclass
class Captured:
    """One exported graph of a model and the inputs it was captured with."""

    program: torch.export.ExportedProgram
    module: torch.fx.GraphModule  # unlifted: parameters are attributes, shared with the model
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    signature: InputSignature


def _dynamic_shapes(args, kwargs) -> tuple[Any, Any]:
    """Batch and sequence dimensions dynamic where they plausibly are.

    Token-like tensors ([B, N] integer/bool, or [B, N, C] float) get dims 0 and 1;
    images ([B, C, H, W]) and anything else get the batch dimension only.
    ``Dim.AUTO`` lets export keep a dimension static when the model needs it.
    """
    auto = torch.export.Dim.AUTO

    def spec_for(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 0:
            return {}
        if value.dim() in (2, 3):
            return {0: auto, 1: auto}
        return {0: auto}

    dyn_args = tuple(pytree.tree_map(spec_for, a) for a in args)
    dyn_kwargs = {k: pytree.tree_map(spec_for, v) for k, v in kwargs.items()}
    return dyn_args, dyn_kwargs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _module_tracker(model: nn.Module) -> Iterator[list[str]]:
    """Track which submodule is running, to name the one that fails export."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def pre(module, _args):
        stack.append(names.get(module, "?"))

    def post(module, _args, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names]
    handles += [m.register_forward_hook(post) for m in names]
    try:
        yield failed
    except BaseException:
        failed.extend(stack)
        raise
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Export ``model`` into an FX graph with dynamic batch and sequence sizes.

    Args:
        model: any ``nn.Module``; left as it was (training flags restored, no hooks).
        example_inputs: a tuple of positional args or a dict of keyword args, as
            ``model.forward`` takes them. Optional for transformers models (built
            from the config by :func:`example_inputs_for`).

    Raises:
        CaptureError: naming the module that failed and what to pass instead.
    """
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    args, kwargs = bind_inputs(model, example_inputs)
    dyn_args, dyn_kwargs = _dynamic_shapes(args, kwargs)
    failed: list[str] = []
    with eval_mode(model), torch.no_grad():
        try:
            with _module_tracker(model) as failed:
                program = torch.export.export(
                    model,
                    args,
                    kwargs,
                    dynamic_shapes=_merge_dynamic(model, dyn_args, dyn_kwargs, args, kwargs),
                    strict=False,
                )
        except Exception as e:  # export raises many types; all mean the same here
            where = failed[-1] if failed else ""
            where_text = (
                f" in submodule {where!r} ({type(model.get_submodule(where)).__name__})"
                if where
                else ""
            )
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}{where_text}: "
                f"{type(e).__name__}: {first}. Check that example_inputs match "
                f"{type(model).__name__}.forward (a tuple of positional args or a dict of "
                f"keyword args), turn off caches (use_cache=False), or exclude that module "
                f"from capture by optimizing a submodule instead."
            ) from e
    module = program.module()
    return Captured(
        program=program,
        module=module,
        args=args,
        kwargs=kwargs,
        signature=InputSignature.of_program(program, module, args, kwargs),
    )


def _merge_dynamic(model, dyn_args, dyn_kwargs, args, kwargs):
    # export takes dynamic_shapes keyed by forward's parameter names when kwargs are used.
    if not dyn_args:
        return dyn_kwargs
    if not dyn_kwargs:
        return dyn_args
    sig = inspect.signature(model.forward)
    names = [
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    merged = dict(zip(names, dyn_args))
    merged.update(dyn_kwargs)
    return merged
