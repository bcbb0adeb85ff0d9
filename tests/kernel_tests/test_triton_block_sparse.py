"""Triton block-sparse attention and selection against the PyTorch definitions.

The kernels take a selection as given, so each case selects blocks once with
``select_blocks`` on the CPU and checks the kernel against the reference on exactly
those blocks: ``masked_attention`` over ``block_sparse_visible`` in fp32 on the same
(already rounded) inputs, forward and, through autograd, backward. The selection
kernel is checked for equality with ``select_blocks`` (random inputs, so no exact
ties). Metric and thresholds: the one table of ``triton_support``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt.kernels.block_sparse import block_layout, select_blocks
from attnopt.kernels.block_sparse import op as bs_op
from attnopt.kernels.block_sparse.gather import block_sparse_forward
from attnopt.kernels.block_sparse.reference import block_sparse_visible
from attnopt.kernels.block_sparse.selection import BlockSelection, kept_blocks
from attnopt.kernels.dense.reference import masked_attention
from tests.kernel_tests.triton_support import assert_close, interpreter_dtype, triton_devices

tbs = pytest.importorskip("attnopt.kernels.block_sparse.triton_block_sparse")
tsel = pytest.importorskip("attnopt.kernels.block_sparse.triton_selection")

DEVICES = triton_devices()


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    B: int = 1
    H: int = 2
    Hkv: int = 1
    N: int = 63
    M: int | None = None  # None: M = N
    D: int = 16
    Dv: int | None = None  # None: Dv = D
    block: int = 16
    causal: bool = True
    mask: str | None = None  # None, "batch" ([B, 1, M]) or "head" ([B, H, M])
    topk: int | None = 2
    threshold: float | None = None
    local: int = 1
    sinks: int = 1
    pattern: str = "dynamic"
    dtype: torch.dtype = torch.float32
    strided: bool = False  # q, k, v as transposed views of [B, N, H, D]

    @property
    def kv_len(self) -> int:
        return self.N if self.M is None else self.M


CASES = [
    Case("n1-causal", N=1, M=40),
    Case("n63-causal-gqa-group4", H=4, Hkv=1),
    Case("n300-bidir-block32", N=300, block=32, causal=False, topk=3),
    Case("m100-n40-causal-padding", B=2, N=40, M=100, mask="batch", topk=3),
    Case("n80-m50-causal", N=80, M=50, local=2, sinks=0),
    Case("bidir-head-padding-gqa", N=50, M=70, causal=False, mask="head", topk=3),
    Case("threshold-padding-causal", N=90, mask="batch", topk=None, threshold=0.8),
    Case("fp16", N=70, mask="batch", dtype=torch.float16),
    Case("bf16", N=70, causal=False, dtype=torch.bfloat16),
    Case("d48-dv32-block24", N=60, D=48, Dv=32, block=24),
    Case("d256-dv128-block32", N=20, M=50, D=256, Dv=128, block=32, causal=False, topk=1),
    Case("a-shape-strided", N=64, pattern="a-shape", topk=None, strided=True),
    Case("dense-topk", N=50, M=45, causal=False, topk=8, sinks=0),
]


def _inputs(case: Case, device: str, dtype: torch.dtype, requires_grad=False):
    """Fresh random q, k, v and kv_mask on ``device`` (seeded by the autouse fixture)."""
    B, H, Hkv, N, M, D = case.B, case.H, case.Hkv, case.N, case.kv_len, case.D
    Dv = case.D if case.Dv is None else case.Dv
    if case.strided:
        q = torch.randn(B, N, H, D).transpose(1, 2)
        k = torch.randn(B, M, Hkv, D).transpose(1, 2)
        v = torch.randn(B, M, Hkv, Dv).transpose(1, 2)
    else:
        q, k, v = torch.randn(B, H, N, D), torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, Dv)
    kv_mask = None
    if case.mask is not None:
        kv_mask = torch.rand(B, H if case.mask == "head" else 1, M) > 0.3
        kv_mask[..., :16] = False  # a whole padding block
        if B > 1:
            kv_mask[1] = False  # a batch row whose queries see nothing: zeros
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, None if kv_mask is None else kv_mask.to(device)


def _select(case: Case, q, k, kv_mask, scale):
    sel = select_blocks(
        q.detach().cpu().float(),
        k.detach().cpu().float(),
        None if kv_mask is None else kv_mask.cpu(),
        block=case.block,
        causal=case.causal,
        scale=scale,
        pattern=case.pattern,
        topk=case.topk,
        threshold=case.threshold,
        local_blocks=case.local,
        sink_blocks=case.sinks,
    )
    return BlockSelection(sel.index.to(q.device), sel.count.to(q.device))


def _reference(q, k, v, kv_mask, sel, *, block, scale, causal):
    """The definition: dense attention over the selection's visible keys, fp32, CPU."""
    visible = block_sparse_visible(
        BlockSelection(sel.index.cpu(), sel.count.cpu()),
        q.shape[2],
        k.shape[2],
        block=block,
        causal=causal,
        kv_mask=None if kv_mask is None else kv_mask.cpu(),
    )
    return masked_attention(q, k, v, visible, scale=scale)


