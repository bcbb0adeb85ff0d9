"""ONNX export of an optimized model that keeps each site's variant, and proves it.

Exporters in this field either refuse custom attention or quietly write plain full
attention into the file, so a sliding window that was the whole point of a
conversion vanishes on deployment. :func:`export_onnx` instead translates every
``attnopt::`` op into standard ONNX operators with the variant's own cost (see
:mod:`attnopt.exporters._onnx_ops`; block-sparse, neighborhood and agent attention
come from :mod:`attnopt.exporters.onnx_sparse`), refuses an op it cannot translate,
records every site's settings in the file's metadata, runs the file in onnxruntime
against the PyTorch model at two fresh sequence lengths, and checks, running it at a
long length, that no windowed, linear or sparse site holds an ``N × N`` tensor.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnopt._compat import OpOverload, pytree

__all__ = [
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "LengthCheck",
    "SiteExport",
    "export_onnx",
    "onnx_translations",
]

# Variants whose point is to avoid an N x N tensor (the shape check fails them if one exists).
_SUBQUADRATIC = {
    "sliding_window",
    "linear",
    "hybrid",
    "block_sparse",
    "neighborhood",
    "agent",
}
_DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
_HALF_TOLERANCE = 2e-2


class ExportError(RuntimeError):
    """The model cannot be exported as asked (no translation, export failure, bad file)."""


class ExportVerificationError(ExportError):
    """The exported file does not reproduce the PyTorch model within the tolerance, or a
    sub-quadratic site lost its structure in the file. No file is written."""


@dataclasses.dataclass(frozen=True)
class LengthCheck:
    """onnxruntime vs PyTorch at one sequence length (``max_rel = max_abs / max|ref|``)."""

    seq_len: int | None
    max_abs: float
    max_rel: float
    provider: str


@dataclasses.dataclass(frozen=True)
class SiteExport:
    """One attention site in the exported file.

    ``op``: the ``attnopt::`` op the site runs as (None when it was left as it was).
    ``quadratic``: whether a value computed by the site's translation has two
    dimensions ``>= check_length`` at ``check_length`` (None when not checked);
    ``largest``: that value's shape (the largest such one, else the largest value).
    """

    name: str
    variant: dict[str, Any] | None
    applied: bool
    op: str | None
    onnx_nodes: int
    quadratic: bool | None
    largest: tuple[int, ...] | None


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it.

    Attributes:
        path: the file written.
        opset: the default-domain opset of the file.
        dynamic_seq: whether the sequence dimension is dynamic.
        export_seq_len: sequence length of the inputs the graph was exported with.
        sites: one :class:`SiteExport` per attention site.
        check_length: the length the shape check ran at (None: not run).
        checks: one :class:`LengthCheck` per verified length (empty without verify).
        tolerance: the relative-error bound verification used.
        metadata: the ``metadata_props`` written into the file.
    """

    path: str
    opset: int
    dynamic_seq: bool
    export_seq_len: int | None
    sites: list[SiteExport]
    check_length: int | None = None
    checks: list[LengthCheck] = dataclasses.field(default_factory=list)
    tolerance: float | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def max_abs(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((c.max_rel for c in self.checks), default=None)

    @property
    def verified(self) -> bool:
        return bool(self.checks)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["max_abs"], out["max_rel"] = self.max_abs, self.max_rel
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [("site", "variant", "op", "nodes", f"N×N at {self.check_length}")]
        for s in self.sites:
            variant = s.variant.get("variant", "?") if s.variant and s.applied else "-"
            quad = "-" if s.quadratic is None else ("yes" if s.quadratic else "no")
            if s.largest is not None and s.quadratic is not None:
                quad += f" (largest {list(s.largest)})"
            rows.append((s.name, variant, s.op or "-", str(s.onnx_nodes), quad))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"wrote {self.path} (opset {self.opset}, dynamic sequence: {self.dynamic_seq})"
        )
        for c in self.checks:
            lines.append(
                f"onnxruntime ({c.provider}) vs PyTorch at length {c.seq_len}: max abs diff "
                f"{c.max_abs:.3e} (relative {c.max_rel:.3e}, tolerance {self.tolerance:.1e})"
            )
        if not self.checks:
            lines.append("not verified (verify=False)")
        return "\n".join(lines)


