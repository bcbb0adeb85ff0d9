"""The ``attnopt`` command line: inspect, convert, export, build-engine, bench, demo.

Why a CLI at all: the path from a pretrained checkpoint to a deployable file (find the
attention, rewrite it, save, export to ONNX, build a TensorRT engine) is a sequence of
steps people run on machines without a notebook; each subcommand is one step, renders
the reports the library returns (passes never print), and fails with one clear line.

Conventions: results go to stdout (``--json`` where a script wants them), progress to
stderr. Exit status 0 on success, 1 when a step fails (missing or corrupt checkpoint,
output exists, no attention found, verification failed, TensorRT missing), 2 for usage
errors (unknown variant or option, bad option value). No tracebacks unless ``--verbose``.

``MODEL`` is a local directory (a Hugging Face ``save_pretrained`` directory or an
attnopt converted checkpoint) or a built-in tiny model name (:mod:`attnopt.zoo`).

Other modules add subcommands with :func:`register_subcommand`; modules named in
:data:`COMMAND_MODULES` have their ``add_command(subparsers)`` called when the parser is
built (where installed):

>>> from attnopt import cli
>>> @cli.register_subcommand
... def _add_hello(subparsers):
...     p = subparsers.add_parser("hello", help="say hello")
...     p.set_defaults(handler=lambda args, log: print("hello") or 0)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMAND_MODULES", "CLIError", "main", "register_subcommand"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# Modules whose ``add_command(subparsers)`` adds further subcommands (imported when the
# parser is built, skipped where not installed).
COMMAND_MODULES: list[str] = ["attnopt.distill.cli"]

_REGISTRARS: list[Callable[[Any], None]] = []


class CLIError(Exception):
    """A failure the CLI reports as one line and an exit status (1 failure, 2 usage)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def register_subcommand(registrar: Callable[[Any], None]) -> Callable[[Any], None]:
    """Add a subcommand: ``registrar(subparsers)`` calls ``subparsers.add_parser(...)`` and
    sets ``handler=f(args, log) -> int`` with ``set_defaults``. Usable as a decorator."""
    if registrar not in _REGISTRARS:
        _REGISTRARS.append(registrar)
    return registrar


# -- output helpers ---------------------------------------------------------------------