def _leaf(t):
    return t.detach().cpu().float().requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_reference(case, device):
    dtype = interpreter_dtype(case.dtype, device)
    q, k, v, kv_mask = _inputs(case, device, dtype, requires_grad=True)
    scale = case.D**-0.5
    sel = _select(case, q, k, kv_mask, scale)
    out, lse = tbs.block_sparse_attention_triton(
        q, k, v, kv_mask, sel, block=case.block, scale=scale, causal=case.causal, return_lse=True
    )
    rq, rk, rv = _leaf(q), _leaf(k), _leaf(v)
    geo = dict(block=case.block, scale=scale, causal=case.causal)
    ref = _reference(rq, rk, rv, kv_mask, sel, **geo)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out.cpu(), ref, dtype, what=f"{case.id} out")
    # The CPU gather kernel on the same selection agrees too (same semantics).
    gathered = block_sparse_forward(
        rq.detach(), rk.detach(), rv.detach(), None if kv_mask is None else kv_mask.cpu(),
        BlockSelection(sel.index.cpu(), sel.count.cpu()), **geo,
    )  # fmt: skip
    assert_close(out.cpu(), gathered, dtype, what=f"{case.id} out vs gather")
    # The logsumexp of visible scores; rows that see nothing hold +inf.
    assert not torch.isnan(lse).any() and lse.dtype == torch.float32
    if case.mask is not None and case.B > 1:
        assert torch.isinf(lse[1]).all() and (out[1] == 0).all()

    grad = torch.randn(out.shape).to(device=device, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.cpu().float())
    for name, t, r in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        assert t.grad.dtype == dtype
        assert_close(t.grad.cpu(), r.grad, dtype, grad=True, what=f"{case.id} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_selection_rows_are_zero(device):
    """Query blocks that keep no block (count 0) return 0 and pass no gradient."""
    case = Case("empty", N=48, causal=False, topk=2)
    q, k, v, kv_mask = _inputs(case, device, torch.float32, requires_grad=True)
    sel = _select(case, q, k, kv_mask, 0.25)
    count = sel.count.clone()
    count[:, :, 1] = 0
    sel = BlockSelection(sel.index, count)
    out = tbs.block_sparse_attention_triton(q, k, v, None, sel, block=16, scale=0.25)
    assert (out[:, :, 16:32] == 0).all()
    rq, rk, rv = _leaf(q), _leaf(k), _leaf(v)
    ref = _reference(rq, rk, rv, None, sel, block=16, scale=0.25, causal=False)
    assert_close(out.cpu(), ref, torch.float32, what="out")
    grad = torch.randn(out.shape).to(device)
    out.backward(grad)
    ref.backward(grad.cpu())
    assert (q.grad[:, :, 16:32] == 0).all()
    for name, t, r in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        assert_close(t.grad.cpu(), r.grad, torch.float32, grad=True, what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_recomputes_forward_without_saved_state(device):
    """Without ``out`` and ``lse`` the backward runs the forward itself: same gradients."""
    case = Case("recompute", N=40, mask="head")
    q, k, v, kv_mask = _inputs(case, device, torch.float32)
    sel = _select(case, q, k, kv_mask, 0.25)
    geo = dict(block=16, scale=0.25, causal=True)
    out, lse = tbs.block_sparse_forward_triton(q, k, v, kv_mask, sel, **geo)
    grad = torch.randn(out.shape).to(device)
    saved = tbs.block_sparse_backward_triton(grad, q, k, v, kv_mask, sel, out=out, lse=lse, **geo)
    again = tbs.block_sparse_backward_triton(grad, q, k, v, kv_mask, sel, **geo)
    for a, b in zip(saved, again, strict=True):
        assert torch.equal(a, b)


def test_transpose_selection_reads_the_selection_by_key_block():
    q, k = torch.randn(2, 3, 100, 8), torch.randn(2, 3, 90, 8)
    sel = select_blocks(q, k, block=16, causal=False, scale=0.3, topk=3)
    nk = block_layout(100, 90, 16, False).num_k_blocks
    tsel_ = tbs.transpose_selection(sel, nk)
    kept = kept_blocks(sel, nk)  # [B, H, nQ, nK]
    back = kept_blocks(tsel_, kept.shape[2])  # [B, H, nK, nQ]
    assert torch.equal(back, kept.transpose(-1, -2))
    assert tsel_.index.dtype == torch.int32 and tsel_.count.dtype == torch.int32
    counts = tsel_.count.unsqueeze(-1)
    # Query blocks increase within each row.
    used = torch.arange(tsel_.index.shape[-1]) < counts
    diffs = tsel_.index.diff(dim=-1)
    assert (diffs[used[..., 1:]] > 0).all()


# -- selection kernel ----------------------------------------------------------------------------

SELECTION_CASES = [
    Case("topk-causal-gqa", N=100, topk=3),
    Case("topk-bidir-padding-local2", B=2, N=60, M=90, causal=False, mask="batch", local=2),
    Case("threshold-causal-head-padding", N=100, mask="head", topk=None, threshold=0.6),
    Case("threshold-bidir-sinks2", N=120, causal=False, topk=None, threshold=0.9, sinks=2),
    Case("threshold-1-m-gt-n", N=40, M=100, topk=None, threshold=1.0, sinks=0),
    Case("n1-topk", N=1, M=70, topk=2),
    Case("n-gt-m-causal-fp16", N=80, M=50, topk=2, dtype=torch.float16),
    Case("a-shape", N=64, pattern="a-shape", topk=None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda c: c.id)
def test_selection_kernel_matches_select_blocks(case, device):
    dtype = interpreter_dtype(case.dtype, device)
    q, k, _, kv_mask = _inputs(case, device, dtype)
    kw = dict(
        block=case.block,
        causal=case.causal,
        scale=case.D**-0.5,
        pattern=case.pattern,
        topk=case.topk,
        threshold=case.threshold,
        local_blocks=case.local,
        sink_blocks=case.sinks,
    )
    got = tsel.select_blocks_triton(q, k, kv_mask, **kw)
    want = select_blocks(q, k, kv_mask, **kw)
    assert got.index.dtype == torch.int32 and got.count.dtype == torch.int32
    assert torch.equal(got.count.cpu(), want.count.cpu()), case.id
    assert torch.equal(got.index.cpu(), want.index.cpu()), case.id


@pytest.mark.parametrize("device", DEVICES)
def test_selection_of_long_rows_chooses_in_pytorch(device, monkeypatch):
    """Rows too long for registers: Triton logits, the choice by select_blocks' code."""
    monkeypatch.setattr(tsel, "_MAX_ROW", 4)
    case = Case("long-rows", N=100, mask="batch", topk=None, threshold=0.7)
    q, k, _, kv_mask = _inputs(case, device, torch.float32)
    kw = dict(block=16, causal=True, scale=0.25, threshold=0.7)
    got = tsel.select_blocks_triton(q, k, kv_mask, **kw)
    want = select_blocks(q, k, kv_mask, **kw)
    assert torch.equal(got.count.cpu(), want.count.cpu())
    assert torch.equal(got.index.cpu(), want.index.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_block_logits_kernel_matches_pooled_definition(device):
    """Logits against pooling written out here: mean q per block, mean visible k."""
    B, H, Hkv, N, M, D, bs = 1, 2, 1, 40, 40, 16, 16
    q, k = torch.randn(B, H, N, D), torch.randn(B, Hkv, M, D)
    kv_mask = torch.rand(B, 1, M) > 0.3
    got = tsel.block_logits_triton(
        q.to(device), k.to(device), kv_mask.to(device), block=bs, causal=False, scale=0.5
    ).cpu()
    want = torch.empty(B, H, 3, 3)
    for h in range(H):
        for r in range(3):
            pq = q[0, h, r * bs : (r + 1) * bs].mean(0)
            for c in range(3):
                keys = k[0, 0, c * bs : (c + 1) * bs][kv_mask[0, 0, c * bs : (c + 1) * bs]]
                want[0, h, r, c] = pq @ keys.mean(0) * 0.5 + torch.tensor(len(keys)).log()
    assert_close(got, want, torch.float32, what="logits")


# -- the op on CUDA ------------------------------------------------------------------------------

OP_CASES = [
    Case("op-topk-causal-padding", N=40, mask="batch", topk=3),
    Case("op-threshold-bidir", N=40, M=64, causal=False, topk=None, threshold=0.8),
    Case("op-radial", N=80, pattern="radial", topk=None),
]


def _op_args(case: Case, scale: float):
    return (
        scale,
        case.causal,
        case.block,
        case.topk,
        case.threshold,
        case.local,
        case.sinks,
        case.pattern,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)
def test_op_cuda_kernels_match_the_pytorch_path(case, device):
    """The functions registered as the ops' CUDA kernels (run here on whatever device
    Triton takes) against the ops' PyTorch path on CPU."""
    q, k, v, kv_mask = _inputs(case, device, torch.float32)
    args = _op_args(case, case.D**-0.5)
    out = bs_op._block_sparse_attention_triton(q, k, v, kv_mask, None, *args)
    cpu = [t.cpu() if t is not None else None for t in (q, k, v, kv_mask)]
    ref = torch.ops.attnopt.block_sparse_attention(*cpu, None, *args)
    assert_close(out.cpu(), ref, torch.float32, what="op out")
    grad = torch.randn(out.shape)
    grads = bs_op._block_sparse_attention_backward_triton(grad.to(device), q, k, v, kv_mask, *args)
    refs = torch.ops.attnopt.block_sparse_attention_backward(grad, *cpu, *args)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert_close(g.cpu(), r, torch.float32, grad=True, what=f"op {name}")


@pytest.mark.gpu
@pytest.mark.triton
def test_op_dispatches_to_triton_on_cuda():
    """On a GPU the op itself (dispatch, autograd) runs and agrees with the CPU path."""
    case = Case("op-cuda", H=4, Hkv=2, N=200, block=32, mask="batch", topk=3)
    q, k, v, kv_mask = _inputs(case, "cuda", torch.float16, requires_grad=True)
    args = _op_args(case, case.D**-0.5)
    out = torch.ops.attnopt.block_sparse_attention(q, k, v, kv_mask, None, *args)
    rq, rk, rv = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    ref = torch.ops.attnopt.block_sparse_attention(rq, rk, rv, kv_mask.cpu(), None, *args)
    assert_close(out.cpu(), ref, torch.float16, what="out")
    grad = torch.randn(out.shape, dtype=torch.float16)
    out.backward(grad.cuda())
    ref.backward(grad)
    for name, t, r in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        assert_close(t.grad.cpu(), r.grad, torch.float16, grad=True, what=name)


@pytest.mark.parametrize("device", DEVICES)
def test_no_keys_gives_zeros(device):
    q, k = torch.randn(1, 2, 20, 16, device=device), torch.randn(1, 1, 0, 16, device=device)
    sel = select_blocks(q, k, block=16, causal=False, scale=0.25, topk=1)
    out, lse = tbs.block_sparse_forward_triton(
        q, k, k, None, sel, block=16, scale=0.25, causal=False
    )
    assert (out == 0).all() and torch.isinf(lse).all()


def test_op_cuda_kernel_keeps_wide_heads_on_the_pytorch_path():
    """Head dims the kernels do not take (> 256) run the PyTorch path even on CUDA."""
    case = Case("wide", N=20, D=272, topk=1)
    q, k, v, _ = _inputs(case, "cpu", torch.float32)
    args = _op_args(case, 0.1)
    out = bs_op._block_sparse_attention_triton(q, k, v, None, None, *args)
    assert torch.equal(out, torch.ops.attnopt.block_sparse_attention(q, k, v, None, None, *args))
    grad = torch.randn(out.shape)
    grads = bs_op._block_sparse_attention_backward_triton(grad, q, k, v, None, *args)
    refs = torch.ops.attnopt.block_sparse_attention_backward(grad, q, k, v, None, *args)
    for g, r in zip(grads, refs, strict=True):
        assert torch.equal(g, r)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_errors_name_the_argument(device):
    case = Case("errors", N=32)
    q, k, v, _ = _inputs(case, device, torch.float32)
    sel = _select(case, q, k, None, 0.25)
    geo = dict(block=16, scale=0.25, causal=True)
    fwd = tbs.block_sparse_forward_triton
    with pytest.raises(ValueError, match=r"dtype must be one of .*float64"):
        fwd(q.double(), k.double(), v.double(), None, sel, **geo)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 256\].* got 272"):
        big = torch.randn(1, 2, 32, 272, device=device)
        fwd(big, big[:, :1], big[:, :1], None, sel, **geo)
    with pytest.raises(
        ValueError, match=r"selection.index must be \[B, H, nQ, K\] = \[1, 2, 1, K\]"
    ):
        fwd(q, k, v, None, sel, block=32, scale=0.25, causal=True)
    with pytest.raises(ValueError, match=r"selection.index must be int32 .* got torch.int64"):
        fwd(q, k, v, None, BlockSelection(sel.index.long(), sel.count), **geo)
    with pytest.raises(ValueError, match=r"selection must be a BlockSelection"):
        fwd(q, k, v, None, sel.index, **geo)
    bwd = tbs.block_sparse_backward_triton
    with pytest.raises(ValueError, match=r"grad_out must be \[B, H, N, Dv\]"):
        bwd(q[:, :, :5], q, k, v, None, sel, **geo)
    with pytest.raises(ValueError, match=r"give both out and lse"):
        bwd(q, q, k, v, None, sel, out=q, **geo)


def test_launcher_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 16, 16)
    sel = select_blocks(q, q, block=16, causal=False, scale=0.25, topk=1)
    with pytest.raises(ValueError, match=r"run on CUDA tensors .* got tensors on cpu"):
        tbs.block_sparse_forward_triton(q, q, q, None, sel, block=16, scale=0.25, causal=False)
    with pytest.raises(ValueError, match=r"run on CUDA tensors .* got tensors on cpu"):
        tsel.select_blocks_triton(q, q, block=16, causal=False, scale=0.25, topk=1)
