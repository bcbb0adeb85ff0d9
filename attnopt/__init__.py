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

__all__ = [
    "Agent",
    "AttentionConfig",
    "AttentionSite",
    "BlockSparse",
    "CaptureError",
    "Dense",
    "Hybrid",
    "Linear",
    "MaskKind",
    "Neighborhood",
    "OptimizationReport",
    "OptimizedModule",
    "OutputError",
    "SlidingWindow",
    "config_from_dict",
    "find_attention",
    "optimize",
    "zoo",
]
