"""Converted checkpoints: an optimized model saved so it comes back exactly as it was.

A converted checkpoint is a directory that stays a valid Hugging Face checkpoint (the
original model's ``save_pretrained`` files, tokenizer files when there are any) with
two additions: ``attnopt.json``, which records what was applied to each attention site
(the variant config per site name, whether it was applied and why not) and how to
rebuild the model, and ``attnopt_params.safetensors`` with the tensors the variants
own (Hedgehog feature maps, mixing gates, random-feature projections).

:func:`load` rebuilds the model from the Hugging Face files, applies
:func:`attnopt.optimize` again with the recorded per-site configs, loads the variant
tensors, and checks that every recorded site was found and treated as recorded, so a
checkpoint never loads as something other than what was saved.

Writes are atomic: everything goes to a temporary directory beside the output, which
is renamed into place only when complete; an existing output is replaced (with
``force=True``) only after the new one is complete.

>>> import tempfile, attnopt
>>> from attnopt import checkpoint
>>> fast = attnopt.optimize(attnopt.zoo.tiny_model("tiny-llama"), attnopt.SlidingWindow(8))
>>> out = checkpoint.save(fast, tempfile.mkdtemp() + "/tiny-llama-sw")
>>> again = checkpoint.load(out)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ATTNOPT_JSON",
    "FORMAT_VERSION",
    "PARAMS_FILE",
    "CheckpointError",
    "is_checkpoint",
    "load",
    "load_hf_model",
    "read_metadata",
    "save",
]

ATTNOPT_JSON = "attnopt.json"
PARAMS_FILE = "attnopt_params.safetensors"
FORMAT_NAME = "attnopt-checkpoint"
FORMAT_VERSION = 1

# Files a tokenizer directory may hold (slow and fast tokenizers, sentencepiece, BPE).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)

# Auto classes tried, in order, to name the one that builds the saved class (recorded for
# tools that load the Hugging Face files without attnopt).
_AUTO_MAPPINGS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


class CheckpointError(RuntimeError):
    """A converted checkpoint is missing, incomplete, corrupt or does not match the model."""


# -- saving ------------------------------------------------------------------------------


def save(
    optimized: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write ``optimized`` as a converted checkpoint directory ``out_dir``.

    Args:
        optimized: an :class:`attnopt.OptimizedModule` whose original model is a
            transformers ``PreTrainedModel`` (it is saved with ``save_pretrained``).
        out_dir: the directory to create. Its parent is created if needed.
        force: replace an existing ``out_dir`` (only once the new checkpoint is
            complete); without it an existing ``out_dir`` raises ``FileExistsError``
            and is left untouched.
        tokenizer: saved beside the model: an object with ``save_pretrained`` (a
            transformers tokenizer or processor), or a directory whose tokenizer files
            are copied (e.g. the Hugging Face directory the model came from).

    Returns:
        The path of the written checkpoint.

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is false.
        TypeError: ``optimized`` is not an optimized transformers model.
    """
    from attnopt.api import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise TypeError(
            f"optimized must be the OptimizedModule returned by attnopt.optimize, "
            f"got {type(optimized).__name__}"
        )
    model = _original(optimized)
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"save needs a Hugging Face transformers model (with save_pretrained); the "
            f"optimized model wraps {type(model).__name__}"
        )
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(
            f"output {str(out)!r} already exists; pass force=True (CLI: --force) to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        params = _params_state(optimized)
        params_meta = None
        if params:
            from safetensors.torch import save_file

            save_file(params, str(tmp / PARAMS_FILE), metadata={"format": "pt"})
            params_meta = {
                "file": PARAMS_FILE,
                "sha256": _sha256(tmp / PARAMS_FILE),
                "tensors": {k: list(v.shape) for k, v in params.items()},
            }
        meta = _metadata(optimized, model, params_meta)
        (tmp / ATTNOPT_JSON).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return out


def _original(optimized: nn.Module) -> nn.Module:
    return optimized.original


def _site_results(optimized: nn.Module) -> list[Any]:
    return list(optimized.report.sites)


def _params_state(optimized: nn.Module) -> dict[str, torch.Tensor]:
    modules = getattr(optimized, "attnopt_params", None)
    if modules is None:
        return {}
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in modules.state_dict().items()}


def _metadata(optimized: nn.Module, model: nn.Module, params_meta: Any) -> dict[str, Any]:
    import attnopt

    config = getattr(model, "config", None)
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover - save_pretrained implies transformers
        transformers_version = None
    error = optimized.report.output_error
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "attnopt_version": attnopt.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "transformers_version": transformers_version,
        "model": {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "auto_class": _auto_class(model),
            "model_type": getattr(config, "model_type", None),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "dtype": _dtype_name(model),
            "absent_submodules": _absent_submodules(model),
        },
        "sites": [
            {
                "name": r.name,
                "config": r.config.to_dict() if r.config is not None else None,
                "applied": bool(r.applied),
                "reason": r.reason,
                "mask": r.site.mask.value,
                "window": r.site.window,
                "num_heads": r.site.num_heads,
                "num_kv_heads": r.site.num_kv_heads,
                "head_dim": r.site.head_dim,
            }
            for r in _site_results(optimized)
        ],
        "parameters": params_meta,
        "output_error": (
            {"max_abs": error.max_abs, "max_rel": error.max_rel} if error is not None else None
        ),
    }