# -- the translation table ----------------------------------------------------------------------


@functools.cache
def _ort_has_attention() -> bool:
    """Whether the installed onnxruntime runs the opset-23 ``Attention`` op (on CPU)."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkv"]
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, 3, 3]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])
        node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=0.5)
        graph = helper.make_graph([node], "probe", inputs, [out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        model.ir_version = min(model.ir_version, onnx.IR_VERSION)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.ones((1, 2, 3, 4), np.float32)
        sess.run(None, {"q": x, "k": x, "v": x, "m": np.tril(np.ones((1, 1, 3, 3), bool))})
        return True
    except Exception:
        return False


def onnx_translations(opset: int | None = None) -> dict[OpOverload, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export``: every ``attnopt::``
    op with an ONNX translation, for ``opset`` (Dense uses the ``Attention`` operator
    from opset 23 when onnxruntime runs it). Block-sparse, neighborhood and agent
    attention come from :mod:`attnopt.exporters.onnx_sparse` when it is importable.

    Example:
        >>> import torch
        >>> torch.ops.attnopt.sliding_window_attention.default in onnx_translations()
        True
    """
    import attnopt.kernels.dense  # noqa: F401  (registers the ops)
    import attnopt.kernels.hybrid  # noqa: F401
    import attnopt.kernels.linear  # noqa: F401
    import attnopt.kernels.sliding_window  # noqa: F401
    from attnopt.exporters import _onnx_ops  # here: `import attnopt` needs no onnx extra

    ops = torch.ops.attnopt
    dense = _onnx_ops.dense_attention
    if opset is not None and opset >= 23 and _ort_has_attention():
        dense = _onnx_ops.dense_attention_opset23
    table: dict[OpOverload, Callable] = {
        ops.dense_attention.default: dense,
        ops.sliding_window_attention.default: _onnx_ops.sliding_window_attention,
        ops.linear_attention.default: _onnx_ops.linear_attention,
        ops.hybrid_attention.default: _onnx_ops.hybrid_attention,
    }
    try:
        from attnopt.exporters.onnx_sparse import SPARSE_TRANSLATIONS
    except ImportError:  # written separately; absent until it lands
        SPARSE_TRANSLATIONS = {}
    table.update(SPARSE_TRANSLATIONS)
    return table


# -- arguments -----------------------------------------------------------------------------------


def _check_args(
    optimized, path, opset, dynamic_seq, verify, tolerance, verify_lengths, check_length
):
    from attnopt.api import OptimizedModule

    if not isinstance(optimized, OptimizedModule):
        raise TypeError(
            f"export_onnx: optimized must be the OptimizedModule that attnopt.optimize() "
            f"returns, got {type(optimized).__name__}"
        )
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"export_onnx: path must be a file path (str or PathLike), got {path!r}")
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"export_onnx: the directory of path {os.fspath(path)!r} does not exist ({parent})"
        )
    if os.path.isdir(os.fspath(path)):
        raise IsADirectoryError(f"export_onnx: path {os.fspath(path)!r} is a directory, not a file")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 18):
        raise ValueError(f"export_onnx: opset must be None or an int >= 18, got {opset!r}")
    for name, value in (("dynamic_seq", dynamic_seq), ("verify", verify)):
        if not isinstance(value, bool):
            raise TypeError(f"export_onnx: {name} must be a bool, got {value!r}")
    if tolerance is not None and (
        not isinstance(tolerance, (int, float))
        or isinstance(tolerance, bool)
        or not tolerance >= 0
        or not math.isfinite(tolerance)
    ):
        raise ValueError(
            f"export_onnx: tolerance must be None or a finite number >= 0 (max relative "
            f"error), got {tolerance!r}"
        )
    if check_length is not None and (
        not isinstance(check_length, int) or isinstance(check_length, bool) or check_length < 2
    ):
        raise ValueError(
            f"export_onnx: check_length must be None or an int >= 2, got {check_length!r}"
        )
    if verify_lengths is not None:
        ok = (
            isinstance(verify_lengths, (tuple, list))
            and len(verify_lengths) > 0
            and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in verify_lengths
            )
        )
        if not ok:
            raise ValueError(
                f"export_onnx: verify_lengths must be None or a non-empty sequence of positive "
                f"ints, got {verify_lengths!r}"
            )
        if not dynamic_seq:
            raise ValueError(
                "export_onnx: verify_lengths needs dynamic_seq=True (a static-length file "
                "only runs at its export length)"
            )


