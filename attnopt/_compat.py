"""The one module that touches private torch names; everything else imports from here.

Keeping them in one place means a torch upgrade that moves them breaks one file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree  # noqa: F401  (re-exported)

__all__ = ["OpOverload", "detect_fake_mode", "pytree"]

OpOverload = torch._ops.OpOverload


def detect_fake_mode(values: list[Any]):
    """The FakeTensorMode that owns these ``meta['val']`` tensors, or ``None``."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(values)
