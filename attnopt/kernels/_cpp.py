"""Optional C++ CPU kernels, compiled on first use with ``torch.utils.cpp_extension``.

A kernel's source lives in its variant's folder beside the PyTorch implementation it
speeds up; :func:`load_extension` compiles it once per source text and torch version
(ninja and a C++ compiler are needed; builds are cached in torch's extensions
directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) and returns the
module, or None where it cannot be built. Callers then keep their PyTorch path, which
computes the same sums: the C++ kernels only make it faster.

Set ``ATTNOPT_CPP_KERNELS=0`` to never compile or use them (the tests run both paths
and compare them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "PHI_MODES",
    "cpp_kernels_disabled",
    "cpp_kernels_enabled",
    "fp32_cpu_rows",
    "load_extension",
]

_ENV = "ATTNOPT_CPP_KERNELS"
_log = logging.getLogger(__name__)


def cpp_kernels_enabled() -> bool:
    """False when ``ATTNOPT_CPP_KERNELS`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# OpenMP: at::parallel_for is a header template that needs it to run in parallel.
_CFLAGS = ("-O3", "-fopenmp")
# Helpers every kernel may include (``#include "cpu_common.h"``).
_COMMON = Path(__file__).with_name("cpu_common.h")
_LDFLAGS = ("-fopenmp",)


def _reason(e: Exception) -> str:
    """One line on why a build failed: the compiler's first error where there is one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    compiler = [line for line in lines if "error:" in line]  # file:line:col: error: ...
    return f"{type(e).__name__}: {(compiler or lines or [repr(e)])[0][:300]}"


# Feature maps the kernels apply themselves, by the numbers of ``cpu_common.h``
# (kPhiElu, kPhiRelu); 0 means the features are passed in.
PHI_MODES = {"elu": 1, "relu": 2}


def fp32_cpu_rows(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` in place: fp32 on CPU with contiguous rows."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1


@contextlib.contextmanager
def cpp_kernels_disabled():
    """Within the block, every kernel takes its PyTorch path (sets ``ATTNOPT_CPP_KERNELS=0``
    for the block and restores the previous value after it)."""
    before = os.environ.get(_ENV)
    os.environ[_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before


@functools.cache
def _build(source: str) -> ModuleType | None:
    path = Path(source)
    parts = [path.read_bytes(), _COMMON.read_bytes(), torch.__version__.encode()]
    key = b"\0".join([*parts, *map(str.encode, _CFLAGS)])
    tag = hashlib.sha256(key).hexdigest()[:12]
    name = f"attnopt_{path.stem}_{tag}"
    try:
        from torch.utils import cpp_extension

        _log.info("attnopt: compiling the C++ kernel %s (once; cached as %s)", path.name, name)
        return cpp_extension.load(
            name=name,
            sources=[str(path)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(_COMMON.parent)],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: keep the PyTorch path
        warnings.warn(
            f"attnopt: could not build the C++ CPU kernel {path.name} ({_reason(e)}); using "
            f"the PyTorch implementation, which is slower. Install ninja and a C++ compiler "
            f"to build it, or set {_ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def load_extension(source: str | Path) -> ModuleType | None:
    """The compiled module of ``source`` (a ``.cpp`` file), or None when the C++
    kernels are disabled or cannot be built (warned once per source)."""
    if not cpp_kernels_enabled():
        return None
    return _build(str(Path(source).resolve()))
