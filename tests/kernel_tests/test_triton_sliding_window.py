"""Sliding-window Triton kernels (forward and backward) against the PyTorch reference.

Metric: elementwise ``|out - ref| <= atol + rtol * |ref|`` with the one table of
``tests/kernel_tests/triton_support.py``; ``ref`` is the fp32 reference on the same (already
rounded) inputs, gradients are autograd through it. Outputs and gradients are filled
with NaN before each launch, so an element a kernel never writes fails the check.
"""

from __future__ import annotations

import pytest
import torch

from attnopt.kernels.sliding_window import op as sw_op
from attnopt.kernels.sliding_window.reference import sliding_window_attention_reference
from tests.kernel_tests.triton_support import assert_close, interpreter_dtype, triton_devices

tsw = pytest.importorskip("attnopt.kernels.sliding_window.triton_sliding_window")

DEVICES = triton_devices()

# name -> shapes and window settings. Tiles are 32 under the interpreter, so windows of
# 7, 20 and 45 are not multiples of the tile; M != N checks bottom-right alignment.
CASES = {
    "n1-causal": dict(N=1, M=1, window=4, causal=True),
    "n1-decode-m63-sinks": dict(N=1, M=63, window=9, sinks=2, causal=True),
    "n63-causal-w20": dict(N=63, window=20, causal=True),
    "n63-bidir-w7-sinks3": dict(N=63, window=7, sinks=3),
    "n300-causal-w45-sinks4-pad": dict(N=300, window=45, sinks=4, causal=True, pad=True),
    "gqa-dilation3-causal-sinks": dict(
        H=4, Hkv=2, N=63, window=6, sinks=2, dilation=3, causal=True
    ),
    "gqa3-dilation2-bidir-pad": dict(H=3, Hkv=1, N=50, window=5, dilation=2, pad=True),
    "m70-n17-causal-sinks": dict(N=17, M=70, window=12, sinks=5, causal=True),
    "m25-n40-causal": dict(N=40, M=25, window=8, causal=True),
    "m25-n40-bidir-dilation2": dict(N=40, M=25, window=8, dilation=2),
    "d32-dv16-bidir": dict(N=40, D=32, Dv=16, window=11, sinks=1),
    "d24-padded-causal": dict(N=33, D=24, window=10, causal=True),
    "window-over-length": dict(N=37, window=100, causal=True),
    "empty-rows-pad": dict(B=2, N=30, window=3, causal=True, pad=True, empty_batch=True),
    "small-tiles-16": dict(N=45, window=19, sinks=3, dilation=2, causal=True, tiles=16),
    "n1000-causal-w100-sinks4-pad": dict(H=1, N=1000, window=100, sinks=4, causal=True, pad=True),
}
SLOW_CASES = ("n1000-causal-w100-sinks4-pad",)
# Every case runs in fp32; fp16 and bf16 (fp32 under the interpreter) on a few, which keeps
# the interpreter run short.
HALF_CASES = {
    torch.float16: ("n63-causal-w20", "gqa3-dilation2-bidir-pad", "d32-dv16-bidir",
                    "m70-n17-causal-sinks", "empty-rows-pad"),
    torch.bfloat16: ("n63-causal-w20", "gqa3-dilation2-bidir-pad"),
}  # fmt: skip