# -- inputs -------------------------------------------------------------------------------------


def _has_seq(t: torch.Tensor) -> bool:
    # As in capture: token-like tensors [B, N] / [B, N, C] carry the sequence in dim 1.
    return t.dim() in (2, 3)


def _dynamic_shapes(kwargs: dict[str, Any], dynamic_seq: bool) -> dict[str, Any]:
    auto = torch.export.Dim.AUTO

    def spec(value):
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 0:
            return {}
        if dynamic_seq and _has_seq(value):
            return {0: auto, 1: auto}
        return {0: auto}

    return {k: pytree.tree_map(spec, v) for k, v in kwargs.items()}


def _seq_len(kwargs: dict[str, Any]) -> int | None:
    for leaf in pytree.tree_leaves(kwargs):
        if isinstance(leaf, torch.Tensor) and _has_seq(leaf):
            return int(leaf.shape[1])
    return None


def _fresh_inputs(kwargs: dict[str, Any], length: int | None, gen: torch.Generator, vocab):
    """Random inputs shaped like ``kwargs`` with the sequence dim set to ``length``."""

    def fresh(name: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        if length is not None and _has_seq(t):
            shape[1] = length
        if t.dtype == torch.bool:
            out = torch.ones(shape, dtype=torch.bool)
        elif t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device)
        elif "mask" in name:
            out = torch.ones(shape, dtype=t.dtype)
        else:
            hi = int(t.max()) + 1 if t.numel() else 1
            if vocab and "ids" in name and "type" not in name and "position" not in name:
                hi = vocab
            return torch.randint(0, max(hi, 1), shape, generator=gen, dtype=t.dtype).to(t.device)
        # Masks: pad the end of the first row, so padding is exercised too.
        if out.dim() >= 2 and out.shape[0] > 1 and out.shape[1] > 3:
            out[0, -2:] = 0
        return out.to(t.device)

    return {k: pytree.tree_map(functools.partial(fresh, k), v) for k, v in kwargs.items()}


def _tensor_leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


# -- graph inspection ---------------------------------------------------------------------------


def _site_of_node(node: torch.fx.Node) -> str:
    """The module path of a rewritten op node: its site's name without a ``#k``."""
    stack = node.meta.get("nn_module_stack") or {}
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path or "<root>"


def _check_translations(gm: torch.fx.GraphModule, table: Mapping) -> None:
    missing = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, OpOverload):
            continue
        if target.namespace == "attnopt" and target not in table:
            missing.append(f"site {_site_of_node(node)!r} runs {target.name()}")
    if missing:
        known = ", ".join(sorted(t.name() for t in table))
        raise ExportError(
            "export_onnx: no ONNX translation for " + "; ".join(missing) + f" (translated ops: "
            f"{known}); attnopt does not fall back to dense attention in an export"
        )


def _module_path(site_name: str) -> str:
    path = site_name.split("#")[0]
    return "" if path == "<root>" else path


def _site_nodes(model_proto, site_name: str) -> list:
    """The ONNX nodes produced by the attnopt op of ``site_name`` (torch.onnx records
    the fx node and its module path in each node's metadata)."""
    path = _module_path(site_name)
    nodes = []
    for node in model_proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "torch.ops.attnopt." not in meta.get("pkg.torch.onnx.fx_node", ""):
            continue
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        if len(scopes) >= 2 and scopes[-2] == path:
            nodes.append(node)
    return nodes