class _Log:
    """Step log on stderr: ``[n] what ...`` when a step starts, its time when it ends."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.count = 0

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"attnopt: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        self.count += 1
        self.info(f"[{self.count}] {message} ...")
        start = time.perf_counter()
        yield
        self.info(f"[{self.count}] done in {time.perf_counter() - start:.1f} s")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(x) for x in header]] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(cells[0], widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in cells[1:]]
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    return " ".join((text or type(e).__name__).split())


# -- parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


def _variant_configs() -> dict[str, type]:
    """CLI variant name (``sliding-window``) → config class, for every registered variant."""
    import attnopt  # noqa: F401  (imports every variant package, registering them)
    from attnopt.kernels import registered_variants

    return {cls.variant.replace("_", "-"): cls for cls in registered_variants()}


def _variant_fields() -> dict[str, dict[str, dataclasses.Field]]:
    return {
        name: {f.name: f for f in dataclasses.fields(cls)}
        for name, cls in _variant_configs().items()
    }


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_variant_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    fields = _variant_fields()
    p.add_argument(
        "--variant",
        required=required,
        choices=sorted(fields),
        help="the attention variant to apply at every selected site",
    )
    g = p.add_argument_group(
        "variant options", "settings of the chosen --variant (names as in its config class)"
    )
    by_name: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for variant, fs in fields.items():
        for f in fs.values():
            by_name.setdefault(f.name, []).append((variant, f))
    for name in sorted(by_name):
        uses = by_name[name]
        is_bool = any("bool" in str(f.type) for _, f in uses)
        help_text = "; ".join(f"{v}: {f.type}" + _default_text(f) for v, f in uses)
        kwargs: dict[str, Any] = {"nargs": "?", "const": "true"} if is_bool else {}
        g.add_argument(
            _flag(name), dest=f"opt_{name}", default=None, metavar="V", help=help_text, **kwargs
        )


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return " (required)"
    return f" (default {f.default!r})"


def _parse_scalar(text: str, kind: str) -> Any:
    if kind == "bool":
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "str":
        return text
    raise ValueError(text)


def _parse_value(text: str, type_text: str) -> Any:
    """``text`` as a value of the annotation ``type_text`` (``int | tuple[int, ...]``):
    ``none`` for None, comma-separated items for tuples, else the first scalar that fits."""
    alternatives = [a.strip() for a in str(type_text).split("|")]
    value = text.strip()
    if value.lower() == "none" and "None" in alternatives:
        return None
    tuples = [a for a in alternatives if a.startswith("tuple[")]
    if "," in value and tuples:
        kind = tuples[0][len("tuple[") :].split(",")[0].strip()
        return tuple(_parse_scalar(x.strip(), kind) for x in value.split(",") if x.strip())
    for kind in ("bool", "int", "float", "str"):
        if kind in alternatives:
            with contextlib.suppress(ValueError):
                return _parse_scalar(value, kind)
    if tuples:
        kind = tuples[0][len("tuple[") :].split(",")[0].strip()
        with contextlib.suppress(ValueError):
            return (_parse_scalar(value, kind),)
    raise ValueError(f"expected {type_text}")


def _config_from_args(args: argparse.Namespace) -> Any:
    """The variant config named by ``--variant`` and its options (exit 2 when wrong)."""
    configs = _variant_configs()
    name = args.variant
    cls = configs[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {
        key[len("opt_") :]: value
        for key, value in vars(args).items()
        if key.startswith("opt_") and value is not None
    }
    valid = ", ".join(_flag(f) for f in fields) or "none"
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise CLIError(
            f"{', '.join(_flag(u) for u in unknown)} does not apply to --variant {name}; "
            f"its options: {valid}",
            EXIT_USAGE,
        )
    kwargs = {}
    for key, text in given.items():
        try:
            kwargs[key] = _parse_value(text, fields[key].type)
        except ValueError as e:
            raise CLIError(
                f"{_flag(key)} {text!r} is not valid for --variant {name}: {e}", EXIT_USAGE
            ) from None
    missing = [
        f for f, fd in fields.items() if fd.default is dataclasses.MISSING and f not in kwargs
    ]
    if missing:
        raise CLIError(f"--variant {name} needs {', '.join(_flag(m) for m in missing)}", EXIT_USAGE)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CLIError(
            f"invalid options for --variant {name}: {_one_line(e)}", EXIT_USAGE
        ) from None


def _seq_range(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise argparse.ArgumentTypeError(
            f"expected three integers min,opt,max with 1 <= min <= opt <= max, got {text!r}"
        )
    return parts  # type: ignore[return-value]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# -- models -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    spec: str
    kind: str  # "tiny", "hf" or "converted"
    path: Path | None = None


def _source(spec: str) -> _Source:
    """What ``MODEL`` names, checked without loading anything heavy."""
    from attnopt import checkpoint
    from attnopt.zoo import TINY_MODELS

    path = Path(spec)
    if path.is_dir():
        if checkpoint.is_checkpoint(path):
            try:
                checkpoint.read_metadata(path)
            except checkpoint.CheckpointError as e:
                raise CLIError(str(e)) from None
            return _Source(spec, "converted", path)
        if (path / "config.json").is_file():
            return _Source(spec, "hf", path)
        raise CLIError(
            f"MODEL {spec!r} is a directory without config.json or attnopt.json: neither a "
            f"Hugging Face checkpoint nor an attnopt converted checkpoint"
        )
    if path.exists():
        raise CLIError(f"MODEL {spec!r} is a file; expected a checkpoint directory")
    if spec in TINY_MODELS:
        return _Source(spec, "tiny")
    raise CLIError(
        f"MODEL {spec!r}: no such checkpoint directory, and not a built-in tiny model "
        f"(built-in: {', '.join(sorted(TINY_MODELS))})"
    )


def _load_original(src: _Source) -> Any:
    from attnopt import checkpoint
    from attnopt.zoo import tiny_model

    if src.kind == "tiny":
        return tiny_model(src.spec)
    meta = checkpoint.read_metadata(src.path) if src.kind == "converted" else None
    try:
        return checkpoint.load_hf_model(src.path, meta=meta)
    except checkpoint.CheckpointError as e:
        raise CLIError(str(e)) from None


def _load_converted(path: Path) -> Any:
    from attnopt import checkpoint

    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise CLIError(str(e)) from None


def _random_inputs(model: Any, *, batch: int, seq_len: int, seed: int) -> dict[str, Any]:
    from attnopt.capture import CaptureError, example_inputs_for

    try:
        return example_inputs_for(model, batch=batch, seq_len=seq_len, seed=seed)
    except CaptureError as e:
        raise CLIError(_one_line(e)) from None


def _no_attention(spec: str) -> CLIError:
    return CLIError(
        f"no attention found in MODEL {spec!r}: attnopt looks for scaled_dot_product_attention "
        f"and softmax(q @ k^T) @ v in the model's forward"
    )


def _optimize(model: Any, config: Any, spec: str, **kwargs: Any) -> Any:
    import attnopt

    try:
        return attnopt.optimize(model, config, **kwargs)
    except ValueError as e:
        if "no attention found" in str(e):
            raise _no_attention(spec) from None
        raise


def _refuse_existing(path: Path, force: bool, what: str) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise CLIError(f"{what} {str(path)!r} already exists; pass --force to replace it")


def _max_diff(reference: Any, actual: Any) -> Any:
    from attnopt.report import compare_outputs

    return compare_outputs(reference, actual)


def _run(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs)


def _site_table(sites: Sequence[Any]) -> str:
    rows = [
        (
            s.name,
            s.module_type.rsplit(".", 1)[-1],
            ("cross" if s.cross else "self") + f" ({s.spelling})",
            f"{s.num_heads}/{s.num_kv_heads}",
            s.head_dim,
            s.mask_description,
        )
        for s in sites
    ]
    return _table(("site", "module", "kind", "heads/kv", "head dim", "mask"), rows)


# -- inspect ----------------------------------------------------------------------------


def _cmd_inspect(args: argparse.Namespace, log: _Log) -> int:
    import attnopt

    src = _source(args.model)
    if src.kind == "converted":
        with log.step(f"loading the converted checkpoint {args.model}"):
            optimized = _load_converted(src.path)
        report = optimized.report
        if args.json:
            out = {"model": args.model, "converted": True, **report.to_dict()}
            print(json.dumps(out, indent=2, default=str))
        else:
            print(_site_table([r.site for r in report.sites]))
            print()
            print(report)
        return EXIT_OK
    with log.step(f"loading {args.model}"):
        model = _load_original(src)
    with log.step("finding attention"):
        sites = attnopt.find_attention(model)
    if not sites:
        raise _no_attention(args.model)
    if args.json:
        out = {"model": args.model, "converted": False, "sites": [s.to_dict() for s in sites]}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(_site_table(sites))
        print(f"{len(sites)} attention site(s) in {type(model).__name__}")
    return EXIT_OK


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list the attention sites of a model")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or built-in tiny model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_inspect)


# -- convert ----------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace, log: _Log) -> int:
    from attnopt import checkpoint

    config = _config_from_args(args)
    out = Path(args.output)
    _refuse_existing(out, args.force, "output")
    src = _source(args.model)
    if src.kind == "converted":
        log.info(f"{args.model} is a converted checkpoint: converting its original model")
    with log.step(f"loading {args.model}"):
        model = _load_original(src)
    inputs = _random_inputs(model, batch=2, seq_len=args.seq_len, seed=0)
    with log.step(f"rewriting attention into {config.describe()}"):
        optimized = _optimize(model, config, args.model, example_inputs=inputs, layers=args.layers)
    with log.step("comparing with the original on fresh random inputs"):
        fresh = _random_inputs(model, batch=2, seq_len=args.seq_len, seed=1)
        diff = _max_diff(_run(model, fresh), _run(optimized, fresh))
    with log.step(f"writing {out}"):
        try:
            checkpoint.save(optimized, out, force=args.force, tokenizer=src.path)
        except FileExistsError as e:
            raise CLIError(str(e)) from None
    print(optimized.report)
    print(
        f"max |optimized - original| on fresh random inputs (batch 2, seq {args.seq_len}): {diff}"
    )
    print(f"wrote {out}")
    if not optimized.report.applied:
        log.info("warning: no site was rewritten (see the reasons above)")
    return EXIT_OK


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="rewrite a model's attention and save a checkpoint")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or built-in tiny model")
    _add_variant_options(p, required=True)
    p.add_argument(
        "--layers",
        action="append",
        metavar="PATTERN",
        help="only rewrite sites whose name matches this glob (repeatable)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="length of the random inputs")
    p.set_defaults(handler=_cmd_convert)


# -- export -----------------------------------------------------------------------------


def _onnx_exporter() -> Any:
    try:
        module = importlib.import_module("attnopt.exporters.onnx")
    except ImportError as e:
        raise CLIError(
            f"ONNX export is unavailable: {_one_line(e)} (pip install 'attnopt[onnx]')"
        ) from None
    if not callable(getattr(module, "export_onnx", None)):
        raise CLIError("ONNX export is unavailable: attnopt.exporters.onnx has no export_onnx")
    return module


def _export(optimized: Any, path: Path, *, opset: int | None, dynamic_seq: bool) -> Any:
    module = _onnx_exporter()
    verification_error = getattr(module, "ExportVerificationError", None)
    try:
        report = module.export_onnx(
            optimized, path, opset=opset, dynamic_seq=dynamic_seq, verify=True
        )
    except Exception as e:  # noqa: BLE001 - the exporter's failures are reported, not traced
        if isinstance(verification_error, type) and isinstance(e, verification_error):
            raise CLIError(f"ONNX export verification failed: {_one_line(e)}") from e
        raise CLIError(f"ONNX export to {str(path)!r} failed: {_one_line(e)}") from e
    if getattr(report, "passed", True) is False or getattr(report, "ok", True) is False:
        raise CLIError(f"ONNX export verification failed for {str(path)!r}: {report}")
    return report


def _cmd_export(args: argparse.Namespace, log: _Log) -> int:
    src = _source(args.checkpoint)
    if src.kind != "converted":
        raise CLIError(
            f"export takes a converted checkpoint (from `attnopt convert ... -o OUT`); "
            f"{args.checkpoint!r} has no attnopt.json"
        )
    onnx_path = Path(args.onnx)
    _refuse_existing(onnx_path, args.force, "ONNX file")
    _onnx_exporter()  # fail before loading when it is missing
    with log.step(f"loading {args.checkpoint}"):
        optimized = _load_converted(src.path)
    with log.step(f"exporting to {onnx_path} and verifying in onnxruntime"):
        report = _export(optimized, onnx_path, opset=args.opset, dynamic_seq=not args.static_seq)
    print(report)
    if str(onnx_path) not in str(report):
        print(f"wrote {onnx_path}")
    return EXIT_OK


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a converted checkpoint to ONNX (verified)")
    p.add_argument("checkpoint", metavar="OUT", help="a converted checkpoint directory")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset")
    p.add_argument("--static-seq", action="store_true", help="fix the sequence length")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=_cmd_export)


# -- build-engine -----------------------------------------------------------------------


def _preflight_or_fail(onnx_path: Path) -> None:
    from attnopt.exporters.tensorrt import preflight

    try:
        unsupported = preflight(onnx_path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise CLIError(_one_line(e)) from None
    if unsupported:
        rows = [
            (u.domain or "ai.onnx", u.op_type, u.opset, len(u.nodes), u.reason) for u in unsupported
        ]
        print(_table(("domain", "op", "opset", "nodes", "reason"), rows), file=sys.stderr)
        raise CLIError(
            f"{str(onnx_path)!r} has {len(unsupported)} operator type(s) TensorRT's ONNX parser "
            f"does not support (listed above); no build was started"
        )


def _build(args: argparse.Namespace, onnx_path: Path, engine: Path) -> Any:
    from attnopt.exporters import tensorrt as trt_exporter

    try:
        return trt_exporter.build_engine(
            onnx_path,
            engine,
            fp16=args.fp16,
            bf16=args.bf16,
            seq_range=args.seq_range,
            batch_range=args.batch_range,
            workspace_gb=args.workspace_gb,
            timing_cache=args.timing_cache,
        )
    except trt_exporter.TensorRTUnavailable as e:
        raise CLIError(_one_line(e)) from None
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"engine build failed: {_one_line(e)}") from None


def _cmd_build_engine(args: argparse.Namespace, log: _Log) -> int:
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise CLIError(f"FILE {args.onnx!r} does not exist")
    engine = Path(args.output)
    _refuse_existing(engine, args.force, "engine")
    with log.step(f"pre-flight: checking the operators of {onnx_path} against TensorRT"):
        _preflight_or_fail(onnx_path)
    with log.step(f"building the TensorRT engine {engine}"):
        report = _build(args, onnx_path, engine)
    print(report)
    return EXIT_OK


def _add_build_engine(sub: Any) -> None:
    p = sub.add_parser("build-engine", help="pre-flight an ONNX file and build a TensorRT engine")
    p.add_argument("onnx", metavar="FILE", help="the .onnx file")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write")
    p.add_argument(
        "--fp16", action=argparse.BooleanOptionalAction, default=True, help="allow fp16 kernels"
    )
    p.add_argument("--bf16", action="store_true", help="allow bf16 kernels")
    p.add_argument(
        "--seq-range",
        type=_seq_range,
        default=(1, 512, 2048),
        metavar="MIN,OPT,MAX",
        help="sequence lengths of the optimisation profile (default 1,512,2048)",
    )
    p.add_argument(
        "--batch-range",
        type=_seq_range,
        default=(1, 1, 1),
        metavar="MIN,OPT,MAX",
        help="batch sizes of the optimisation profile (default 1,1,1)",
    )
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (GiB)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="timing cache file")
    p.add_argument("--force", action="store_true", help="replace ENGINE if it exists")
    p.set_defaults(handler=_cmd_build_engine)


# -- bench ------------------------------------------------------------------------------


def _time_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (first calls may capture or allocate)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _onnxruntime_run(onnx_path: Path, inputs: dict[str, Any], repeat: int) -> tuple[float, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise CLIError("--onnx needs onnxruntime: pip install 'attnopt[onnx]'") from None
    import numpy as np
    import torch

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CLIError(f"onnxruntime cannot load {str(onnx_path)!r}: {_one_line(e)}") from None
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CLIError(f"{str(onnx_path)!r} takes inputs {names}; bench provides {sorted(inputs)}")
    feed = {
        n: inputs[n].numpy() if isinstance(inputs[n], torch.Tensor) else np.asarray(inputs[n])
        for n in names
    }
    outputs = session.run(None, feed)
    ms = _time_ms(lambda: session.run(None, feed), repeat)
    return ms, torch.from_numpy(np.asarray(outputs[0]))


def _first_tensor(output: Any) -> Any:
    import torch

    from attnopt._compat import pytree

    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise CLIError("the model returned no tensor to compare")


def _cmd_bench(args: argparse.Namespace, log: _Log) -> int:
    config = _config_from_args(args)
    onnx_path = Path(args.onnx) if args.onnx else None
    if onnx_path is not None and not onnx_path.is_file():
        raise CLIError(f"--onnx {args.onnx!r} does not exist")
    src = _source(args.model)
    with log.step(f"loading {args.model}"):
        model = _load_original(src)
    with log.step(f"rewriting attention into {config.describe()}"):
        optimized = _optimize(model, config, args.model, layers=args.layers, measure=False)
    inputs = _random_inputs(model, batch=args.batch, seq_len=args.seq_len, seed=1)
    import torch

    rows = []
    timing = f"timing torch (batch {args.batch}, seq {args.seq_len}, {args.repeat} runs)"
    with log.step(timing), torch.no_grad():
        reference = model(**inputs)
        base_ms = _time_ms(lambda: model(**inputs), args.repeat)
        actual = optimized(**inputs)
        opt_ms = _time_ms(lambda: optimized(**inputs), args.repeat)
    err = _max_diff(reference, actual)
    rows.append(("torch original", base_ms, None))
    rows.append((f"torch {config.describe()}", opt_ms, err))
    if onnx_path is not None:
        with log.step(f"timing onnxruntime on {onnx_path}"):
            ort_ms, ort_out = _onnxruntime_run(onnx_path, inputs, args.repeat)
        ref0 = _first_tensor(reference)
        if tuple(ort_out.shape) != tuple(ref0.shape):
            raise CLIError(
                f"{str(onnx_path)!r}'s first output has shape {tuple(ort_out.shape)}, the "
                f"model's {tuple(ref0.shape)}: not an export of this model"
            )
        rows.append((f"onnxruntime {onnx_path.name}", ort_ms, _max_diff(ref0, ort_out)))
    if args.json:
        out = [
            {
                "backend": name,
                "ms": ms,
                "speedup": base_ms / ms if ms > 0 else None,
                "max_abs": e.max_abs if e else None,
                "max_rel": e.max_rel if e else None,
            }
            for name, ms, e in rows
        ]
        print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "rows": out}, indent=2))
        return EXIT_OK
    table_rows = [
        (
            name,
            f"{ms:.2f}",
            f"{base_ms / ms:.2f}x" if ms > 0 else "-",
            f"{e.max_abs:.3e}" if e else "-",
            f"{e.max_rel:.3e}" if e else "-",
        )
        for name, ms, e in rows
    ]
    print(f"{args.model}, batch {args.batch}, seq {args.seq_len}, median of {args.repeat} runs")
    print(_table(("backend", "ms", "speedup", "max abs diff", "max rel diff"), table_rows))
    return EXIT_OK


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="time and compare original vs optimized (and ONNX)")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or built-in tiny model")
    _add_variant_options(p, required=True)
    p.add_argument("--layers", action="append", metavar="PATTERN", help="sites to rewrite")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="sequence length")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size")
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed runs (median)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="also time this ONNX file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_bench)


# -- demo -------------------------------------------------------------------------------


def _tensorrt_status() -> str | None:
    """None when an engine can be built here, else why not."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'attnopt[tensorrt]', NVIDIA GPU only)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _compare_engine(engine: Path, onnx_path: Path, inputs: dict[str, Any]) -> Any:
    import onnxruntime as ort

    from attnopt.exporters.tensorrt import compare_engine_to_onnxruntime

    names = {i.name for i in ort.InferenceSession(str(onnx_path)).get_inputs()}
    return compare_engine_to_onnxruntime(
        engine, onnx_path, {k: v for k, v in inputs.items() if k in names}
    )


