"""Decode-step Triton kernel (split-K attention of a few queries against a KV cache)
against the dense reference, and against sliding-window attention through a cache that
holds only the sinks and the window.

Metric: elementwise ``|out - ref| <= atol + rtol * |ref|`` with the one table of
``tests/kernel_tests/triton_support.py``; ``ref`` is the fp32 reference on the same (already
rounded) inputs. Outputs are filled with NaN before each launch.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.kernels.sliding_window.reference import sliding_window_attention_reference
from tests.kernel_tests.triton_support import assert_close, interpreter_dtype, triton_devices

tdec = pytest.importorskip("attnopt.kernels.sliding_window.triton_decode")

DEVICES = triton_devices()

# name -> sizes; num_splits forces several chunks (some of them fully masked) through the
# merge, and 16 query heads x 5 queries make more rows than one program holds.
CASES = {
    "nq1-m1": dict(M=1),
    "nq1-m63-gqa4": dict(H=8, Hkv=2, M=63),
    "nq1-m300-splits5-pad": dict(B=2, M=300, pad=True, num_splits=5),
    "nq3-m63-causal-gqa3": dict(H=3, Hkv=1, NQ=3, M=63, causal=True),
    "nq5-m70-rows80-causal-pad": dict(H=16, Hkv=1, NQ=5, M=70, causal=True, pad=True),
    "nq2-dv16-d32-splits3": dict(NQ=2, M=100, D=32, Dv=16, num_splits=3),
    "nq1-d24-padded": dict(M=40, D=24),
    "empty-rows": dict(B=2, M=50, pad=True, empty_batch=True, num_splits=2),
}
HALF_CASES = ("nq1-m63-gqa4", "nq1-m300-splits5-pad", "nq5-m70-rows80-causal-pad")


def _inputs(case: dict, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv = case.get("B", 1), case.get("H", 2), case.get("Hkv", case.get("H", 2))
    NQ, M, D = case.get("NQ", 1), case["M"], case.get("D", 16)
    Dv = case.get("Dv", D)
    q = torch.randn(B, H, NQ, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, M, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, M, Dv, generator=gen).to(device, dtype)
    kv_mask = None
    if case.get("pad"):
        kv_mask = (torch.rand(B, H, M, generator=gen) > 0.4).to(device)
        if case.get("empty_batch"):
            kv_mask[0] = False
    return q, k, v, kv_mask


def _params():
    for name in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if dtype == torch.float32 or name in HALF_CASES:
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, dtype", list(_params()))
def test_decode_matches_dense_reference(device, name, dtype):
    case = CASES[name]
    dtype = interpreter_dtype(dtype, device)
    q, k, v, kv_mask = _inputs(case, dtype, device)
    causal = case.get("causal", False)
    out = tdec.decode_attention_triton(
        q, k, v, kv_mask, causal=causal, num_splits=case.get("num_splits"), debug_nan=True
    )
    ref = dense_attention_reference(q.float(), k.float(), v.float(), kv_mask, causal=causal)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what=name)
    if case.get("empty_batch"):
        assert (out[0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_through_a_sliding_window_cache(device):
    """The last query of a causal sliding-window sequence, decoded against a cache that
    holds only its sinks and its window (plus unused, masked slots of random values),
    equals the reference's last row on the whole sequence."""
    gen = torch.Generator().manual_seed(11)
    L, window, sinks = 90, 20, 3
    q = torch.randn(1, 4, L, 16, generator=gen).to(device)
    k = torch.randn(1, 2, L, 16, generator=gen).to(device)
    v = torch.randn(1, 2, L, 16, generator=gen).to(device)
    full = sliding_window_attention_reference(q, k, v, window=window, sinks=sinks, causal=True)
    keep = list(range(sinks)) + list(range(L - window, L))
    slots = 32  # a fixed-size cache with 9 empty slots
    k_cache = torch.randn(1, 2, slots, 16, generator=gen).to(device)
    v_cache = torch.randn(1, 2, slots, 16, generator=gen).to(device)
    k_cache[:, :, 5 : 5 + len(keep)] = k[:, :, keep]
    v_cache[:, :, 5 : 5 + len(keep)] = v[:, :, keep]
    filled = torch.zeros(1, 1, slots, dtype=torch.bool, device=device)
    filled[..., 5 : 5 + len(keep)] = True
    out = tdec.decode_attention_triton(q[:, :, -1:], k_cache, v_cache, filled, debug_nan=True)
    assert_close(out, full[:, :, -1:], torch.float32, what="cache decode")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_scale_and_non_contiguous(device):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 4, 16, generator=gen).to(device).transpose(1, 2)  # [1, 4, 1, 16]
    k = torch.randn(1, 2, 16, 45, generator=gen).to(device).transpose(2, 3)  # stride(-1) != 1
    v = torch.randn(1, 45, 2, 16, generator=gen).to(device).transpose(1, 2)
    out = tdec.decode_attention_triton(q, k, v, scale=0.3, debug_nan=True)
    ref = dense_attention_reference(q, k, v, scale=0.3)
    assert_close(out, ref, torch.float32, what="strided")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_errors_name_the_argument(device):
    q = torch.randn(1, 2, 1, 16, device=device)
    k = torch.randn(1, 2, 10, 16, device=device)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got dtype torch.float64"):
        tdec.decode_attention_triton(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="k head dim must equal q head dim"):
        tdec.decode_attention_triton(q, k[..., :8], k)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        tdec.decode_attention_triton(q, k.repeat(1, 3, 1, 1)[:, :3], k.repeat(1, 3, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="kv_mask must be broadcastable"):
        tdec.decode_attention_triton(q, k, k, torch.ones(1, 1, 9, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="num_splits must be a positive int, got 0"):
        tdec.decode_attention_triton(q, k, k, num_splits=0)
    big = torch.randn(1, 1, 1, 300, device=device)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 256\], got 300"):
        tdec.decode_attention_triton(big, big, big)


def test_decode_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        tdec.decode_attention_triton(q, q, q)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_empty_cache(device):
    q = torch.randn(1, 2, 1, 16, device=device)
    k = torch.randn(1, 1, 0, 16, device=device)
    out = tdec.decode_attention_triton(q, k, k)
    assert out.shape == (1, 2, 1, 16) and (out == 0).all()
