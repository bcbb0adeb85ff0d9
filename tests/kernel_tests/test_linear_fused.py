"""The fused C++ kernel of linear attention (causal and bidirectional) and its fallbacks.

``test_linear.py`` already runs every case through both the fused kernel (the default
path of ``linear_attention_chunked`` and the op without autograd) and the PyTorch
path (``fused=False``) against the naive fp64 reference, with one thread. Here: the
kernel with several threads (heads split between them), layouts and dtypes that take
its copy paths, the calls it must decline, and the build fallback.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings

import pytest
import torch

from attnopt.kernels import _cpp
from attnopt.kernels.linear import linear_attention_chunked
from attnopt.kernels.linear.chunked import make_plan
from attnopt.kernels.linear.fused import _SOURCE, fused_linear
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches
from tests.kernel_tests.test_linear import feature_tensors, naive_linear

TOLERANCE = KERNEL_TOLERANCE["linear"]

try:
    import ninja  # noqa: F401

    _CAN_BUILD = shutil.which("c++") is not None or shutil.which("g++") is not None
except ImportError:
    _CAN_BUILD = False

needs_build = pytest.mark.skipif(not _CAN_BUILD, reason="needs ninja and a C++ compiler")


def _problem(seed, *, b=2, h=6, hkv=3, n=150, m=150, d=16, dv=12, mask=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, m, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, m, dv, generator=gen).to(dtype)
    kv_mask = (torch.rand(b, 1, m, generator=gen) > 0.3) if mask else None
    return q, k, v, kv_mask, gen


@needs_build
def test_extension_builds_where_a_compiler_exists():
    assert _cpp.load_extension(_SOURCE) is not None


@needs_build
@pytest.mark.parametrize("feature_map", ["elu", "relu", "softmax_rf", "hedgehog"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_matches_naive_with_threads(feature_map, threads, causal):
    q, k, v, kv_mask, gen = _problem(threads)
    tensors = feature_tensors(feature_map, 6, 3, 16, None, gen)
    named = dict(zip(("q_weight", "q_bias", "k_weight", "k_bias"), tensors, strict=True))
    expected = naive_linear(
        q, k, v, kv_mask, causal=causal, feature_map=feature_map, decay=None, eps=1e-6,
        scale=1 / math.sqrt(16), tensors=tensors,
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = linear_attention_chunked(
            q, k, v, kv_mask, causal=causal, feature_map=feature_map, chunk=32, **named
        )
    finally:
        torch.set_num_threads(before)
    assert_matches(out, expected, torch.float32, TOLERANCE)


@needs_build
@pytest.mark.parametrize(
    "n, m, chunk",
    [(1, 1, 64), (1, 90, 16), (90, 1, 16), (64, 64, 64), (65, 64, 64), (37, 200, 7), (200, 37, 7)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_edges_and_dtypes(n, m, chunk, dtype, causal):
    q, k, v, kv_mask, _ = _problem(n * 1000 + m, n=n, m=m, dtype=dtype)
    # [B, N, H, D] storage seen through a transpose: rows of one head are strided.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    expected = naive_linear(
        q, k, v, kv_mask, causal=causal, feature_map="elu", decay=None, eps=1e-6,
        scale=1 / math.sqrt(16), tensors=(None,) * 4,
    )  # fmt: skip
    out = linear_attention_chunked(q, k, v, kv_mask, causal=causal, chunk=chunk)
    assert_matches(out, expected, dtype, TOLERANCE)
    pytorch = linear_attention_chunked(q, k, v, kv_mask, causal=causal, chunk=chunk, fused=False)
    assert_matches(pytorch, expected, dtype, TOLERANCE)


@needs_build
def test_fused_rows_without_keys_are_zero():
    q, k, v, _, _ = _problem(5)
    kv_mask = torch.ones(2, 1, 150, dtype=torch.bool)
    kv_mask[0] = False
    kv_mask[1, :, :40] = False  # the first 40 queries of batch 1 see no key
    out = linear_attention_chunked(q, k, v, kv_mask, causal=True, feature_map="relu")
    assert (out[0] == 0).all() and (out[1, :, :40] == 0).all()
    expected = naive_linear(
        q, k, v, kv_mask, causal=True, feature_map="relu", decay=None, eps=1e-6,
        scale=0.25, tensors=(None,) * 4,
    )  # fmt: skip
    assert_matches(out, expected, torch.float32, TOLERANCE)


def _plan(q, k, v, *, decay=None, differentiable=False):
    return make_plan(
        q, k, v, None, scale=None, feature_map="elu", chunk=16, decay=decay,
        tensors=(None,) * 4, max_elements=None, differentiable=differentiable,
    )  # fmt: skip


@needs_build
def test_fused_declines_what_it_does_not_compute():
    q, k, v, _, _ = _problem(6, mask=False)
    assert fused_linear(_plan(q, k, v), q, k, v, 1e-6, causal=True) is not None
    assert fused_linear(_plan(q, k, v, decay=0.9), q, k, v, 1e-6, causal=True) is None
    assert fused_linear(_plan(q, k, v, differentiable=True), q, k, v, 1e-6, causal=False) is None
    q64, k64, v64 = q.double(), k.double(), v.double()
    assert fused_linear(_plan(q64, k64, v64), q64, k64, v64, 1e-6, causal=False) is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ATTNOPT_CPP_KERNELS", "0")
    assert _cpp.load_extension(_SOURCE) is None
    q, k, v, kv_mask, _ = _problem(7)
    out = linear_attention_chunked(q, k, v, kv_mask, causal=True)
    expected = naive_linear(
        q, k, v, kv_mask, causal=True, feature_map="elu", decay=None, eps=1e-6,
        scale=0.25, tensors=(None,) * 4,
    )  # fmt: skip
    assert_matches(out, expected, torch.float32, TOLERANCE)


def test_a_failed_build_warns_once_and_returns_none(tmp_path):
    source = tmp_path / "broken_kernel.cpp"
    source.write_text("this is not C++\n")
    with pytest.warns(RuntimeWarning, match="could not build the C\\+\\+ CPU kernel"):
        assert _cpp.load_extension(source) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cpp.load_extension(source) is None  # cached: no second build, no warning


@needs_build
@pytest.mark.parametrize("n, m", [(40, 300), (300, 40), (128, 128)])
def test_learnt_maps_are_applied_to_each_position_once(monkeypatch, n, m):
    """The fused path maps queries and keys a group of positions at a time: every query
    and key row exactly once, whatever the offset between them (a negative slice end
    once mapped nearly all queries for every group: right result, 30x the work)."""
    import attnopt.kernels.linear.fused as fused_module

    q, k, v, kv_mask, gen = _problem(11, n=n, m=m)
    tensors = feature_tensors("hedgehog", 6, 3, 16, None, gen)
    named = dict(zip(("q_weight", "q_bias", "k_weight", "k_bias"), tensors, strict=True))
    seen = {"queries": 0, "keys": 0}
    real = fused_module.apply_feature_map

    def counting(x, *args, query=False, **kw):
        seen["queries" if query else "keys"] += x.shape[-2]
        return real(x, *args, query=query, **kw)

    monkeypatch.setattr(fused_module, "apply_feature_map", counting)
    monkeypatch.setattr(fused_module, "GROUP_ELEMENTS", 1)  # one chunk per group
    out = linear_attention_chunked(
        q, k, v, kv_mask, causal=True, feature_map="hedgehog", chunk=16, **named
    )
    assert seen == {"queries": n, "keys": m}
    expected = naive_linear(
        q, k, v, kv_mask, causal=True, feature_map="hedgehog", decay=None, eps=1e-6,
        scale=0.25, tensors=tensors,
    )  # fmt: skip
    assert_matches(out, expected, torch.float32, TOLERANCE)


def test_cpp_kernels_disabled_restores_the_environment(monkeypatch):
    from attnopt.kernels import cpp_kernels_disabled, cpp_kernels_enabled

    monkeypatch.delenv("ATTNOPT_CPP_KERNELS", raising=False)
    with cpp_kernels_disabled():
        assert not cpp_kernels_enabled()
        assert _cpp.load_extension(_SOURCE) is None
    assert cpp_kernels_enabled() and "ATTNOPT_CPP_KERNELS" not in os.environ
    monkeypatch.setenv("ATTNOPT_CPP_KERNELS", "off")
    with cpp_kernels_disabled():
        pass
    assert os.environ["ATTNOPT_CPP_KERNELS"] == "off"