def _auto_class(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover
        return None
    for auto_name, mapping_name in _AUTO_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {})
        names = mapping.get(model_type)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        if type(model).__name__ in names:
            return auto_name
    return None


def _dtype_name(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _absent_submodules(model: nn.Module) -> list[str]:
    """Paths of module attributes set to ``None`` (``BertModel(add_pooling_layer=False)``
    has ``pooler = None``): a class rebuilt from its config alone would create them."""
    absent = []
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if value is None and not attr.startswith("_"):
                absent.append(f"{path}.{attr}" if path else attr)
    return absent


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(out)
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise ValueError(
            f"tokenizer must be a tokenizer/processor with save_pretrained or a directory of "
            f"tokenizer files, got {tokenizer!r}"
        )
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it becomes ``out``
    (an existing ``out`` is swapped out only then), on failure it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, backup)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(backup, out)
                raise
            if backup.is_dir() and not backup.is_symlink():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- loading -----------------------------------------------------------------------------


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding ``attnopt.json``."""
    return (Path(path) / ATTNOPT_JSON).is_file()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and checked ``attnopt.json`` of the converted checkpoint ``path``.

    Raises:
        CheckpointError: ``path`` is not a directory, has no ``attnopt.json``, or the
            file is not valid JSON of a format version this attnopt reads.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {str(root)!r} does not exist or is not a directory")
    file = root / ATTNOPT_JSON
    if not file.is_file():
        raise CheckpointError(
            f"{str(root)!r} is not an attnopt checkpoint: it has no {ATTNOPT_JSON} "
            f"(write one with attnopt.checkpoint.save or `attnopt convert`)"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{str(file)!r} is corrupt: expected an object with format {FORMAT_NAME!r}"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{str(file)!r} is corrupt: format_version={version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(file)!r} has format_version {version}, newer than this attnopt reads "
            f"({FORMAT_VERSION}); upgrade attnopt"
        )
    sites = meta.get("sites")
    model = meta.get("model")
    if not isinstance(sites, list) or not isinstance(model, dict) or not sites:
        raise CheckpointError(f"{str(file)!r} is corrupt: 'sites' or 'model' missing or empty")
    for i, s in enumerate(sites):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or "config" not in s:
            raise CheckpointError(f"{str(file)!r} is corrupt: sites[{i}] = {s!r}")
    return meta


def load_hf_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    meta: dict[str, Any] | None = None,
) -> nn.Module:
    """A transformers model from a ``save_pretrained`` directory, in eval mode.

    The class is the one recorded in ``meta["model"]`` (from ``attnopt.json``), else
    ``config.architectures[0]``, else ``AutoModel``.

    Raises:
        CheckpointError: no ``config.json``, unknown architecture, or weights that are
            missing or unreadable.
    """
    transformers = _transformers()
    root = Path(path)
    if not (root / "config.json").is_file():
        raise CheckpointError(
            f"{str(root)!r} is not a Hugging Face checkpoint: it has no config.json"
        )
    info = (meta or {}).get("model", {}) or {}
    try:
        hf_config = transformers.AutoConfig.from_pretrained(root)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise CheckpointError(f"cannot read {str(root / 'config.json')!r}: {_one_line(e)}") from e
    cls = _model_class(transformers, info, hf_config)
    kwargs: dict[str, Any] = {}
    if info.get("attn_implementation") in ("sdpa", "eager"):
        kwargs["attn_implementation"] = info["attn_implementation"]
    if isinstance(info.get("dtype"), str) and isinstance(
        getattr(torch, info["dtype"], None), torch.dtype
    ):
        kwargs["dtype"] = getattr(torch, info["dtype"])
    with _quiet_transformers(transformers):
        try:
            model, loading = cls.from_pretrained(root, output_loading_info=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - corrupt weights surface as many types
            raise CheckpointError(
                f"cannot load the model weights in {str(root)!r}: {_one_line(e)}"
            ) from e
    missing = set(loading.get("missing_keys", ()) or ())
    for absent in info.get("absent_submodules", ()) or ():
        owner_path, _, attr = absent.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            continue
        child = owner._modules.get(attr)
        if child is None:
            continue
        names = {f"{absent}.{n}" for n, _ in child.named_parameters()}
        names |= {f"{absent}.{n}" for n, _ in child.named_buffers()}
        if names and names <= missing:  # only drop what the checkpoint does not have
            delattr(owner, attr)
            setattr(owner, attr, None)
            missing -= names
    if missing:
        shown = sorted(missing)
        raise CheckpointError(
            f"the weights in {str(root)!r} lack {len(shown)} tensor(s) of "
            f"{cls.__name__}: {shown[:5]}{' ...' if len(shown) > 5 else ''}"
        )
    if device is not None:
        model = model.to(device)
    return model.eval()


def load(path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> nn.Module:
    """The optimized model saved in the converted checkpoint ``path``.

    Args:
        path: a directory written by :func:`save` (or ``attnopt convert``).
        device: where to put the model (default: where ``from_pretrained`` puts it, CPU).

    Returns:
        An :class:`attnopt.OptimizedModule` with the recorded variant at every site and
        the saved variant parameters.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or incomplete, or the rebuilt
            model does not have the recorded sites (or a recorded rewrite no longer
            applies).
    """
    import attnopt
    from attnopt.config import config_from_dict

    root = Path(path)
    meta = read_metadata(root)
    params = _read_params(root, meta)  # file checks before the (slower) rebuild
    model = load_hf_model(root, device=device, meta=meta)
    recorded = {s["name"]: s for s in meta["sites"]}
    policy: dict[Any, Any] = {}
    for name, s in recorded.items():
        try:
            config = config_from_dict(s["config"]) if s["config"] is not None else None
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{str(root / ATTNOPT_JSON)!r}: bad config for site {name!r}: {_one_line(e)}"
            ) from None
        policy[re.compile(f"^{re.escape(name)}$")] = config
    try:
        optimized = attnopt.optimize(model, policy, measure=False)
    except ValueError as e:
        raise CheckpointError(f"cannot rebuild {str(root)!r}: {_one_line(e)}") from e
    _check_sites(root, recorded, _site_results(optimized))
    _load_params(root, params, optimized)
    return optimized


def _check_sites(root: Path, recorded: dict[str, Any], results: list[Any]) -> None:
    found = {r.name: r for r in results}
    missing = sorted(set(recorded) - set(found))
    extra = sorted(set(found) - set(recorded))
    if missing or extra:
        raise CheckpointError(
            f"the model rebuilt from {str(root)!r} does not match its {ATTNOPT_JSON}: "
            f"recorded sites not found: {missing}; sites found but not recorded: {extra}"
        )
    for name, s in recorded.items():
        r = found[name]
        if bool(s.get("applied")) and not r.applied:
            raise CheckpointError(
                f"site {name!r} of {str(root)!r} was saved rewritten but cannot be rewritten "
                f"now: {r.reason}"
            )
        if not s.get("applied") and r.applied:
            raise CheckpointError(
                f"site {name!r} of {str(root)!r} was saved unchanged ({s.get('reason')!r}) but "
                f"is rewritten now"
            )


def _read_params(root: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The saved variant tensors (checked against the recorded digest), None if none."""
    params_meta = meta.get("parameters")
    if not params_meta:
        return None
    if not isinstance(params_meta, dict):
        raise CheckpointError(
            f"{str(root / ATTNOPT_JSON)!r} is corrupt: parameters={params_meta!r}"
        )
    file = root / Path(str(params_meta.get("file", PARAMS_FILE))).name
    if not file.is_file():
        raise CheckpointError(f"{str(root)!r} is incomplete: {file.name} is missing")
    digest = params_meta.get("sha256")
    if digest and _sha256(file) != digest:
        raise CheckpointError(f"{str(file)!r} is corrupt: its sha256 does not match {ATTNOPT_JSON}")
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{str(file)!r} is corrupt: {_one_line(e)}") from e