def _fixed_length_shapes(model_proto, length: int | None) -> dict[str, tuple]:
    """Every value's shape by ONNX shape inference with batch 1 and sequence ``length``
    (``-1`` where inference cannot tell; it often cannot through Reshape/Range)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    del m.graph.value_info[:]
    for value in m.graph.input:
        dims = value.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_param") or not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1 if i == 0 or length is None else length
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return shapes


def _runtime_shapes(model_proto, names: list[str], feeds: dict) -> dict[str, tuple]:
    """The shapes of the values ``names`` when onnxruntime runs the model on ``feeds``
    (they are added as graph outputs of a copy). Exact, unlike shape inference."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.value_info}
    inferred = onnx.shape_inference.infer_shapes(m)
    for vi in inferred.graph.value_info:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    existing = {o.name for o in m.graph.output}
    wanted = [n for n in names if n not in existing and types.get(n)]
    for n in wanted:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    out_names = [o.name for o in session.get_outputs()]
    values = session.run(None, feeds)
    return {n: tuple(v.shape) for n, v in zip(out_names, values) if hasattr(v, "shape")}


def _shape_check(
    model_proto, groups: dict[str, Any], length: int | None, feeds: dict | None
) -> dict[str, tuple]:
    """Per site: ``(node count, quadratic, largest shape)`` at sequence ``length``.

    ``groups`` maps each site name to a key (its op and settings): sites with one key
    have the same translation, so only the first of each is measured (this keeps the
    extra outputs of a many-layer model to one layer's worth). With ``feeds`` (inputs
    at that length) the shapes are measured by running the model in onnxruntime;
    without, or if that fails, ONNX shape inference gives them, and values it cannot
    size are not counted."""
    site_nodes = {name: _site_nodes(model_proto, name) for name in groups}
    first: dict[Any, str] = {}
    for name, key in groups.items():
        first.setdefault(key, name)
    shapes: dict[str, tuple] = {}
    if length:
        values = [o for name in first.values() for n in site_nodes[name] for o in n.output]
        if feeds is not None and model_proto.ByteSize() < (1 << 31) - (1 << 24):
            try:
                shapes = _runtime_shapes(model_proto, values, feeds)
            except Exception:  # e.g. the length is past the model's position table
                shapes = {}
        if not shapes:
            shapes = _fixed_length_shapes(model_proto, length)
    measured = {name: _largest(site_nodes[name], shapes, length) for name in first.values()}
    out = {}
    for name, key in groups.items():
        nodes = site_nodes[name]
        if not length or not nodes:
            out[name] = (len(nodes), None, None)
        else:
            out[name] = (len(nodes), *measured[first[key]])
    return out


def _largest(nodes, shapes: dict[str, tuple], length: int | None):
    """``(quadratic, shape)``: whether an output of ``nodes`` has two dims >= ``length``,
    and that output's shape (else the largest output's)."""
    if not length or not nodes:
        return None, None
    quadratic, largest, size = False, None, -1
    for node in nodes:
        for value in node.output:
            shape = shapes.get(value)
            if not shape or any(d < 0 for d in shape):
                continue
            big = sum(d >= length for d in shape)
            numel = math.prod(shape)
            if big >= 2 and not quadratic:
                quadratic, largest, size = True, shape, numel
            elif (big >= 2 or not quadratic) and numel > size:
                largest, size = shape, numel
    return quadratic, tuple(int(d) for d in largest) if largest else None


# -- running ------------------------------------------------------------------------------------


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    use = []
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        use.append("CUDAExecutionProvider")
    use.append("CPUExecutionProvider")
    return use


