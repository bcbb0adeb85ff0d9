"""TensorRT engines from attnopt's ONNX files: a pre-flight check, the build, and a runner.

Why a pre-flight: TensorRT's ONNX parser fails on the first operator it has no importer
for, deep inside a build that may already have taken minutes, with a message about one
node. :func:`preflight` reads the file with ``onnx`` alone (no TensorRT, no GPU) and
lists *every* operator the parser would refuse, checked against a static table of the
operators TensorRT 10's ONNX parser imports (its documented operator support matrix,
onnx-tensorrt ``docs/operators.md``, TensorRT 10.x, opsets 9 to 24). Operators of other
domains (``com.microsoft``, ``attnopt``, ...) are flagged too: the parser has no
importer for them, they would need a TensorRT plugin. attnopt's ONNX exporter
translates every ``attnopt`` op into standard operators, so a clean export passes.

:func:`build_engine` parses the file, sets the precision flags and one optimisation
profile over the dynamic batch and sequence dimensions of every input, builds, and
writes the serialized engine atomically. :func:`run_engine` runs an engine with torch
CUDA tensors as its buffers; :func:`compare_engine_to_onnxruntime` checks it against
onnxruntime on the same inputs.

TensorRT is optional (``pip install 'attnopt[tensorrt]'``, NVIDIA GPUs only); without
it :func:`preflight` still works and the rest raise :class:`TensorRTUnavailable`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SUPPORTED_OPS",
    "TENSORRT_OPSET_RANGE",
    "EngineComparison",
    "EngineReport",
    "TensorRTUnavailable",
    "UnsupportedOp",
    "build_engine",
    "compare_engine_to_onnxruntime",
    "preflight",
    "run_engine",
]

# Opsets of the default ONNX domain TensorRT 10's parser reads (10.15: 9 to 24).
TENSORRT_OPSET_RANGE = (9, 24)

# Operators of the default ONNX domain with an importer in TensorRT 10's ONNX parser
# ("Y" in onnx-tensorrt docs/operators.md for TensorRT 10.x). Restrictions listed there
# (e.g. TopK's K < 3840, constant ``axes``) are checked by the parser at build time.
SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod
    Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905 - laid out like the documented matrix, easier to check
)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_INSTALL_HINT = "pip install 'attnopt[tensorrt]' (TensorRT 10, NVIDIA GPU with CUDA)"


class TensorRTUnavailable(ImportError):
    """The ``tensorrt`` package (or a CUDA device) is missing."""


@dataclasses.dataclass(frozen=True)
class UnsupportedOp:
    """One operator type in an ONNX file that TensorRT's ONNX parser would refuse.

    Attributes:
        domain: operator domain (``""`` for standard ONNX, ``"com.microsoft"``, ...).
        op_type: operator name.
        opset: the file's opset for that domain (``None`` if it does not import it).
        nodes: names of the nodes using it, in order (``<unnamed Op #i>`` for the i-th node
            of its graph when it has no name; subgraph nodes are prefixed with their path).
        reason: why the parser refuses it.
    """

    domain: str
    op_type: str
    opset: int | None
    nodes: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        where = ", ".join(self.nodes[:3]) + (" ..." if len(self.nodes) > 3 else "")
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        return f"{op} (opset {self.opset}, {len(self.nodes)} node(s): {where}): {self.reason}"


@dataclasses.dataclass
class EngineReport:
    """What :func:`build_engine` built."""

    engine_path: str
    onnx_path: str
    tensorrt_version: str
    precision: tuple[str, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    build_seconds: float
    engine_bytes: int
    timing_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"engine {self.engine_path} ({self.engine_bytes / 2**20:.1f} MiB) from "
            f"{self.onnx_path}: TensorRT {self.tensorrt_version}, "
            f"precision {'+'.join(self.precision)}, built in {self.build_seconds:.1f} s"
        ]
        for name, (lo, opt, hi) in self.profile.items():
            lines.append(f"  {name}: min {list(lo)}  opt {list(opt)}  max {list(hi)}")
        return "\n".join(lines)


@dataclasses.dataclass
class EngineComparison:
    """Per-output max abs (and relative) difference between an engine and onnxruntime."""

    max_abs: dict[str, float]
    max_rel: dict[str, float]

    @property
    def worst_abs(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    def __str__(self) -> str:
        parts = [
            f"{k}: max abs {self.max_abs[k]:.3e} (relative {self.max_rel[k]:.3e})"
            for k in self.max_abs
        ]
        return "TensorRT vs onnxruntime: " + "; ".join(parts)


# -- pre-flight --------------------------------------------------------------------------


def preflight(onnx_path: str | os.PathLike[str]) -> list[UnsupportedOp]:
    """Every operator in ``onnx_path`` that TensorRT 10's ONNX parser does not support.

    Needs only ``onnx`` (no TensorRT, no GPU). Walks the main graph, subgraphs (``If``,
    ``Loop``, ``Scan`` bodies) and the model's local functions (which the parser
    inlines, so calls to them are not flagged, their bodies are).

    Args:
        onnx_path: the ``.onnx`` file (external weights are not read).

    Returns:
        One :class:`UnsupportedOp` per ``(domain, op_type)``, in order of first use;
        empty when the parser imports every operator. A default-domain opset outside
        :data:`TENSORRT_OPSET_RANGE` is reported as an entry with ``op_type="opset"``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable ONNX model.

    Example:
        >>> preflight("model.onnx")  # doctest: +SKIP
        [UnsupportedOp(domain='attnopt', op_type='sliding_window_attention', ...)]
    """
    onnx = _import_onnx()
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"onnx_path {str(path)!r} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ValueError(f"onnx_path {str(path)!r} is not a readable ONNX model: {e}") from None
    opsets = {imp.domain or "": imp.version for imp in model.opset_import}
    default_opset = opsets.get("", opsets.get("ai.onnx"))
    functions = {(f.domain, f.name): f for f in model.functions}
    found: dict[tuple[str, str], list[str]] = {}

    def walk(nodes: Sequence[Any], prefix: str, stack: tuple) -> None:
        for index, node in enumerate(nodes):
            name = prefix + (node.name or f"<unnamed {node.op_type} #{index}>")
            key = (node.domain or "", node.op_type)
            if key in functions:
                if key not in stack:  # the parser inlines local functions
                    walk(functions[key].node, f"{name}/", (*stack, key))
            elif key[0] in _DEFAULT_DOMAINS and key[1] in SUPPORTED_OPS:
                pass
            else:
                found.setdefault(key, []).append(name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node, f"{name}/{attr.name}/", stack)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for i, g in enumerate(attr.graphs):
                        walk(g.node, f"{name}/{attr.name}[{i}]/", stack)

    walk(model.graph.node, "", ())
    out: list[UnsupportedOp] = []
    lo, hi = TENSORRT_OPSET_RANGE
    if default_opset is not None and not lo <= default_opset <= hi:
        out.append(
            UnsupportedOp(
                "",
                "opset",
                default_opset,
                (),
                f"the file imports ONNX opset {default_opset}; TensorRT 10's parser reads "
                f"opsets {lo} to {hi} (re-export with opset={min(max(default_opset, lo), hi)})",
            )
        )
    for (domain, op_type), nodes in found.items():
        if domain in _DEFAULT_DOMAINS:
            reason = "not supported by TensorRT 10's ONNX parser"
        else:
            reason = (
                f"custom domain {domain!r}: TensorRT's ONNX parser has no importer for it "
                f"(it would need a TensorRT plugin)"
            )
        out.append(UnsupportedOp(domain, op_type, opsets.get(domain), tuple(nodes), reason))
    return out


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError(
            "the TensorRT pre-flight reads ONNX files with the 'onnx' package, which is not "
            "installed: pip install 'attnopt[onnx]'"
        ) from e
    return onnx


# -- build -------------------------------------------------------------------------------


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"building or running a TensorRT engine needs the 'tensorrt' package, which is "
            f"not installed: {_INSTALL_HINT}"
        ) from e
    return tensorrt


def _check_range(name: str, value: Any) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in value)
        ok = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 1 <= lo <= opt <= hi:
        raise ValueError(
            f"{name} must be three integers (min, opt, max) with 1 <= min <= opt <= max, "
            f"got {value!r}"
        )
    return lo, opt, hi


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    fp16: bool = True,
    bf16: bool = False,
    seq_range: tuple[int, int, int] = (1, 512, 2048),
    batch_range: tuple[int, int, int] = (1, 1, 1),
    workspace_gb: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
) -> EngineReport:
    """Build a TensorRT engine from an ONNX file and write it to ``engine_path``.

    Runs :func:`preflight` first and refuses to start a build that would fail on an
    unsupported operator.

    Args:
        onnx_path: the ONNX file (e.g. from :func:`attnopt.exporters.onnx.export_onnx`).
        engine_path: where the serialized engine goes; written to a temporary file
            beside it and renamed, so a failed build leaves no partial engine.
        fp16 / bf16: allow half / bfloat16 kernels (float32 is always allowed).
        seq_range: ``(min, opt, max)`` for every dynamic dimension other than the batch:
            the optimisation profile covers these sequence lengths.
        batch_range: ``(min, opt, max)`` for dynamic batch dimensions (a dimension named
            like ``batch`` in the file, or the first dimension).
        workspace_gb: builder workspace memory limit in GiB (> 0).
        timing_cache: a file to read kernel timings from (when it exists) and to write
            them back to, which makes rebuilds much faster.

    Returns:
        :class:`EngineReport` with the profile shapes, precision, size and build time.

    Raises:
        ValueError: bad ranges or workspace, or unsupported operators in the file.
        TensorRTUnavailable: ``tensorrt`` is not installed.
        RuntimeError: the parser or the builder failed (its messages included).
    """
    seq = _check_range("seq_range", seq_range)
    batch = _check_range("batch_range", batch_range)
    if not (isinstance(workspace_gb, (int, float)) and workspace_gb > 0):
        raise ValueError(f"workspace_gb must be a positive number of GiB, got {workspace_gb!r}")
    onnx_path = Path(onnx_path)
    unsupported = preflight(onnx_path)
    if unsupported:
        listed = "; ".join(str(u) for u in unsupported)
        raise ValueError(
            f"{str(onnx_path)!r} has operators TensorRT's ONNX parser does not support: {listed}"
        )
    dim_names = _input_dim_names(onnx_path)
    trt = _import_tensorrt()
    engine_path = Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {str(onnx_path)!r}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    precision = ["fp32"]
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precision.append("fp16")
    if bf16:
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise RuntimeError(f"this TensorRT ({trt.__version__}) has no bf16 support")
        config.set_flag(trt.BuilderFlag.BF16)
        precision.append("bf16")
    profile = builder.create_optimization_profile()
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if d >= 0:
                chosen = (d, d, d)
            else:
                names = dim_names.get(tensor.name, ())
                label = (names[axis] if axis < len(names) else "") or ""
                is_batch = "batch" in label.lower() or (not label and axis == 0)
                chosen = batch if is_batch else seq
            lo.append(chosen[0])
            opt.append(chosen[1])
            hi.append(chosen[2])
        profile.set_shape(tensor.name, lo, opt, hi)
        shapes[tensor.name] = (tuple(lo), tuple(opt), tuple(hi))
    if shapes:
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {str(onnx_path)!r} (see the TensorRT "
            f"log above)"
        )
    data = bytes(serialized)
    _atomic_write(engine_path, data)
    if cache_path is not None:
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    return EngineReport(
        engine_path=str(engine_path),
        onnx_path=str(onnx_path),
        tensorrt_version=str(trt.__version__),
        precision=tuple(precision),
        profile=shapes,
        build_seconds=seconds,
        engine_bytes=len(data),
        timing_cache=str(cache_path) if cache_path is not None else None,
    )


def _network_flags(trt: Any) -> int:
    # TensorRT 10 networks are always explicit-batch; the flag exists (deprecated) on 8.x.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if flag is not None and int(str(trt.__version__).split(".")[0]) < 10:
        return 1 << int(flag)
    return 0


def _input_dim_names(onnx_path: Path) -> dict[str, tuple[str, ...]]:
    onnx = _import_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        out[inp.name] = tuple(d.dim_param for d in dims)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- run ---------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TypeError(f"engine tensor dtype {dtype} has no torch equivalent here")


def run_engine(
    engine_path: str | os.PathLike[str], inputs: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Run a serialized TensorRT engine once.

    Args:
        engine_path: an engine from :func:`build_engine`.
        inputs: every engine input by name, as numpy arrays or torch tensors; they are
            copied to the GPU in the dtype the engine expects.

    Returns:
        Every engine output by name, as numpy arrays.

    Raises:
        TensorRTUnavailable: no ``tensorrt`` or no CUDA device.
        KeyError: an engine input is missing from ``inputs`` (or an unknown one given).
    """
    import torch

    trt = _import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("running a TensorRT engine needs a CUDA device; none found")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"engine_path {str(engine_path)!r} is not a loadable TensorRT engine")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = [n for n in input_names if n not in inputs]
    unknown = [n for n in inputs if n not in input_names]
    if missing or unknown:
        raise KeyError(
            f"inputs must name every engine input exactly: missing {missing}, unknown "
            f"{unknown}; the engine takes {input_names}"
        )
    keep: list[torch.Tensor] = []
    for name in input_names:
        value = inputs[name]
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        t = t.to("cuda", _torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
        keep.append(t)
    outputs: dict[str, torch.Tensor] = {}
    for name in names:
        if name in input_names:
            continue
        shape = tuple(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"output {name!r} has a data-dependent shape {shape}")
        dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
        out = torch.empty(shape, dtype=dtype, device="cuda")
        context.set_tensor_address(name, out.data_ptr())
        outputs[name] = out
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT failed to run {str(engine_path)!r}")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}


def compare_engine_to_onnxruntime(
    engine_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    inputs: Mapping[str, Any],
) -> EngineComparison:
    """Run the engine and the ONNX file (onnxruntime) on ``inputs`` and compare outputs.

    Returns:
        :class:`EngineComparison`: per output name, the max absolute difference and that
        divided by the largest onnxruntime value.
    """
    import onnxruntime as ort

    arrays = {
        k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in inputs.items()
    }
    engine_out = run_engine(engine_path, arrays)
    providers = [
        p
        for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if p in ort.get_available_providers()
    ]
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: arrays[i.name] for i in session.get_inputs()}
    reference = dict(zip(names, session.run(names, feed)))
    max_abs, max_rel = {}, {}
    for name, ref in reference.items():
        if name not in engine_out:
            raise KeyError(f"the engine has no output {name!r}; it has {sorted(engine_out)}")
        r = np.asarray(ref, dtype=np.float64)
        a = np.asarray(engine_out[name], dtype=np.float64)
        diff = float(np.abs(r - a).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        max_abs[name] = diff
        max_rel[name] = diff / scale if scale > 0 else 0.0
    return EngineComparison(max_abs, max_rel)
