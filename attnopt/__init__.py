"""attnopt: find the attention in any PyTorch model and rewrite it into cheaper variants.

>>> import attnopt
>>> model = attnopt.zoo.tiny_model("tiny-llama")
>>> fast = attnopt.optimize(model, attnopt.SlidingWindow(window=8))
>>> print(fast.report)  # doctest: +SKIP
"""

from attnopt import zoo
from attnopt.api import OptimizedModule, find_attention, optimize
from attnopt.capture import CaptureError
from attnopt.checkpoint import CheckpointError, load, save
from attnopt.config import AttentionConfig, config_from_dict

# `attnopt.distill` is the function (bound after its subpackage is imported, so a later
# `import attnopt.distill` does not replace it); the package stays importable by name.
from attnopt.distill import DistillReport, distill
from attnopt.exporters.tensorrt import build_engine, preflight, run_engine
from attnopt.kernels.agent import Agent
from attnopt.kernels.block_sparse import BlockSparse
from attnopt.kernels.dense import Dense
from attnopt.kernels.hybrid import Hybrid
from attnopt.kernels.linear import Linear
from attnopt.kernels.neighborhood import Neighborhood
from attnopt.kernels.sliding_window import SlidingWindow
from attnopt.report import OptimizationReport, OutputError
from attnopt.site import AttentionSite, MaskKind

__version__ = "0.1.0"

# Optional parts, imported on first use so that `import attnopt` needs neither onnx /
# onnxscript, peft nor transformers: name -> module that defines it.
_LAZY = {
    "AttnoptCache": "attnopt.cache",
    "export_onnx": "attnopt.exporters.onnx",
    "ExportReport": "attnopt.exporters.onnx",
    "ExportVerificationError": "attnopt.exporters.onnx",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnopt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Agent",
    "AttnoptCache",
    "AttentionConfig",
    "AttentionSite",
    "BlockSparse",
    "CaptureError",
    "CheckpointError",
    "DistillReport",
    "Dense",
    "ExportReport",
    "ExportVerificationError",
    "Hybrid",
    "Linear",
    "MaskKind",
    "Neighborhood",
    "OptimizationReport",
    "OptimizedModule",
    "OutputError",
    "SlidingWindow",
    "build_engine",
    "config_from_dict",
    "distill",
    "export_onnx",
    "find_attention",
    "load",
    "optimize",
    "preflight",
    "run_engine",
    "save",
    "zoo",
]