def _load_params(root: Path, state: dict[str, torch.Tensor] | None, optimized: nn.Module) -> None:
    modules = optimized.attnopt_params
    expected = set(modules.state_dict())
    if state is None:
        if expected:
            raise CheckpointError(
                f"{str(root)!r} records no variant parameters, but its variants own "
                f"{len(expected)} tensor(s): {sorted(expected)[:5]}"
            )
        return
    if set(state) != expected:
        raise CheckpointError(
            f"{str(root / PARAMS_FILE)!r} does not fit the rebuilt variants: missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    try:
        modules.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{str(root / PARAMS_FILE)!r} does not fit the rebuilt variants: {_one_line(e)}"
        ) from e


def _model_class(transformers: Any, info: dict[str, Any], hf_config: Any) -> Any:
    # Only classes from the transformers namespace: a checkpoint never names code to import.
    candidates = [info.get("class"), *(getattr(hf_config, "architectures", None) or [])]
    for name in candidates:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    auto = info.get("auto_class")
    if isinstance(auto, str) and auto.startswith("Auto") and hasattr(transformers, auto):
        return getattr(transformers, auto)
    return transformers.AutoModel


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dev installs have it
        raise ImportError(
            "loading a Hugging Face checkpoint needs transformers: pip install 'attnopt[hf]'"
        ) from e
    return transformers


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    # from_pretrained logs the weights it initialised; load() checks that itself.
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