def _cmd_demo(args: argparse.Namespace, log: _Log) -> int:
    import attnopt
    from attnopt import checkpoint
    from attnopt.zoo import tiny_model

    keep = Path(args.keep) if args.keep else None
    if keep is not None:
        _refuse_existing(keep, args.force, "--keep directory")
    config = attnopt.SlidingWindow(window=args.window, sinks=2)
    with log.step(f"building the tiny random-weight model {args.model}"):
        model = tiny_model(args.model)
    with log.step("inspect: finding attention"):
        sites = attnopt.find_attention(model)
    print(f"== inspect {args.model}")
    print(_site_table(sites))
    work = Path(tempfile.mkdtemp(prefix="attnopt-demo-"))
    try:
        ckpt = work / "checkpoint"
        with log.step(f"convert: {config.describe()}"):
            optimized = _optimize(model, config, args.model)
            checkpoint.save(optimized, ckpt)
        print(f"\n== convert -> {keep / 'checkpoint' if keep else 'a temporary checkpoint'}")
        print(optimized.report)
        with log.step("compare: loading the checkpoint back, fresh random inputs"):
            loaded = checkpoint.load(ckpt)
            fresh = _random_inputs(model, batch=2, seq_len=args.seq_len, seed=1)
            ref = _run(model, fresh)
            vs_memory = _max_diff(_run(optimized, fresh), _run(loaded, fresh))
            vs_original = _max_diff(ref, _run(loaded, fresh))
        print(f"\n== compare (batch 2, seq {args.seq_len})")
        print(f"loaded vs in-memory optimized: {vs_memory}")
        print(f"loaded vs original:            {vs_original}")
        if vs_memory.max_abs > 1e-5:
            raise CLIError(f"the loaded checkpoint differs from the in-memory model: {vs_memory}")
        print("\n== export to ONNX, verified in onnxruntime")
        onnx_path = work / "model.onnx"
        try:
            _onnx_exporter()
        except CLIError as e:
            print(f"skipped: {e}")
            onnx_path = None
        if onnx_path is not None:
            with log.step("export: ONNX + onnxruntime verification"):
                print(_export(loaded, onnx_path, opset=None, dynamic_seq=True))
        print("\n== TensorRT engine")
        if onnx_path is None:
            print("skipped: no ONNX file to build from")
        else:
            from attnopt.exporters.tensorrt import preflight

            unsupported = preflight(onnx_path)
            if unsupported:
                print("pre-flight: operators TensorRT's ONNX parser does not support:")
                for u in unsupported:
                    print(f"  {u}")
            else:
                print("pre-flight: TensorRT 10's ONNX parser supports every operator in the file")
            reason = _tensorrt_status()
            if reason is not None:
                print(f"skipped the build: {reason}")
            elif unsupported:
                raise CLIError("the exported file cannot be built with TensorRT (see above)")
            else:
                with log.step("build-engine: TensorRT build and comparison with onnxruntime"):
                    ns = argparse.Namespace(
                        fp16=False,
                        bf16=False,
                        seq_range=(1, args.seq_len, 4 * args.seq_len),
                        batch_range=(1, 2, 4),
                        workspace_gb=1.0,
                        timing_cache=None,
                    )
                    engine = work / "model.engine"
                    print(_build(ns, onnx_path, engine))
                    print(_compare_engine(engine, onnx_path, fresh))
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            if keep.exists():
                shutil.rmtree(keep)
            shutil.move(str(work), str(keep))
            print(f"\nkept the files in {keep}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo finished")
    return EXIT_OK


