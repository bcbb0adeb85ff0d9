"""The fused C++ kernel of hybrid attention and its fallbacks.

``test_hybrid.py`` already runs every case through both the fused kernel (the default
path of ``hybrid_attention_blockwise`` and of the op without autograd, for the elu and
relu maps) and the blockwise path (``fused=False``) against the naive fp64 reference,
with one thread. Here: several threads, windows shorter and longer than a chunk and
than the sequence, a per-head mix, and the calls the kernel must decline.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnopt.kernels.hybrid import fused as fused_module
from attnopt.kernels.hybrid import hybrid_attention_blockwise
from attnopt.kernels.hybrid.fused import MAX_WINDOW, fused_hybrid
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches
from tests.kernel_tests.test_hybrid import NAMES, naive_hybrid
from tests.kernel_tests.test_linear import feature_tensors
from tests.kernel_tests.test_linear_fused import needs_build

TOLERANCE = KERNEL_TOLERANCE["hybrid"]


def _problem(seed, *, b=2, h=4, hkv=2, n=150, m=150, d=16, dv=12):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, hkv, m, d, generator=gen)
    v = torch.randn(b, hkv, m, dv, generator=gen)
    kv_mask = torch.rand(b, h, m, generator=gen) > 0.25
    mix = torch.randn(h, generator=gen)
    return q, k, v, kv_mask, mix


def _naive(q, k, v, kv_mask, *, window, sinks, feature_map, mix, tensors=(None,) * 4):
    return naive_hybrid(
        q, k, v, kv_mask, window=window, sinks=sinks, scale=1 / math.sqrt(q.shape[-1]),
        feature_map=feature_map, tensors=tensors, mix_logit=mix,
    )  # fmt: skip


@needs_build
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "window, sinks, chunk", [(1, 0, 16), (7, 3, 16), (40, 2, 16), (500, 1, 32)]
)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_fused_matches_naive(threads, window, sinks, chunk, feature_map):
    q, k, v, kv_mask, mix = _problem(window + threads)
    expected = _naive(
        q, k, v, kv_mask, window=window, sinks=sinks, feature_map=feature_map, mix=mix
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = hybrid_attention_blockwise(
            q, k, v, kv_mask, window=window, sinks=sinks, feature_map=feature_map, chunk=chunk,
            mix_logit=mix,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert_matches(out, expected, torch.float32, TOLERANCE)


@needs_build
@pytest.mark.parametrize("n, m", [(1, 120), (33, 120), (120, 33), (64, 64)])
def test_fused_offsets_and_no_mix(n, m):
    q, k, v, kv_mask, _ = _problem(n + m, n=n, m=m)
    expected = _naive(q, k, v, kv_mask, window=10, sinks=2, feature_map="elu", mix=None)
    out = hybrid_attention_blockwise(q, k, v, kv_mask, window=10, sinks=2, chunk=16)
    assert_matches(out, expected, torch.float32, TOLERANCE)


@needs_build
@pytest.mark.parametrize("feature_map", ["hedgehog", "softmax_rf"])
@pytest.mark.parametrize("n, m", [(150, 150), (40, 200), (200, 40)])
@pytest.mark.parametrize("small_groups", [False, True])
def test_fused_learnt_maps(monkeypatch, feature_map, n, m, small_groups):
    """Learnt and random maps are applied in groups of rows (one chunk per group with
    ``small_groups``), the kernel carrying the state from one group to the next."""
    if small_groups:
        monkeypatch.setattr(fused_module, "GROUP_ELEMENTS", 1)
    q, k, v, kv_mask, mix = _problem(n + m, n=n, m=m)
    gen = torch.Generator().manual_seed(5)
    tensors = feature_tensors(feature_map, 4, 2, 16, None, gen)
    named = dict(zip(NAMES, tensors, strict=True))
    expected = _naive(
        q, k, v, kv_mask, window=9, sinks=2, feature_map=feature_map, mix=mix, tensors=tensors
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = hybrid_attention_blockwise(
            q, k, v, kv_mask, window=9, sinks=2, feature_map=feature_map, chunk=16,
            mix_logit=mix, **named,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert_matches(out, expected, torch.float32, TOLERANCE)


def _call(q, k, v, **kw):
    args = dict(
        window=8, sinks=1, scale=0.25, feature_map="elu", chunk=16, mix_logit=None,
        differentiable=False,
    )  # fmt: skip
    return fused_hybrid(q, k, v, None, **{**args, **kw})


@needs_build
def test_fused_declines_what_it_does_not_compute():
    q, k, v, _, mix = _problem(3)
    assert _call(q, k, v) is not None
    assert _call(q, k, v, differentiable=True) is None
    assert _call(q, k, v, window=MAX_WINDOW + 1) is None
    assert _call(*(t.half() for t in (q, k, v))) is None
    assert _call(q, k, v, mix_logit=mix.requires_grad_()) is None
    with torch.no_grad():
        assert _call(q, k, v, mix_logit=mix) is not None
