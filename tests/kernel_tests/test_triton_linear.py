"""Triton linear attention (causal chunked and bidirectional, forward and backward) and
its decode step, against the PyTorch reference.

Metric: ``TRITON_TOLERANCE`` / ``TRITON_GRAD_TOLERANCE`` of ``triton_support`` (one
table for every Triton kernel): elementwise ``|out - ref| <= atol + rtol·|ref|``, the
reference computed in fp32 on the same (already rounded) inputs; gradients against
autograd through the reference. Every output buffer the kernels get is pre-filled with
NaN, so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt.kernels._triton import triton_available
from attnopt.kernels.linear.feature_maps import apply_feature_map, orthogonal_gaussian
from attnopt.kernels.linear.reference import linear_attention_reference
from tests.kernel_tests.triton_support import assert_close, interpreter_dtype, triton_devices

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

if triton_available():
    from attnopt.kernels.linear import triton_linear
    from attnopt.kernels.linear.triton_decode import linear_decode_step_triton
    from attnopt.kernels.linear.triton_linear import linear_attention_triton, linear_backward_triton

DEVICES = triton_devices()


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Kernel outputs start as NaN: an unwritten element cannot pass as a value."""

    def alloc(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_linear, "_alloc", alloc)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    N: int
    M: int
    causal: bool
    H: int = 2
    Hkv: int = 2
    D: int = 16
    Dv: int = 32
    B: int = 1
    chunk: int = 16
    decay: float | tuple[float, ...] | None = None
    mask: str | None = None  # None, "keys" ([B, 1, M]) or "heads" ([B, H, M])
    feature_map: str = "elu"
    dtype: torch.dtype = torch.float32


CASES = [
    Case("causal-N1", 1, 1, True),
    Case("causal-63-chunk16", 63, 63, True, D=24),
    Case("causal-300-chunk64-decay", 300, 300, True, chunk=64, decay=0.97),
    Case("causal-prefix-gqa-chunk20", 21, 70, True, H=4, Hkv=2, chunk=20, decay=(0.9, 0.8, 1, 0.5)),
    Case("causal-more-queries-than-keys", 40, 25, True, chunk=16),
    Case("causal-padding-heads-gqa", 45, 45, True, Hkv=1, B=2, mask="heads", decay=0.9),
    Case("causal-padding-relu", 33, 50, True, mask="keys", feature_map="relu"),
    Case("causal-softmax_rf", 37, 37, True, feature_map="softmax_rf", decay=0.95),
    Case("causal-hedgehog-gqa", 29, 29, True, H=4, Hkv=2, feature_map="hedgehog", mask="keys"),
    Case("causal-fp16", 50, 50, True, dtype=torch.float16, decay=0.9),
    Case("causal-bf16", 50, 50, True, dtype=torch.bfloat16),
    Case("bidir-N1", 1, 9, False),
    Case("bidir-63", 63, 63, False, D=24),
    Case("bidir-300-padding-gqa", 300, 117, False, Hkv=1, mask="heads"),
    Case("bidir-relu-padding", 30, 41, False, mask="keys", feature_map="relu"),
    Case("bidir-hedgehog", 20, 33, False, feature_map="hedgehog"),
    Case("bidir-fp16", 40, 40, False, dtype=torch.float16),
]


