"""Exporters that keep each attention variant: ONNX (``onnx``) and TensorRT (``tensorrt``).

The ONNX exporter needs the ``onnx`` extra (onnx, onnxscript, onnxruntime) and is
imported on first use; the TensorRT helpers import ``tensorrt`` only when an engine is
built or run (the pre-flight needs only numpy and onnx).
"""

from attnopt.exporters.tensorrt import (
    EngineComparison,
    EngineReport,
    TensorRTUnavailable,
    UnsupportedOp,
    build_engine,
    compare_engine_to_onnxruntime,
    preflight,
    run_engine,
)

_ONNX_NAMES = ("ExportError", "ExportReport", "ExportVerificationError", "export_onnx")


def __getattr__(name: str):
    if name in _ONNX_NAMES:
        from attnopt.exporters import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'attnopt.exporters' has no attribute {name!r}")


__all__ = [
    "EngineComparison",
    "EngineReport",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "TensorRTUnavailable",
    "UnsupportedOp",
    "build_engine",
    "compare_engine_to_onnxruntime",
    "export_onnx",
    "preflight",
    "run_engine",
]