def _inputs(case: dict, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv = case.get("B", 1), case.get("H", 2), case.get("Hkv", case.get("H", 2))
    N = case["N"]
    M = case.get("M", N)
    D = case.get("D", 16)
    Dv = case.get("Dv", D)
    q = torch.randn(B, H, N, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, M, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, M, Dv, generator=gen).to(device, dtype)
    kv_mask = None
    if case.get("pad"):
        kv_mask = (torch.rand(B, 1, M, generator=gen) > 0.3).to(device)
        if case.get("empty_batch"):
            kv_mask[0] = False  # every row of batch 0 sees nothing: output must be 0
    grad = torch.randn(B, H, N, Dv, generator=gen).to(device, dtype)
    return q, k, v, kv_mask, grad


def _args(case: dict) -> dict:
    return dict(
        window=case["window"],
        sinks=case.get("sinks", 0),
        dilation=case.get("dilation", 1),
        causal=case.get("causal", False),
    )


def _reference(q, k, v, kv_mask, grad, args):
    """fp32 reference output and autograd gradients on the same rounded inputs."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention_reference(*leaves, kv_mask, **args)
    out.backward(grad.float())
    return out.detach(), [t.grad for t in leaves]


def _params():
    for name in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if dtype == torch.float32 or name in HALF_CASES[dtype]:
                marks = [pytest.mark.slow] if name in SLOW_CASES else []
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}", marks=marks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, dtype", list(_params()))
def test_forward_backward_match_reference(device, name, dtype):
    case = CASES[name]
    dtype = interpreter_dtype(dtype, device)
    q, k, v, kv_mask, grad = _inputs(case, dtype, device)
    args = _args(case)
    tiles = dict(block_m=case.get("tiles"), block_n=case.get("tiles"))
    ref, (dq_ref, dk_ref, dv_ref) = _reference(q, k, v, kv_mask, grad, args)

    out, lse = tsw.sliding_window_forward_triton(q, k, v, kv_mask, **args, **tiles, debug_nan=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what=f"{name} out")
    if case.get("empty_batch"):
        assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()

    dq, dk, dv = tsw.sliding_window_backward_triton(
        grad, q, k, v, out, lse, kv_mask, **args, **tiles, debug_nan=True
    )
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)
    assert_close(dq, dq_ref, dtype, grad=True, what=f"{name} dq")
    assert_close(dk, dk_ref, dtype, grad=True, what=f"{name} dk")
    assert_close(dv, dv_ref, dtype, grad=True, what=f"{name} dv")


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale_and_per_head_mask(device):
    """A scale other than 1/sqrt(D) and a kv_mask that differs per (batch, head)."""
    case = dict(B=2, H=2, Hkv=1, N=30, window=13, sinks=2, causal=True)
    q, k, v, _, grad = _inputs(case, torch.float32, device, seed=3)
    kv_mask = torch.rand(2, 2, 30, generator=torch.Generator().manual_seed(4)) > 0.4
    kv_mask = kv_mask.to(device)
    args = dict(_args(case), scale=0.37)
    ref, grads = _reference(q, k, v, kv_mask, grad, args)
    out, lse = tsw.sliding_window_forward_triton(q, k, v, kv_mask, **args, debug_nan=True)
    assert_close(out, ref, torch.float32, what="out")
    got = tsw.sliding_window_backward_triton(grad, q, k, v, out, lse, kv_mask, **args)
    for name, g, r in zip(("dq", "dk", "dv"), got, grads):
        assert_close(g, r, torch.float32, grad=True, what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Inputs in [B, N, H, D] memory viewed as [B, H, N, D], and a head-dim stride != 1."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 40, 2, 16, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(1, 40, 2, 16, generator=gen).to(device).transpose(1, 2)
    v = torch.randn(1, 2, 16, 40, generator=gen).to(device).transpose(2, 3)  # stride(-1) != 1
    assert not q.is_contiguous() and v.stride(-1) != 1
    args = dict(window=9, sinks=1, causal=True)
    out, _ = tsw.sliding_window_forward_triton(q, k, v, **args, debug_nan=True)
    ref = sliding_window_attention_reference(q, k, v, **args)
    assert_close(out, ref, torch.float32, what="out")


@pytest.mark.parametrize("device", DEVICES)
def test_op_kernels(device):
    """The functions registered as the ops' CUDA kernels (called directly, so the
    interpreter checks them too): forward, backward (which reruns the forward for the
    log-sum-exp), and the blockwise fallback for float64."""
    case = dict(H=2, Hkv=1, N=40, window=10, sinks=2, dilation=2, causal=True, pad=True)
    q, k, v, kv_mask, grad = _inputs(case, torch.float32, device, seed=7)
    a = _args(case)
    op_args = (0.25, a["causal"], a["window"], a["sinks"], a["dilation"])
    ref, grads = _reference(q, k, v, kv_mask, grad, dict(a, scale=0.25))
    out = sw_op.sliding_window_attention_triton(q, k, v, kv_mask, None, *op_args)
    assert_close(out, ref, torch.float32, what="op out")
    got = sw_op.sliding_window_attention_backward_triton(grad, q, k, v, kv_mask, *op_args)
    for name, g, r in zip(("dq", "dk", "dv"), got, grads):
        assert_close(g, r, torch.float32, grad=True, what=f"op {name}")

    q64, k64, v64 = q.double(), k.double(), v.double()
    out64 = sw_op.sliding_window_attention_triton(q64, k64, v64, kv_mask, None, *op_args)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref.double(), atol=1e-5, rtol=1e-5)


def test_cpu_tensors_keep_the_pytorch_path():
    """CPU tensors never reach the Triton kernels through the op (the CUDA kernel is the
    only one registered)."""
    q = torch.randn(1, 2, 20, 16)
    out = torch.ops.attnopt.sliding_window_attention(q, q, q, None, None, 0.25, True, 5, 1, 1)
    ref = sliding_window_attention_reference(q, q, q, window=5, sinks=1, scale=0.25, causal=True)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_query(device):
    q = torch.randn(1, 2, 0, 16, device=device)
    k = torch.randn(1, 2, 5, 16, device=device)
    out, lse = tsw.sliding_window_forward_triton(q, k, k, window=3)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


# -- errors -------------------------------------------------------------------------------------


BAD_INPUTS = {
    "float64": (lambda q, k, v: (q.double(), k.double(), v.double()), "float16, bfloat16 or"),
    "int": (lambda q, k, v: (q.int(), k.int(), v.int()), "floating-point"),
    "head-dim-mismatch": (lambda q, k, v: (q, k[..., :8], v), "k head dim"),
    "v-length": (lambda q, k, v: (q, k, v[:, :, :3]), "v must be"),
    "gqa-heads": (lambda q, k, v: (q, k.repeat(1, 3, 1, 1)[:, :3], v.repeat(1, 3, 1, 1)[:, :3]),
                  "multiple of k/v heads"),
    "mixed-dtype": (lambda q, k, v: (q, k.half(), v), "share one dtype"),
    "rank": (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_forward_rejects_bad_inputs(device, bad):
    change, match = BAD_INPUTS[bad]
    q, k, v = (torch.randn(1, 2, 10, 16, device=device) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        tsw.sliding_window_forward_triton(*change(q, k, v), window=4)


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors_name_the_argument(device):
    q = torch.randn(1, 2, 10, 16, device=device)
    with pytest.raises(ValueError, match="window must be a positive int"):
        tsw.sliding_window_forward_triton(q, q, q, window=0)
    with pytest.raises(ValueError, match="dilation"):
        tsw.sliding_window_forward_triton(q, q, q, window=2, dilation=0)
    with pytest.raises(ValueError, match="kv_mask must be a bool"):
        tsw.sliding_window_forward_triton(q, q, q, torch.ones(1, 1, 10, device=device), window=2)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        tsw.sliding_window_forward_triton(q, q, q, window=2, block_m=24)
    big = torch.randn(1, 1, 4, 272, device=device)
    with pytest.raises(ValueError, match="head dim D must be at most 256, got 272"):
        tsw.sliding_window_forward_triton(big, big, big, window=2)
    out, lse = tsw.sliding_window_forward_triton(q, q, q, window=2)
    with pytest.raises(ValueError, match=r"lse must have shape \[1, 2, 10\]"):
        tsw.sliding_window_backward_triton(out, q, q, q, out, lse[..., :5], window=2)
    with pytest.raises(ValueError, match="grad_out must be torch.float32"):
        tsw.sliding_window_backward_triton(out.half(), q, q, q, out, lse, window=2)


def test_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        tsw.sliding_window_forward_triton(q, q, q, window=2)
