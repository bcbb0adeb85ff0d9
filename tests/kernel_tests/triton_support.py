"""What every Triton kernel test shares: the devices to run on and one tolerance table.

On a machine without CUDA the kernels run through Triton's interpreter on CPU tensors
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton);
with CUDA they run for real (marker ``gpu``). The interpreter computes ``tl.dot`` on
bf16 wrongly, so interpreter tests feed bf16 cases as fp32 (``interpreter_dtype``).
"""

from __future__ import annotations

import pytest
import torch

from attnopt.kernels._triton import interpreting, triton_available

# dtype -> (atol, rtol) of a Triton kernel against the fp32 PyTorch reference computed on
# the same (already rounded) inputs: |out - ref| <= atol + rtol * |ref|. fp32 kernels use
# IEEE fp32 dot products (no TF32), so fp32 is held to near-rounding error.
TRITON_TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Gradients accumulate more rounding than forward outputs.
TRITON_GRAD_TOLERANCE = {
    torch.float32: (5e-4, 5e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def triton_devices() -> list:
    """pytest params: ``cpu`` through the interpreter where it is on, ``cuda`` (marker
    ``gpu``) always (skipped without a GPU)."""
    params = []
    if triton_available() and interpreting():
        params.append(pytest.param("cpu", marks=pytest.mark.triton, id="interpreter"))
    params.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.triton], id="cuda"))
    return params


def interpreter_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype to test ``dtype`` with on ``device``: bf16 becomes fp32 under the
    interpreter, whose ``tl.dot`` on bf16 is wrong."""
    if device == "cpu" and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad=False, what=""):
    """``out`` within the table's tolerance of ``ref`` for ``dtype``, with a message that
    says where the worst element is."""
    atol, rtol = (TRITON_GRAD_TOLERANCE if grad else TRITON_TOLERANCE)[dtype]
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an unwritten element?)"
    err = (out - ref).abs() - (atol + rtol * ref.abs())
    worst = err.argmax()
    assert err.max() <= 0, (
        f"{what}: {int((err > 0).sum())} of {err.numel()} elements out of tolerance "
        f"(atol={atol}, rtol={rtol}); worst at flat index {int(worst)}: "
        f"{out.flatten()[worst].item():.6g} vs {ref.flatten()[worst].item():.6g}"
    )