def _inputs(c: Case, device: str):
    dtype = interpreter_dtype(c.dtype, device)
    gen = torch.Generator().manual_seed(len(c.name) * 1000 + c.N)
    q = torch.randn(c.B, c.H, c.N, c.D, generator=gen).to(device, dtype)
    k = torch.randn(c.B, c.Hkv, c.M, c.D, generator=gen).to(device, dtype)
    v = torch.randn(c.B, c.Hkv, c.M, c.Dv, generator=gen).to(device, dtype)
    if c.feature_map == "relu":
        # Keep every query's normaliser away from 0 so gradients stay O(1).
        q, k = q.abs() + 0.1, k + 0.5
    mask = None
    if c.mask is not None:
        heads = 1 if c.mask == "keys" else c.H
        mask = torch.rand(c.B, heads, c.M, generator=gen) > 0.3
        mask[..., -1] = True
        mask = mask.to(device)
    tensors = {}
    if c.feature_map == "softmax_rf":
        proj = orthogonal_gaussian(c.D, 2 * c.D, seed=3).to(device)
        tensors = dict(q_weight=proj, k_weight=proj)
    elif c.feature_map == "hedgehog":
        f = c.D
        tensors = dict(
            q_weight=torch.randn(c.H, c.D, f, generator=gen).to(device) * 0.3,
            q_bias=torch.randn(c.H, f, generator=gen).to(device) * 0.1,
            k_weight=torch.randn(c.Hkv, c.D, f, generator=gen).to(device) * 0.3,
            k_bias=torch.randn(c.Hkv, f, generator=gen).to(device) * 0.1,
        )
    return q, k, v, mask, tensors, dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_backward_match_reference(case: Case, device: str):
    q, k, v, mask, tensors, dtype = _inputs(case, device)
    kw = dict(causal=case.causal, feature_map=case.feature_map, decay=case.decay, **tensors)
    leaves = [t.requires_grad_() for t in (q, k, v, *tensors.values())]
    out = linear_attention_triton(q, k, v, mask, chunk=case.chunk, **kw)
    ref = linear_attention_reference(q, k, v, mask, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what="forward")

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    names = ["dq", "dk", "dv", *(f"d{n}" for n in tensors)]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, dtype if name in ("dq", "dk", "dv") else torch.float32, grad=True,
                     what=name)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "feature_map, causal, tensor_grads",
    [("elu", True, False), ("hedgehog", True, True), ("softmax_rf", False, False)],
)
def test_op_backward_kernel(feature_map, causal, tensor_grads, device):
    """The backward op's CUDA body (recomputes the forward; feature-map gradients through
    torch.func.vjp) against autograd through the reference."""
    case = Case("op", 26, 30, causal, Hkv=1, feature_map=feature_map, mask="keys")
    q, k, v, mask, tensors, dtype = _inputs(case, device)
    full = tuple(tensors.get(n) for n in ("q_weight", "q_bias", "k_weight", "k_bias"))
    grad_out = torch.randn(1, 2, 26, case.Dv, generator=torch.Generator().manual_seed(1))
    grads = linear_backward_triton(
        grad_out.to(device), q, k, v, mask, scale=0.25, causal=causal, feature_map=feature_map,
        chunk=16, decay=None, eps=1e-6, tensors=full, tensor_grads=tensor_grads,
    )  # fmt: skip
    leaves = [t.requires_grad_() for t in (q, k, v)]
    present = [i for i, t in enumerate(full) if t is not None and tensor_grads]
    leaves += [full[i].requires_grad_() for i in present]
    ref = linear_attention_reference(
        q, k, v, mask, scale=0.25, causal=causal, feature_map=feature_map, **tensors
    )
    want = torch.autograd.grad(ref, leaves, grad_out.to(device))
    for name, g, w in zip(["dq", "dk", "dv"], grads[:3], want[:3]):
        assert_close(g, w, dtype, grad=True, what=name)
    for i, w in zip(present, want[3:]):
        assert_close(grads[3 + i], w, torch.float32, grad=True, what=f"tensor {i}")
    for i in range(4):
        if i not in present:
            assert grads[3 + i].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "feature_map, decay, masked, dtype",
    [
        ("elu", None, False, torch.float32),
        ("relu", (0.9, 0.7, 1.0, 0.5), True, torch.float32),
        (None, 0.8, True, torch.float32),  # softmax_rf features computed first
        ("elu", 0.95, False, torch.float16),
    ],
    ids=["elu", "relu-decay-padding", "features-decay-padding", "elu-fp16"],
)
def test_decode_step_matches_full_causal_attention(feature_map, decay, masked, dtype, device):
    B, H, Hkv, T, D, Dv = 2, 4, 2, 5, 16, 24
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, T, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=gen).to(device, dtype)
    if feature_map == "relu":
        q, k = q.abs() + 0.1, k + 0.5
    mask = None
    if masked:
        mask = (torch.rand(B, H, T, generator=gen) > 0.3).to(device)
        mask[..., 0] = True
    full_map, tensors, qs, ks = feature_map, {}, q, k
    if feature_map is None:
        full_map = "softmax_rf"
        proj = orthogonal_gaussian(D, 2 * D, seed=5).to(device)
        tensors = dict(q_weight=proj, k_weight=proj)
        qs = apply_feature_map(q.float(), "softmax_rf", weight=proj, scale=D**-0.5, query=True)
        ks = apply_feature_map(k.float(), "softmax_rf", weight=proj, scale=D**-0.5)
    F = qs.shape[-1]
    state = torch.zeros(B, H, F, Dv, device=device)
    norm = torch.zeros(B, H, F, device=device)
    for t in range(T):
        out = linear_decode_step_triton(
            state, norm, qs[:, :, t], ks[:, :, t], v[:, :, t],
            None if mask is None else mask[:, :, t], feature_map=feature_map, decay=decay,
        )  # fmt: skip
        ref = linear_attention_reference(
            q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
            None if mask is None else mask[:, :, : t + 1], causal=True, feature_map=full_map,
            decay=decay, **tensors,
        )[:, :, -1]  # fmt: skip
        assert out.dtype == dtype
        assert_close(out, ref, dtype, what=f"step {t}")
    assert not torch.isnan(state).any() and not torch.isnan(norm).any()


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    q = torch.randn(1, 2, 8, 16, device=device)
    kv = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="decay"):
        linear_attention_triton(q, kv, kv, causal=False, decay=0.9)
    with pytest.raises(ValueError, match="kv_mask"):
        linear_attention_triton(q, kv, kv, torch.ones(1, 3, 8, dtype=torch.bool, device=device))
    big = torch.randn(1, 1, 4, 300, device=device)
    with pytest.raises(ValueError, match="at most 256"):
        linear_attention_triton(big, big, big)
    with pytest.raises(ValueError, match="chunk"):
        linear_attention_triton(q, kv, kv, causal=True, chunk=0)
    state, norm = torch.zeros(1, 2, 16, 16, device=device), torch.zeros(1, 2, 16, device=device)
    tok = torch.randn(1, 2, 16, device=device)
    with pytest.raises(ValueError, match="float32"):
        linear_decode_step_triton(state.half(), norm, tok, tok, tok)
    with pytest.raises(ValueError, match="state must be"):
        linear_decode_step_triton(state[:, :, :8], norm, tok, tok, tok)
    with pytest.raises(ValueError, match="feature_map"):
        linear_decode_step_triton(state, norm, tok, tok, tok, feature_map="softmax_rf")
    with pytest.raises(ValueError, match="kv_mask"):
        linear_decode_step_triton(state, norm, tok, tok, tok, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_kernel_bodies_match_the_cpu_op(device):
    """The functions registered as the ops' CUDA kernels, run here on interpreter tensors
    (on a GPU the dispatcher calls them), against the ops' PyTorch path."""
    from attnopt.kernels.linear import op as linear_op

    case = Case("bodies", 20, 24, True, Hkv=1, feature_map="hedgehog", mask="keys")
    q, k, v, mask, t, _ = _inputs(case, device)
    ts = [t[n] for n in ("q_weight", "q_bias", "k_weight", "k_bias")]
    args = (0.25, True, "hedgehog", 16, [0.9], 1e-6, *ts)
    got = linear_op._linear_attention_cuda(q, k, v, mask, None, *args)
    want = torch.ops.attnopt.linear_attention(q, k, v, mask, None, *args)
    assert_close(got, want, torch.float32, what="forward body")
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    got = linear_op._linear_attention_backward_cuda(grad, q, k, v, mask, *args, True)
    want = torch.ops.attnopt.linear_attention_backward(grad, q, k, v, mask, *args, True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, grad=True, what=f"backward body output {i}")


@pytest.mark.gpu
@pytest.mark.triton
def test_op_runs_triton_on_cuda():
    """``attnopt::linear_attention`` on CUDA tensors: forward and backward through the op
    match the reference."""
    case = Case("cuda-op", 130, 150, True, H=4, Hkv=2, mask="keys", decay=0.9, chunk=64)
    q, k, v, mask, _, dtype = _inputs(case, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnopt.linear_attention(
        q, k, v, mask, None, 0.25, True, "elu", 64, [0.9], 1e-6, None, None, None, None
    )
    ref = linear_attention_reference(q, k, v, mask, causal=True, decay=0.9)
    assert_close(out, ref, dtype, what="op forward")
    grad = torch.randn_like(out)
    for name, g, w in zip(
        "qkv", torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)
    ):
        assert_close(g, w, dtype, grad=True, what=f"op d{name}")
