"""Where Triton kernels can run, decided in one place.

Triton kernels back the ``attnopt::`` ops on CUDA tensors. On a machine without a GPU
they still run through Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton
is imported), which is how the test suite checks them on CPU; the interpreter is slow,
so it is for tests, never the default path of a CPU tensor.

Launchers must work without ``triton.autotune`` (it does not run under the
interpreter): they pick block sizes from the shapes, and may autotune only on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["interpreting", "triton_available", "triton_runs_on"]


@functools.cache
def triton_available() -> bool:
    """Triton is importable (the ``triton`` extra is installed)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """A Triton kernel can take tensors on ``device``: CUDA with Triton installed, or
    CPU under the interpreter."""
    device = torch.device(device)
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()