def _compare(reference: Any, outputs: list) -> tuple[float, float]:
    ref = _tensor_leaves(reference)
    if len(ref) != len(outputs):
        raise ExportVerificationError(
            f"export_onnx: the ONNX model has {len(outputs)} outputs but the PyTorch model "
            f"returns {len(ref)} tensors"
        )
    max_abs, scale = 0.0, 0.0
    for r, a in zip(ref, outputs):
        r = r.detach().double().cpu()
        a = torch.as_tensor(a).double()
        if tuple(r.shape) != tuple(a.shape):
            raise ExportVerificationError(
                f"export_onnx: an ONNX output has shape {tuple(a.shape)} where PyTorch gives "
                f"{tuple(r.shape)}"
            )
        if not r.is_floating_point() or r.numel() == 0:
            continue
        diff = (r - a).abs()
        max_abs = max(max_abs, float(diff.max()) if not torch.isnan(diff).any() else math.inf)
        scale = max(scale, float(r.abs().max()))
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def _verify(optimized, file_path, kwargs, lengths, tolerance, vocab) -> list[LengthCheck]:
    import onnxruntime as ort

    providers = _providers()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(file_path, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind types
        raise ExportVerificationError(
            f"export_onnx: onnxruntime cannot load the exported file: {type(e).__name__}: {e}; "
            f"no file was written"
        ) from e
    provider = session.get_providers()[0]
    names = [i.name for i in session.get_inputs()]
    gen = torch.Generator().manual_seed(0)
    checks = []
    for length in lengths:
        inputs = _fresh_inputs(kwargs, length, gen, vocab)
        leaves = _tensor_leaves(inputs)
        if len(leaves) != len(names):
            raise ExportVerificationError(
                f"export_onnx: the ONNX model takes {len(names)} inputs ({names}) but the "
                f"model's call has {len(leaves)} tensors"
            )
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = optimized(**inputs)
        try:
            outputs = session.run(None, feeds)
        except Exception as e:
            raise ExportVerificationError(
                f"export_onnx: the exported file fails in onnxruntime ({provider}) at sequence "
                f"length {length}: {type(e).__name__}: {e}; no file was written"
            ) from e
        max_abs, max_rel = _compare(reference, outputs)
        checks.append(LengthCheck(length, max_abs, max_rel, provider))
        if not max_rel <= tolerance:
            raise ExportVerificationError(
                f"export_onnx: onnxruntime ({provider}) and PyTorch differ at sequence length "
                f"{length}: max relative error {max_rel:.3e} (max abs {max_abs:.3e}) is above "
                f"tolerance={tolerance:.1e}; no file was written"
            )
    return checks


# -- the verb -----------------------------------------------------------------------------------


def _metadata(optimized, opset: int, dynamic_seq: bool, export_len) -> dict[str, str]:
    try:
        import attnopt

        version = getattr(attnopt, "__version__", "unknown")
    except ImportError:  # pragma: no cover - we are inside attnopt
        version = "unknown"
    sites = {}
    for r in optimized.report.sites:
        sites[r.name] = {
            "variant": r.config.to_dict() if (r.config is not None and r.applied) else None,
            "applied": r.applied,
            "reason": r.reason,
            "mask": r.site.mask.value,
            "window": r.site.window,
            "heads": r.site.num_heads,
            "kv_heads": r.site.num_kv_heads,
            "head_dim": r.site.head_dim,
        }
    return {
        "attnopt.version": str(version),
        "attnopt.sites": json.dumps(sites, sort_keys=True),
        "attnopt.export": json.dumps(
            {"opset": opset, "dynamic_seq": dynamic_seq, "export_seq_len": export_len}
        ),
    }


def _op_of_site(gm: torch.fx.GraphModule) -> dict[str, str]:
    ops = {}
    for node in gm.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, OpOverload) and t.namespace == "attnopt":
            ops[_site_of_node(node)] = t.name()
    return ops


