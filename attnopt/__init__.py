"""attnopt: find the attention in any PyTorch model and rewrite it into cheaper variants.

>>> import attnopt
>>> model = attnopt.zoo.tiny_model("tiny-llama")
>>> fast = attnopt.optimize(model, attnopt.SlidingWindow(window=8))
>>> print(fast.report)  # doctest: +SKIP
"""

from attnopt import zoo
from attnopt.api import OptimizedModule, find_attention, optimize
from attnopt.capture import CaptureError
from attnopt.config import AttentionConfig, config_from_dict
from attnopt.kernels.dense import Dense
from attnopt.kernels.sliding_window import SlidingWindow
from attnopt.report import OptimizationReport, OutputError
from attnopt.site import AttentionSite, MaskKind

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "AttentionSite",
    "CaptureError",
    "Dense",
    "MaskKind",
    "OptimizationReport",
    "OptimizedModule",
    "OutputError",
    "SlidingWindow",
    "config_from_dict",
    "find_attention",
    "optimize",
    "zoo",
]
