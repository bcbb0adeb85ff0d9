"""The fused C++ kernel of block-sparse attention and its fallbacks.

``test_block_sparse.py`` already runs every case through both the fused kernel (the
default path of ``block_sparse_attention_gather`` and of the op without autograd) and
the gather path (``fused=False``) against the naive fp64 reference, with one thread.
Here: the kernel with several threads (query blocks split between them), every kept
block count around its group size, and the calls it must decline.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.kernels.block_sparse import block_sparse_attention_gather
from attnopt.kernels.block_sparse.fused import fused_block_sparse
from attnopt.kernels.block_sparse.selection import select_blocks
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches
from tests.kernel_tests.test_block_sparse import _full_mask, naive_block_sparse
from tests.kernel_tests.test_linear_fused import needs_build

TOLERANCE = KERNEL_TOLERANCE["block_sparse"]


def _problem(seed, *, b=2, h=4, hkv=2, n=170, m=170, d=24, dv=12, mask=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, hkv, m, d, generator=gen)
    v = torch.randn(b, hkv, m, dv, generator=gen)
    kv_mask = (torch.rand(b, h, m, generator=gen) > 0.2) if mask else None
    return q, k, v, kv_mask


def _expected(q, k, v, kv_mask, *, block, causal, topk):
    B, H, _, D = q.shape
    out, _ = naive_block_sparse(
        q, k, v, _full_mask(kv_mask, B, H, k.shape[2]), block=block, causal=causal,
        scale=1 / math.sqrt(D), pattern="dynamic", topk=topk, threshold=None, local=1, sinks=1,
    )  # fmt: skip
    return out


@needs_build
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("topk", [1, 3, 4, 5, 8, 9, 22])
def test_fused_matches_naive(threads, causal, topk):
    q, k, v, kv_mask = _problem(topk * 10 + threads)
    expected = _expected(q, k, v, kv_mask, block=8, causal=causal, topk=topk)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = block_sparse_attention_gather(q, k, v, kv_mask, block=8, topk=topk, causal=causal)
    finally:
        torch.set_num_threads(before)
    assert_matches(out, expected, torch.float32, TOLERANCE)


def _selection(q, k, causal=True):
    return select_blocks(
        q, k, None, block=16, causal=causal, scale=0.25, pattern="dynamic", topk=3,
        threshold=None, local_blocks=1, sink_blocks=1,
    )  # fmt: skip


@needs_build
def test_fused_declines_what_it_does_not_compute():
    q, k, v, _ = _problem(1, mask=False)
    kw = dict(block=16, scale=0.25, causal=True)
    sel = _selection(q, k)
    assert fused_block_sparse(q, k, v, None, sel, **kw) is not None
    h = [t.half() for t in (q, k, v)]
    assert fused_block_sparse(*h, None, sel, **kw) is None
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # columns not contiguous
    assert fused_block_sparse(strided, k, v, None, sel, **kw) is None
    qg = q.clone().requires_grad_()
    assert fused_block_sparse(qg, k, v, None, sel, **kw) is None
    with torch.no_grad():
        assert fused_block_sparse(qg, k, v, None, sel, **kw) is not None


def test_disabled_by_environment_keeps_the_gather_path(monkeypatch):
    monkeypatch.setenv("ATTNOPT_CPP_KERNELS", "0")
    q, k, v, kv_mask = _problem(2)
    assert (
        fused_block_sparse(q, k, v, kv_mask, _selection(q, k), block=16, scale=0.25, causal=True)
        is None
    )
    out = block_sparse_attention_gather(q, k, v, kv_mask, block=8, topk=5, causal=True)
    expected = _expected(q, k, v, kv_mask, block=8, causal=True, topk=5)
    assert_matches(out, expected, torch.float32, TOLERANCE)