def _optimize(program) -> None:
    """Constant folding and dead-code removal, without the opset-23 fusions that
    ``torch.onnx.export(optimize=True)`` adds (RotaryEmbedding, GQA: onnxruntime 1.32
    rejects the fused RotaryEmbedding at any length but the export length, and other
    runtimes may not have those operators at all)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(program.model)


@contextlib.contextmanager
def _eval(module: torch.nn.Module):
    # Flags set directly: an unlifted exported module refuses .eval(), and the graph was
    # captured in eval mode anyway; this only keeps torch.onnx from warning.
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _default_check_length(optimized, export_len: int | None) -> int:
    longest = 16
    for r in optimized.report.sites:
        cfg = r.config
        if cfg is None or not r.applied:
            continue
        span = getattr(cfg, "window", 0) * getattr(cfg, "dilation", 1) + getattr(cfg, "sinks", 0)
        for attr in ("chunk", "block_size", "block"):
            v = getattr(cfg, attr, 0)
            span = max(span, v if isinstance(v, int) else 0)
        longest = max(longest, span)
    # Past 3 windows (a bidirectional band) no window-sized dim can reach N.
    return max(4 * longest, 4 * (export_len or 0), 256)


def export_onnx(
    optimized,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_seq: bool = True,
    verify: bool = True,
    example_inputs: Any = None,
    tolerance: float | None = None,
    verify_lengths: tuple[int, ...] | None = None,
    check_length: int | None = None,
) -> ExportReport:
    """Write ``optimized`` as an ONNX file whose attention keeps each site's variant.

    The rewritten graph goes through ``torch.onnx.export(dynamo=True)`` with an ONNX
    translation for every ``attnopt::`` op (:func:`onnx_translations`); an op without
    one is an :class:`ExportError` naming the site, never a silent dense fallback.
    The file records, in ``metadata_props``, the attnopt version and every site's
    variant and settings (``attnopt.sites``, JSON). It is written atomically: a
    temporary file in the same directory, moved into place only after every check
    passed (weights go to an external data file beside it only above 2 GB).

    Args:
        optimized: what :func:`attnopt.optimize` returned.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: ONNX opset (``>= 18``); None takes torch.onnx's default. From 23,
            Dense sites use the ``Attention`` operator when onnxruntime runs it.
        dynamic_seq: batch and sequence dims dynamic (True) or only batch (False).
        verify: run the file in onnxruntime (CUDA provider when available, else
            CPU) on fresh random inputs at two sequence lengths other than the
            export length and compare with ``optimized``; also run it once at
            ``check_length`` and check that no sub-quadratic site (sliding window,
            linear, hybrid, block-sparse, neighborhood, agent) computes a tensor with
            two dims ``>= check_length`` (ONNX shape inference instead where the file
            is over 2 GB). Raises :class:`ExportVerificationError` (and writes nothing)
            on failure. With ``verify=False`` neither runs.
        example_inputs: a tuple of positional or a dict of keyword arguments to export
            with; default the example inputs given to :func:`attnopt.optimize`.
        tolerance: largest allowed relative error (max abs diff / max |PyTorch
            output|); default 1e-4 for fp32 models, 2e-2 for fp16/bf16.
        verify_lengths: the sequence lengths to verify at (default two other than
            the export length: ``N + 5`` and ``2N + 3``).
        check_length: length of the shape check (default 4× the largest window,
            chunk or block of any site, at least 256).

    Returns:
        An :class:`ExportReport`: sites (op, N×N check), errors per length, metadata.

    Example:
        >>> import attnopt
        >>> from attnopt.exporters.onnx import export_onnx
        >>> model = attnopt.zoo.tiny_model("tiny-llama")
        >>> fast = attnopt.optimize(model, attnopt.SlidingWindow(window=4))
        >>> report = export_onnx(fast, "/tmp/tiny_llama_sw.onnx")  # doctest: +SKIP
        >>> report.max_rel < 1e-4  # doctest: +SKIP
        True
    """
    _check_args(
        optimized, path, opset, dynamic_seq, verify, tolerance, verify_lengths, check_length
    )
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"export_onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
            f"pip install 'attnopt[onnx]'"
        ) from e
    path = os.path.abspath(os.fspath(path))

    if example_inputs is None:
        args, kwargs = optimized._example
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        raise TypeError(
            f"export_onnx: example_inputs must be None, a tuple of positional arguments or a "
            f"dict of keyword arguments, got {type(example_inputs).__name__}"
        )
    args, kwargs = optimized._bind(args, kwargs)
    gm = optimized._graph_for(args, kwargs)
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    kwargs = dict(bound.arguments)
    export_len = _seq_len(kwargs)

    table = onnx_translations(opset)
    _check_translations(gm, table)
    site_ops = _op_of_site(gm)

    try:
        with _eval(gm), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm,
                (),
                None,
                kwargs=kwargs,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=_dynamic_shapes(kwargs, dynamic_seq),
                custom_translation_table=table,
                verbose=False,
                report=False,
                optimize=False,
            )
        _optimize(program)
    except Exception as e:  # torch.onnx raises many types; all mean the export failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"export_onnx: torch.onnx.export failed: {type(e).__name__}: {first}"
        ) from e

    model_opset = next(
        (o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")),
        opset or 0,
    )
    metadata = _metadata(optimized, model_opset, dynamic_seq, export_len)
    for key, value in metadata.items():
        program.model.metadata_props[key] = value

    dtype = next((t.dtype for t in _tensor_leaves(kwargs) if t.is_floating_point()), None)
    param = next(iter(optimized.parameters()), None)
    if param is not None and param.is_floating_point():
        dtype = param.dtype
    if tolerance is None:
        tolerance = _DEFAULT_TOLERANCE.get(dtype, _HALF_TOLERANCE)
    if verify_lengths is None:
        if dynamic_seq and export_len is not None:
            verify_lengths = (export_len + 5, 2 * export_len + 3)
        else:
            verify_lengths = (export_len,)
    if check_length is None:
        check_length = _default_check_length(optimized, export_len) if dynamic_seq else export_len

    proto = program.model_proto
    vocab = getattr(getattr(optimized, "config", None), "vocab_size", None)
    feeds = None
    if verify and check_length:
        gen = torch.Generator().manual_seed(1)
        check_inputs = _fresh_inputs(kwargs, check_length if dynamic_seq else None, gen, vocab)
        names = [v.name for v in proto.graph.input]
        leaves = _tensor_leaves(check_inputs)
        if len(names) == len(leaves):
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}
    groups = {
        r.name: (site_ops.get(_module_path(r.name) or "<root>"), r.applied, r.config)
        for r in optimized.report.sites
    }
    checked = _shape_check(proto, groups, check_length if verify else None, feeds)
    sites = []
    for r in optimized.report.sites:
        n_nodes, quad, largest = checked.get(r.name, (0, None, None))
        sites.append(
            SiteExport(
                name=r.name,
                variant=r.config.to_dict() if r.config is not None else None,
                applied=r.applied,
                op=site_ops.get(_module_path(r.name) or "<root>") if r.applied else None,
                onnx_nodes=n_nodes,
                quadratic=quad,
                largest=largest,
            )
        )
    report = ExportReport(
        path=path,
        opset=int(model_opset),
        dynamic_seq=dynamic_seq,
        export_seq_len=export_len,
        sites=sites,
        check_length=check_length if verify else None,
        tolerance=float(tolerance),
        metadata=metadata,
    )
    if verify:
        lost = [
            s.name
            for s in sites
            if s.applied and s.variant and s.variant.get("variant") in _SUBQUADRATIC and s.quadratic
        ]
        if lost:
            raise ExportVerificationError(
                f"export_onnx: sites {lost} hold a tensor with two dims >= {check_length} in "
                f"the ONNX graph: their sub-quadratic variant did not survive the export; no "
                f"file was written"
            )

    parent = os.path.dirname(path)
    tmpdir = tempfile.mkdtemp(prefix=".attnopt-onnx-", dir=parent)
    try:
        tmp_path = os.path.join(tmpdir, os.path.basename(path))
        program.save(tmp_path)
        if verify:
            report.checks = _verify(optimized, tmp_path, kwargs, verify_lengths, tolerance, vocab)
        # Side files (external data) first, the model file last: a reader never sees a
        # model whose data is missing.
        for name in sorted(os.listdir(tmpdir), key=lambda n: n == os.path.basename(path)):
            os.replace(os.path.join(tmpdir, name), os.path.join(parent, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return report
