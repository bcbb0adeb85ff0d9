"""Triton neighbourhood attention forward against the PyTorch reference: 1-, 2- and 3-D
grids of odd sizes, dilation, stride, per-axis causality, extra (global) tokens,
padding, grouped-query heads, windows covering the grid, and tile-level skipping.

Metric: ``TRITON_TOLERANCE`` of ``triton_support`` (one table for every Triton kernel):
elementwise ``|out - ref| <= atol + rtol·|ref|``, the reference computed in fp32 on the
same (already rounded) inputs. Output buffers are pre-filled with NaN.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attnopt.kernels._triton import triton_available
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.kernels.neighborhood.reference import neighborhood_attention_reference
from tests.kernel_tests.triton_support import assert_close, interpreter_dtype, triton_devices

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

if triton_available():
    from attnopt.kernels.neighborhood import triton_neighborhood
    from attnopt.kernels.neighborhood.triton_neighborhood import (
        neighborhood_attention_triton,
        tile_shape,
    )

DEVICES = triton_devices()


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Kernel outputs start as NaN: an unwritten element cannot pass as a value."""

    def alloc(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_neighborhood, "_alloc", alloc)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    grid: tuple[int, ...]
    kernel: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    extra: int = 0
    H: int = 2
    Hkv: int = 2
    D: int = 16
    Dv: int = 16
    B: int = 1
    mask: str | None = None  # None, "keys" ([B, 1, N]) or "heads" ([B, H, N])
    dtype: torch.dtype = torch.float32


CASES = [
    Case("2d-9x11-k3", (9, 11), 3),
    Case("2d-7x5-k3x5-cls2-padding", (7, 5), (3, 5), extra=2, mask="keys", Dv=24),
    Case("2d-13x10-dilation2x3", (13, 10), (3, 3), dilation=(2, 3), Hkv=1),
    Case("2d-9x11-stride-dilation", (9, 11), (5, 4), dilation=(2, 1), stride=(2, 3)),
    Case("2d-causal-rows-padding-heads", (6, 9), (3, 5), causal=(True, False), mask="heads", B=2),
    Case("2d-kernel-covers-grid-cls3", (4, 5), (7, 9), extra=3),
    Case("3d-3x5x6-causal-time", (3, 5, 6), (2, 3, 3), causal=(True, False, False), extra=1, Hkv=1),
    Case("3d-4x5x7-dilation", (4, 5, 7), 3, dilation=(1, 2, 2), D=24),
    Case("1d-63-k7-dilation3", (63,), 7, dilation=3),
    Case("1d-1-cls1", (1,), 3, extra=1),
    Case("2d-fp16", (7, 9), 3, extra=1, dtype=torch.float16),
    Case("2d-bf16", (7, 9), (3, 5), dtype=torch.bfloat16),
]


def _inputs(c: Case, device: str, seed: int = 0):
    dtype = interpreter_dtype(c.dtype, device)
    n = c.extra + math.prod(c.grid)
    gen = torch.Generator().manual_seed(seed + n)
    q = torch.randn(c.B, c.H, n, c.D, generator=gen).to(device, dtype)
    k = torch.randn(c.B, c.Hkv, n, c.D, generator=gen).to(device, dtype)
    v = torch.randn(c.B, c.Hkv, n, c.Dv, generator=gen).to(device, dtype)
    mask = None
    if c.mask is not None:
        heads = 1 if c.mask == "keys" else c.H
        mask = (torch.rand(c.B, heads, n, generator=gen) > 0.3).to(device)
    return q, k, v, mask, dtype


def _axes(c: Case) -> dict:
    return dict(grid=c.grid, kernel=c.kernel, dilation=c.dilation, stride=c.stride, causal=c.causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_matches_reference(case: Case, device: str):
    q, k, v, mask, dtype = _inputs(case, device)
    out = neighborhood_attention_triton(q, k, v, mask, **_axes(case))
    ref = neighborhood_attention_reference(q, k, v, mask, **_axes(case))
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what=case.name)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_covering_the_grid_is_dense_attention(device):
    case = Case("dense", (5, 3), (5, 3), extra=1, mask="keys")
    q, k, v, mask, dtype = _inputs(case, device, seed=4)
    out = neighborhood_attention_triton(q, k, v, mask, grid=(5, 3), kernel=(9, 9), scale=0.3)
    assert_close(out, dense_attention_reference(q, k, v, mask, scale=0.3), dtype, what="dense")