def _add_demo(sub: Any) -> None:
    from attnopt.zoo import TINY_MODELS

    p = sub.add_parser("demo", help="the whole path on a built-in tiny model, no downloads")
    p.add_argument("--model", default="tiny-llama", choices=sorted(TINY_MODELS))
    p.add_argument("--window", type=_positive_int, default=8, help="sliding window size")
    p.add_argument("--seq-len", type=_positive_int, default=48, help="random input length")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the files in DIR")
    p.add_argument("--force", action="store_true", help="replace --keep DIR if it exists")
    p.set_defaults(handler=_cmd_demo)


for _registrar in (
    _add_inspect,
    _add_convert,
    _add_export,
    _add_build_engine,
    _add_bench,
    _add_demo,
):
    register_subcommand(_registrar)


# -- main -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``attnopt`` parser with every registered subcommand."""
    extra = []
    for name in COMMAND_MODULES:
        try:
            extra.append(importlib.import_module(name).add_command)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    parser = _Parser(
        prog="attnopt",
        description="Find the attention in a PyTorch model and rewrite it into cheaper variants.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="show warnings and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for registrar in [*_REGISTRARS, *extra]:
        registrar(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnopt`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        with _quiet(verbose):
            parser = build_parser()
            args = parser.parse_args(argv)
            return int(args.handler(args, _Log(args.quiet)) or 0)
    except CLIError as e:
        _report_error(str(e))
        return e.code
    except KeyboardInterrupt:
        _report_error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback (unless --verbose)
        if verbose:
            raise
        _report_error(f"{type(e).__name__}: {_one_line(e)}")
        return EXIT_FAILURE


def _report_error(message: str) -> None:
    print(f"attnopt: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Library warnings and transformers' own progress bars off unless --verbose (the CLI
    logs its steps itself); everything is restored afterwards."""
    if verbose:
        yield
        return
    # torch.export reports shape specialisations through logging, not warnings.
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is optional
        hf_logging = None
    if hf_logging is not None:
        hf_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_state[0])
            if hf_state[1]:
                hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
