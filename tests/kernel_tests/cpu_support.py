"""What the CPU kernel tests of every variant share: one tolerance table and the check.

Every implementation of a variant (reference, efficient CPU path, custom op) is compared
with a naive fp64 computation, written in the variant's test file, on the same (already
rounded) inputs: ``|out - naive| <= atol + rtol * |naive|``.
"""

from __future__ import annotations

import torch

_SINGLE_ATTENTION = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# variant -> dtype -> (atol, rtol) against the fp64 naive result. Agent attention chains
# two softmax attentions (agents <- keys, queries <- agents), so half-precision rounding
# of the intermediate agent values compounds.
KERNEL_TOLERANCE = {
    "sliding_window": _SINGLE_ATTENTION,
    "block_sparse": _SINGLE_ATTENTION,
    "linear": _SINGLE_ATTENTION,
    "hybrid": _SINGLE_ATTENTION,
    "neighborhood": _SINGLE_ATTENTION,
    "agent": {
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2e-3, 4e-3),
        torch.bfloat16: (2e-2, 2e-2),
    },
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype, tolerance: dict) -> None:
    """``actual`` has ``dtype``, is finite and lies within ``tolerance[dtype]`` of the
    fp64 ``expected``."""
    atol, rtol = tolerance[dtype]
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)