@pytest.mark.parametrize("device", DEVICES)
def test_fully_padded_rows_are_zero(device):
    q, k, v, _, _ = _inputs(Case("pad", (4, 4), 3), device)
    mask = torch.zeros(1, 1, 16, dtype=torch.bool, device=device)
    mask[..., 0] = True  # only key (0, 0) is visible: far queries see nothing
    out = neighborhood_attention_triton(q, k, v, mask, grid=(4, 4), kernel=3)
    ref = neighborhood_attention_reference(q, k, v, mask, grid=(4, 4), kernel=3)
    assert_close(out, ref, torch.float32, what="padded")
    assert (out[:, :, -1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_key_tiles_outside_every_window_are_skipped(device):
    """A NaN value poisons exactly the outputs of query tiles whose window union reaches
    its key tile: a tile that visited every key tile would be NaN everywhere."""
    L, tile = 160, 16
    q, k, v, _, _ = _inputs(Case("skip", (L,), 3, H=1, Hkv=1), device)
    v[:, :, 100] = float("nan")
    out = neighborhood_attention_triton(q, k, v, grid=(L,), kernel=3, tile=tile)
    nan_rows = torch.isnan(out[0, 0]).any(-1).nonzero().flatten().tolist()
    # Key 100 is in key tile 6 ([96, 112)); query tiles 5, 6, 7 reach it (their unions
    # are [79, 97), [95, 113), [111, 129)) and compute NaN (0·NaN); the rest never load it.
    assert nan_rows == list(range(5 * tile, 8 * tile))


def test_tile_shape_prefers_boxes_that_visit_fewer_key_tiles():
    assert math.prod(tile_shape((1, 64, 64), (1, 7, 7))) == 64
    assert tile_shape((1, 1, 300), (1, 1, 7)) == (1, 1, 64)
    assert math.prod(tile_shape((1, 2, 3), (1, 3, 3))) == 16  # tiny grids still get 16 lanes


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    q = torch.randn(1, 2, 20, 16, device=device)
    with pytest.raises(ValueError, match="fewer than the grid"):
        neighborhood_attention_triton(q, q, q, grid=(5, 5), kernel=3)
    with pytest.raises(ValueError, match="q has 20 tokens but k has 19"):
        neighborhood_attention_triton(q, q[:, :, :19], q[:, :, :19], grid=(4, 4), kernel=3)
    with pytest.raises(ValueError, match="stride"):
        neighborhood_attention_triton(q, q, q, grid=(4, 5), kernel=3, stride=4)
    with pytest.raises(ValueError, match="kernel"):
        neighborhood_attention_triton(q, q, q, grid=(4, 5), kernel=(3, 3, 3))
    with pytest.raises(ValueError, match="tile"):
        neighborhood_attention_triton(q, q, q, grid=(4, 5), kernel=3, tile=(3, 8))
    big = torch.randn(1, 1, 4, 300, device=device)
    with pytest.raises(ValueError, match="at most 256"):
        neighborhood_attention_triton(big, big, big, grid=(2, 2), kernel=3)


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_kernel_body_matches_the_cpu_op(device):
    """The function registered as the op's CUDA kernel, run here on interpreter tensors
    (on a GPU the dispatcher calls it), against the op's tiled PyTorch path."""
    from attnopt.kernels.neighborhood import op as neighborhood_op

    case = Case("body", (6, 7), 3, extra=1, mask="keys", Hkv=1)
    q, k, v, mask, _ = _inputs(case, device)
    args = (0.3, [6, 7], [3, 5], [2, 1], [1, 2], [False, False])
    got = neighborhood_op._neighborhood_attention_cuda(q, k, v, mask, None, *args)
    want = torch.ops.attnopt.neighborhood_attention(q, k, v, mask, None, *args)
    assert_close(got, want, torch.float32, what="forward body")


@pytest.mark.gpu
@pytest.mark.triton
def test_op_runs_triton_on_cuda_and_backward_works():
    """``attnopt::neighborhood_attention`` on CUDA: the Triton forward, and autograd
    through the op's (PyTorch) backward, both match the reference."""
    case = Case("cuda-op", (12, 10), (5, 3), dilation=(1, 2), extra=2, H=4, Hkv=2, mask="keys")
    q, k, v, mask, dtype = _inputs(case, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    args = ([12, 10], [5, 3], [1, 2], [1, 1], [False, False])
    out = torch.ops.attnopt.neighborhood_attention(q, k, v, mask, None, 0.25, *args)
    ref = neighborhood_attention_reference(
        q, k, v, mask, grid=(12, 10), kernel=(5, 3), dilation=(1, 2), scale=0.25
    )
    assert_close(out, ref, dtype, what="op forward")
    grad = torch.randn_like(out)
    for name, g, w in zip(
        "qkv", torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)
    ):
        assert_close(g, w, dtype, grad=True, what=f"op d{name}")
