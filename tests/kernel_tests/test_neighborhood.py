"""Neighbourhood attention: reference, tiled kernel and custom op against a naive
implementation written here from the definition, plus gradients, errors, export and
end-to-end rewrites of tiny ViT/BERT models.

Metric: elementwise ``|out - naive| <= atol + rtol * |naive|`` where ``naive`` is the
fp64 computation on the same (already rounded) inputs.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnopt
from attnopt.capture import example_inputs_for
from attnopt.config import config_from_dict
from attnopt.kernels import get_variant
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.kernels.neighborhood import (
    Neighborhood,
    neighborhood_attention_reference,
    neighborhood_attention_tiled,
)
from attnopt.kernels.neighborhood.reference import neighborhood_visible
from attnopt.site import AttentionSite, MaskKind
from attnopt.zoo import tiny_model
from tests.kernel_tests.cpu_support import KERNEL_TOLERANCE, assert_matches

TOLERANCE = KERNEL_TOLERANCE["neighborhood"]

OP = torch.ops.attnopt.neighborhood_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every problem here is tiny: a second thread only adds synchronisation per op,
    which stalls badly when the CPU is shared (gradcheck runs thousands of ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the naive truth ---------------------------------------------------------------------------


def naive_axis_window(x, length, kernel, dilation, stride, causal):
    """Coordinates on one axis that query coordinate ``x`` sees, from the definition."""
    positions = list(range(x % dilation, length, dilation))  # the query's dilation class
    i = positions.index(x)
    n = len(positions)
    if causal:
        return set(positions[max(0, i - kernel + 1) : i + 1])
    if kernel >= n:
        return set(positions)
    centre = (i // stride) * stride + stride // 2  # the stride group's shared centre
    start = centre - kernel // 2
    if start < 0:
        start = 0
    if start + kernel > n:
        start = n - kernel
    return set(positions[start : start + kernel])


def naive_visible(n, grid, kernel, dilation, stride, causal):
    """[N, N] bool: extra tokens global, grid tokens see their window on every axis."""
    extra = n - math.prod(grid)
    cells = itertools.product(*(range(g) for g in grid))  # row-major
    visible = torch.ones(n, n, dtype=torch.bool)
    for qi, qc in enumerate(cells):
        row = torch.ones((), dtype=torch.bool)
        for a in range(len(grid)):
            window = naive_axis_window(qc[a], grid[a], kernel[a], dilation[a], stride[a], causal[a])
            seen = torch.tensor([y in window for y in range(grid[a])])
            row = row[..., None] & seen  # key seen iff inside the window on every axis
        visible[extra + qi, extra:] = row.reshape(-1)
    return visible


def naive_attention(q, k, v, visible, scale):
    """fp64 masked softmax attention; rows without a visible key are 0."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    visible = visible.expand_as(scores)
    any_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * any_key
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


def naive_neighborhood(q, k, v, kv_mask, *, grid, kernel, dilation, stride, causal, scale):
    visible = naive_visible(q.shape[2], grid, kernel, dilation, stride, causal)
    if kv_mask is not None:
        visible = visible & kv_mask.unsqueeze(-2)
    return naive_attention(q, k, v, visible, scale)


# -- random problems ---------------------------------------------------------------------------

_MAX_AXIS = {1: 70, 2: 11, 3: 5}


@st.composite
def problems(draw, dtype=torch.float32):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.sampled_from([r for r in (1, 2, 3) if kv_heads * r <= 4]))
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    grid = tuple(draw(st.integers(1, _MAX_AXIS[rank])) for _ in range(rank))
    kernel = tuple(draw(st.integers(1, g + 2)) for g in grid)
    causal = tuple(draw(st.booleans()) for _ in range(rank))
    stride = tuple(1 if c else draw(st.integers(1, w)) for w, c in zip(kernel, causal, strict=True))
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=kv_heads,
        grid=grid,
        extra=draw(st.sampled_from([0, 0, 1, 2, 5])),
        head_dim=draw(st.sampled_from([1, 3, 16, 24])),
        value_dim=draw(st.sampled_from([1, 5, 16])),
        kernel=kernel,
        dilation=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
        stride=stride,
        causal=causal,
        mask=draw(st.sampled_from([None, "batch", "head", "keys", "empty"])),
        tile=draw(st.sampled_from([None, 1, 3, tuple(range(2, 2 + rank))])),
        max_scores=draw(st.sampled_from([None, 300])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype,
    )


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv = case["batch"], case["heads"], case["kv_heads"]
    n = case["extra"] + math.prod(case["grid"])
    dtype = case["dtype"]

    def randn(heads, dim):
        if case["layout"] == "bnhd":  # [B, N, H, D] storage seen through a transpose
            return torch.randn(b, n, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, n, dim, generator=gen).to(dtype)

    q = randn(h, case["head_dim"])
    k = randn(hkv, case["head_dim"])
    v = randn(hkv, case["value_dim"])
    kind = case["mask"]
    kv_mask = None
    if kind is not None:
        shape = {"batch": (b, 1, n), "head": (b, h, n), "keys": (n,), "empty": (b, 1, n)}[kind]
        kv_mask = torch.rand(shape, generator=gen) > 0.3
        kv_mask.view(-1, n)[:, -1] = False  # always some padding
        if kind == "empty":
            kv_mask[0] = False  # every query of batch 0 sees no key
    return q, k, v, kv_mask


def _params(case):
    return {x: case[x] for x in ("grid", "kernel", "dilation", "stride", "causal")}


def run_all(case, q, k, v, kv_mask):
    """(name, output) of every implementation under test."""
    p = _params(case)
    scale = 1.0 / math.sqrt(case["head_dim"])
    yield "reference", neighborhood_attention_reference(q, k, v, kv_mask, scale=scale, **p)
    tiled = neighborhood_attention_tiled(
        q, k, v, kv_mask, scale=scale, tile=case["tile"], max_scores=case["max_scores"], **p
    )
    yield "tiled", tiled
    lists = [list(p[x]) for x in ("grid", "kernel", "dilation", "stride", "causal")]
    yield "op", OP(q, k, v, kv_mask, None, scale, *lists)


def check_case(case):
    q, k, v, kv_mask = make_inputs(case)
    expected = naive_neighborhood(
        q, k, v, kv_mask, scale=1.0 / math.sqrt(case["head_dim"]), **_params(case)
    )
    for name, out in run_all(case, q, k, v, kv_mask):
        assert out.shape == expected.shape, name
        assert_matches(out, expected, case["dtype"], TOLERANCE)
        if case["mask"] == "empty":
            assert (out[0] == 0).all(), f"{name}: rows with no visible key must be exactly 0"


# -- forward -----------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(problems())
def test_fp32_matches_naive(case):
    check_case(case)


def _case(**overrides):
    rank = len(overrides.get("grid", (20, 23)))
    case = dict(
        batch=2,
        heads=4,
        kv_heads=2,
        grid=(20, 23),
        extra=1,
        head_dim=32,
        value_dim=16,
        kernel=(7,) * rank,
        dilation=(1,) * rank,
        stride=(1,) * rank,
        causal=(False,) * rank,
        mask="batch",
        tile=None,
        max_scores=None,
        layout="bhnd",
        seed=0,
        dtype=torch.float32,
    )
    return {**case, **overrides}


FIXED_CASES = {
    "vit-like-2d": _case(),
    "dilated-strided-2d": _case(kernel=(5, 6), dilation=(2, 3), stride=(2, 3), layout="bnhd"),
    "video-causal-time-3d": _case(
        grid=(5, 8, 9), kernel=(3, 5, 5), causal=(True, False, False), extra=0, mask="head"
    ),
    "blocked-swin-like": _case(grid=(16, 16), kernel=(8, 8), stride=(8, 8), extra=4),
    "one-token": _case(grid=(1, 1), extra=0, kernel=(3, 3), mask=None),
    "1d-63": _case(grid=(63,), kernel=(9,), extra=0, dilation=(2,), mask="keys"),
    "mqa-registers": _case(heads=4, kv_heads=1, grid=(9, 7), extra=5, kernel=(3, 5), mask="empty"),
}


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_cases_match_naive(case):
    check_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_half_precision_matches_naive(dtype, data):
    check_case(data.draw(problems(dtype=dtype)))


def test_every_grid_query_sees_exactly_prod_kernel_keys():
    """NA/DiNA: the window shifts inward at the borders instead of shrinking."""
    grid, kernel, dilation = (11, 9, 7), (3, 5, 2), (2, 1, 3)
    visible = neighborhood_visible(
        2 + math.prod(grid), grid, kernel, dilation, (1,) * 3, (False,) * 3
    )
    counts = visible[2:, 2:].sum(-1)
    assert (counts == math.prod(kernel)).all()
    assert visible[:2].all() and visible[:, :2].all()  # extra tokens are global


@pytest.mark.parametrize(
    ("grid", "kernel", "extra"),
    [((8, 8), (8, 8), 1), ((5, 7), (9, 7), 0), ((3, 4, 5), (3, 4, 9), 2), ((40,), (41,), 3)],
    ids=lambda x: str(x),
)
def test_kernel_covering_the_grid_is_dense(grid, kernel, extra):
    gen = torch.Generator().manual_seed(sum(grid))
    n = extra + math.prod(grid)
    q = torch.randn(2, 4, n, 24, generator=gen)
    k = torch.randn(2, 2, n, 24, generator=gen)
    v = torch.randn(2, 2, n, 12, generator=gen)
    kv_mask = torch.rand(2, 1, n, generator=gen) > 0.2
    dense = dense_attention_reference(q, k, v, kv_mask, scale=0.3)
    rank = len(grid)
    kw = dict(grid=grid, kernel=kernel, scale=0.3)
    outs = {
        "reference": neighborhood_attention_reference(q, k, v, kv_mask, **kw),
        "tiled": neighborhood_attention_tiled(q, k, v, kv_mask, **kw),
        "op": OP(
            q,
            k,
            v,
            kv_mask,
            None,
            0.3,
            list(grid),
            list(kernel),
            [1] * rank,
            [1] * rank,
            [False] * rank,
        ),
    }
    for name, out in outs.items():
        torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6, msg=name)


def test_benchmark_shape_many_groups():
    """64×64 grid, 13×13 kernel, default tiles and grouping: the benchmark's path."""
    gen = torch.Generator().manual_seed(1)
    n = 64 * 64
    q = torch.randn(1, 2, n, 32, generator=gen)
    k = torch.randn(1, 2, n, 32, generator=gen)
    v = torch.randn(1, 2, n, 32, generator=gen)
    kw = dict(grid=(64, 64), kernel=13)
    out = neighborhood_attention_tiled(q, k, v, max_scores=1 << 16, **kw)
    # Check a band of rows against the reference (the full [N, N] would be slow).
    rows = torch.cat([torch.arange(0, 200), torch.arange(n - 200, n), torch.arange(2000, 2100)])
    visible = neighborhood_visible(n, (64, 64), (13, 13), (1, 1), (1, 1), (False, False))[rows]
    expected = naive_attention(q[:, :, rows], k, v, visible, 32**-0.5)
    torch.testing.assert_close(out[:, :, rows].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("grid", "tile"),
    [((5, 8, 9), (2, 2, 4)), ((4, 8, 8), (2, 2, 4))],
    ids=["partial-tiles", "whole-tiles"],
)
def test_blocks_split_inside_the_middle_axis(grid, tile):
    """A block budget between one row and one plane of tiles: blocks are runs of tiles
    along the middle axis (extra tokens, GQA, per-head padding, strided q; forward and
    gradients)."""
    from attnopt.kernels.neighborhood import tiled

    gen = torch.Generator().manual_seed(9)
    n = 2 + math.prod(grid)
    q = torch.randn(1, n, 4, 8, generator=gen).transpose(1, 2)  # [B, H, N, D] strides of bnhd
    k = torch.randn(1, 2, n, 8, generator=gen)
    v = torch.randn(1, 2, n, 5, generator=gen)
    grad = torch.randn(1, 4, n, 5, generator=gen)
    kv_mask = torch.rand(1, 4, n, generator=gen) > 0.2
    p = dict(grid=grid, kernel=(3, 3, 5), dilation=(1,) * 3, stride=(1,) * 3, causal=(False,) * 3)

    def plan(max_scores):
        return tiled._plan(q, k, v, kv_mask, **p, scale=0.3, tile=tile, max_scores=max_scores)

    # Scores of six tiles a block: at least a row of tiles (2 or 3), less than a plane
    # (8 or 12), so the blocks are runs of 2 tiles along the middle axis.
    sub = plan(None).subs[0]
    max_scores = 6 * 2 * sub.tile_queries * sub.keys  # 2 query heads per kv head
    tiles = [ax.tiles for ax in sub.axes]
    _, blocks = tiled._blocks(plan(max_scores), sub)
    assert {blk.counts for blk in blocks} == {(1, 2, tiles[2])}
    kw = dict(p, scale=0.3, tile=tile, max_scores=max_scores)

    expected = naive_neighborhood(q, k, v, kv_mask, **p, scale=0.3)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = neighborhood_attention_tiled(*inputs, kv_mask, **kw)
    assert_matches(out.detach(), expected, torch.float32, TOLERANCE)
    out.backward(grad)
    want = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = neighborhood_attention_reference(*want, kv_mask, **p, scale=0.3)
    ref.backward(grad)
    for label, got, w in zip("qkv", inputs, want, strict=True):
        torch.testing.assert_close(got.grad, w.grad, atol=1e-5, rtol=1e-5, msg=f"d{label}")


def test_forward_workspace_stays_within_budget(monkeypatch):
    """All the forward's workspace buffers together stay within ``_WORKSPACE_BYTES``
    whatever N (the output is the one allocation that grows with the problem), on
    both benchmark kernels."""
    from attnopt.kernels.neighborhood import tiled

    peak = [0]

    class CountingWorkspace(tiled._Workspace):
        def get(self, key, shape, dtype, numel=0):
            out = super().get(key, shape, dtype, numel)
            live = sum(b.numel() * b.element_size() for b in self._buffers.values())
            peak[0] = max(peak[0], live)
            return out

    monkeypatch.setattr(tiled, "_Workspace", CountingWorkspace)
    gen = torch.Generator().manual_seed(10)
    for grid, kernel in [((48, 48), 13), ((96, 96), 13), ((4, 16, 16), (3, 7, 7))]:
        n = math.prod(grid)
        q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for _ in range(3))
        peak[0] = 0
        neighborhood_attention_tiled(q, k, v, grid=grid, kernel=kernel)
        assert 0 < peak[0] <= tiled._WORKSPACE_BYTES, (grid, peak[0])


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` (and the kernels' output and workspace buffers) filled with NaN,
    so a row or buffer element the kernel forgets to write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_every_output_element_is_written(case, nan_filled_empty):
    q, k, v, kv_mask = make_inputs(case)
    for t in (q, k, v):
        t.requires_grad_(True)
    lists = [list(case[x]) for x in ("grid", "kernel", "dilation", "stride", "causal")]
    out = OP(q, k, v, kv_mask, None, 0.125, *lists)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all()
    for grad in grads:
        assert torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "extra", "kernel", "dilation", "stride", "causal"),
    [
        ([3, 4], 1, [2, 3], [1, 1], [1, 1], [False, False]),
        ([4, 3], 0, [3, 2], [2, 1], [1, 2], [False, False]),
        ([2, 2, 3], 2, [2, 1, 2], [1, 1, 1], [1, 1, 1], [True, False, False]),
        ([7], 1, [3], [2], [1], [True]),
    ],
    ids=["2d-extra", "2d-dilated-strided", "3d-causal-time", "1d-causal-dilated"],
)
def test_gradcheck_op(grid, extra, kernel, dilation, stride, causal):
    gen = torch.Generator().manual_seed(3)
    n = extra + math.prod(grid)
    q = torch.randn(1, 4, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, n, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    kv_mask = torch.rand(n, generator=gen) > 0.2

    def fn(q, k, v):
        return OP(q, k, v, kv_mask, None, 0.6, grid, kernel, dilation, stride, causal)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    """Schema, fake tensor, autograd registration of the op and its backward agree."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 2 + 20, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 2 + 20, 8, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 2 + 20, 4, generator=gen, requires_grad=True)
    kv_mask = torch.rand(1, 1, 22, generator=gen) > 0.2
    torch.library.opcheck(
        OP, (q, k, v, kv_mask, None, 0.35, [4, 5], [3, 3], [1, 2], [1, 1], [False, False])
    )
    torch.library.opcheck(
        OP,
        (
            q,
            k,
            v,
            None,
            None,
            0.35,
            [2, 2, 5],
            [1, 2, 3],
            [1, 1, 1],
            [1, 1, 1],
            [True, False, True],
        ),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_grads(dtype):
    gen = torch.Generator().manual_seed(8)
    n = 1 + 9 * 10
    q = torch.randn(1, 4, n, 16, generator=gen).to(dtype)
    k = torch.randn(1, 2, n, 16, generator=gen).to(dtype)
    v = torch.randn(1, 2, n, 8, generator=gen).to(dtype)
    grad = torch.randn(1, 4, n, 8, generator=gen).to(dtype)
    kv_mask = torch.rand(1, 1, n, generator=gen) > 0.2
    kw = dict(grid=(9, 10), kernel=(3, 5), dilation=(1, 2))

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        torch.autograd.backward(fn(*inputs), grad.to(dtype))
        return [t.grad for t in inputs]

    want = grads(
        lambda q, k, v: neighborhood_attention_reference(q, k, v, kv_mask, scale=0.25, **kw),
        torch.float64,
    )
    got = grads(
        lambda q, k, v: OP(
            q, k, v, kv_mask, None, 0.25, [9, 10], [3, 5], [1, 2], [1, 1], [False, False]
        ),
        dtype,
    )
    atol, rtol = TOLERANCE[dtype]
    for label, a, b in zip("qkv", got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=f"d{label}")


@pytest.mark.parametrize(
    "causal", [(False, False), (True, False)], ids=["bidirectional", "causal0"]
)
def test_grads_match_reference(causal):
    gen = torch.Generator().manual_seed(4)
    grid, n = (13, 11), 2 + 13 * 11
    q = torch.randn(2, 4, n, 16, generator=gen)
    k = torch.randn(2, 2, n, 16, generator=gen)
    v = torch.randn(2, 2, n, 8, generator=gen)
    grad = torch.randn(2, 4, n, 8, generator=gen)
    kv_mask = torch.rand(2, 4, n, generator=gen) > 0.2
    kw = dict(grid=grid, kernel=(5, 4), dilation=(2, 1), stride=1, causal=causal, scale=0.25)

    def grads(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*inputs).backward(grad)
        return [t.grad for t in inputs]

    expected = grads(lambda q, k, v: neighborhood_attention_reference(q, k, v, kv_mask, **kw))
    actual = {
        "tiled": grads(
            lambda q, k, v: neighborhood_attention_tiled(
                q, k, v, kv_mask, tile=(3, 4), max_scores=500, **kw
            )
        ),
        "op": grads(
            lambda q, k, v: OP(
                q, k, v, kv_mask, None, 0.25, list(grid), [5, 4], [2, 1], [1, 1], list(causal)
            )
        ),
    }
    for name, got in actual.items():
        for label, a, b in zip("qkv", got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} d{label}")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kernel=0), r"kernel must be 2 positive int\(s\).*got \(0, 0\)"),
        (dict(kernel=(3, True)), r"kernel must be 2 positive int\(s\).*got \(3, True\)"),
        (dict(kernel=(3, 2.5)), r"kernel must be 2 positive int\(s\).*got \(3, 2.5\)"),
        (dict(dilation=(1, 0)), r"dilation must be 2 positive int\(s\).*got \(1, 0\)"),
        (dict(stride=-1), r"stride must be 2 positive int\(s\).*got \(-1, -1\)"),
        (dict(kernel=3, stride=4), r"stride must not exceed kernel .*stride \(4, 4\)"),
        (dict(causal=(True, False), stride=(2, 1)), r"causal axes take stride 1"),
        (dict(causal=1), r"causal must be 2 bool\(s\).*got \(1, 1\)"),
        (
            dict(kernel=(3, 3, 3), dilation=(1, 2)),
            r"kernel, dilation, stride, causal and grid must agree",
        ),
        (dict(grid=(8, 8, 4)), r"kernel, dilation, stride, causal and grid must agree"),
        (dict(kernel=3, grid=(8, 0)), r"grid must be 1 to 3 positive ints .*got \(8, 0\)"),
        (dict(kernel=3, grid=[8, 8]), r"grid must be a tuple .*got \[8, 8\]"),
        (dict(kernel=[3, 3]), r"kernel must be an int or a tuple, got \[3, 3\]"),
        (dict(kernel=3, grid=(1, 2, 3, 4)), r"grid must be 1 to 3 positive ints"),
    ],
    ids=[
        "kernel-0",
        "kernel-bool",
        "kernel-float",
        "dilation-0",
        "stride-negative",
        "stride-over-kernel",
        "causal-strided",
        "causal-int",
        "kernel-rank",
        "grid-rank",
        "grid-0",
        "grid-list",
        "kernel-list",
        "grid-4d",
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match="Neighborhood: " + match):
        Neighborhood(**kwargs)


def _qkv(heads=4, kv_heads=2, n=1 + 4 * 5):
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randn(1, heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
        torch.randn(1, kv_heads, n, 4, generator=gen),
    )


_GOOD = ([4, 5], [3, 3], [1, 1], [1, 1], [False, False])


def test_op_rejects_bias():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"bias must be None .*shape \(1, 4, 21, 21\)"):
        OP(q, k, v, None, torch.zeros(1, 4, 21, 21), 0.5, *_GOOD)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([4, 5], [3], [1, 1], [1, 1], [False, False]), r"kernel must be 2 positive int"),
        (([4, 5], [3, 3], [1, 0], [1, 1], [False, False]), r"dilation must be 2 positive int"),
        (([4, 5], [3, 3], [1, 1], [4, 1], [False, False]), r"stride must not exceed kernel"),
        (([4, 5], [3, 3], [1, 1], [1, 1], [True]), r"causal must be 2 bool"),
        (([5, 5], [3, 3], [1, 1], [1, 1], [False, False]), r"fewer than the grid \(5, 5\)"),
        (([], [], [], [], []), r"grid must be 1 to 3 positive ints"),
    ],
    ids=["kernel-rank", "dilation-0", "stride", "causal-rank", "grid-too-big", "no-grid"],
)
def test_op_rejects_bad_arguments(args, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"neighborhood_attention: .*" + match):
        OP(q, k, v, None, None, 0.5, *args)


def test_op_rejects_cross_attention():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q has 21 tokens but k has 20"):
        OP(q, k[:, :, 1:], v[:, :, 1:], None, None, 0.5, *_GOOD)


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, m: OP(q, k, v, m, None, 0.5, *_GOOD),
        lambda q, k, v, m: neighborhood_attention_tiled(q, k, v, m, grid=(4, 5), kernel=3),
        lambda q, k, v, m: neighborhood_attention_reference(q, k, v, m, grid=(4, 5), kernel=3),
    ],
    ids=["op", "tiled", "reference"],
)
def test_input_validation(fn):
    q, k, v = _qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        fn(q, k, v, None)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"kv_mask must be a bool tensor .*got torch.float32"):
        fn(q, k, v, torch.ones(1, 1, 21))
    with pytest.raises(ValueError, match=r"kv_mask must be broadcastable to \[B, H, M\]"):
        fn(q, k, v, torch.ones(1, 3, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q, k and v must share one dtype"):
        fn(q, k.double(), v, None)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, N, D\], got shape \(4, 21, 4\)"):
        fn(q[0], k, v, None)


def test_tiled_rejects_bad_tiling():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"tile must be a positive int or one per grid axis"):
        neighborhood_attention_tiled(q, k, v, grid=(4, 5), kernel=3, tile=(2, 0))
    with pytest.raises(ValueError, match=r"tile must be a positive int or one per grid axis"):
        neighborhood_attention_tiled(q, k, v, grid=(4, 5), kernel=3, tile=(2, 2, 2))
    with pytest.raises(ValueError, match=r"max_scores must be a positive int or None, got 0"):
        neighborhood_attention_tiled(q, k, v, grid=(4, 5), kernel=3, max_scores=0)


# -- the variant and export ---------------------------------------------------------------------


def _site(mask=MaskKind.NONE, cross=False, grid=(8, 8)):
    return AttentionSite(
        name="layers.0.attention",
        module_type="ViTAttention",
        spelling="sdpa",
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        value_dim=16,
        scale=0.25,
        mask=mask,
        cross=cross,
        grid=grid,
    )


def test_variant_supports_and_builds():
    config = Neighborhood(kernel=(5, 3), dilation=2)
    variant = get_variant(config)
    assert not variant.accepts_bias
    for kind in (MaskKind.NONE, MaskKind.PADDING):
        assert variant.supports(config, _site(kind)) is None
    assert "mask kind 'bias'" in variant.supports(config, _site(MaskKind.BIAS))
    assert "mask kind 'other'" in variant.supports(config, _site(MaskKind.OTHER))
    assert "cross-attention" in variant.supports(config, _site(cross=True))
    assert "token-order causal" in variant.supports(config, _site(MaskKind.CAUSAL))
    assert variant.supports(config, _site(grid=None)) == (
        "neighborhood attention needs a token grid: pass Neighborhood(grid=(H, W))"
    )
    assert "kernel has 2 axes" in variant.supports(config, _site(grid=(2, 8, 8)))
    call = variant.build(config, _site())
    assert call.op is torch.ops.attnopt.neighborhood_attention.default
    assert call.extra_args == (0.25, [8, 8], [5, 3], [2, 2], [1, 1], [False, False])
    # An explicit grid overrides the site's; a single value covers every axis.
    config = Neighborhood(kernel=3, causal=(True, False, False), grid=(2, 4, 8))
    assert variant.supports(config, _site(grid=None)) is None
    assert variant.build(config, _site()).extra_args == (
        0.25,
        [2, 4, 8],
        [3, 3, 3],
        [1, 1, 1],
        [1, 1, 1],
        [True, False, False],
    )


def test_config_round_trips_through_json():
    import json

    for config in (
        Neighborhood(),
        Neighborhood(kernel=(3, 7, 7), dilation=(1, 2, 2), causal=(True, False, False)),
        Neighborhood(kernel=5, stride=(5, 1), grid=(16, 32)),
    ):
        data = json.loads(config.to_json())
        assert config_from_dict(data) == config
    assert Neighborhood(kernel=(9, 9), grid=(32, 32)).describe() == (
        "Neighborhood(kernel=(9, 9), grid=(32, 32))"
    )


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, kv_mask):
        return OP(q, k, v, kv_mask, None, 0.25, [6, 7], [3, 5], [1, 2], [1, 1], [False, False])


def test_export_with_dynamic_extra_tokens():
    gen = torch.Generator().manual_seed(6)

    def inputs(batch, n):
        return (
            torch.randn(batch, 4, n, 16, generator=gen),
            torch.randn(batch, 2, n, 16, generator=gen),
            torch.randn(batch, 2, n, 8, generator=gen),
            torch.rand(batch, 1, n, generator=gen) > 0.2,
        )

    seq = torch.export.Dim("seq", min=42, max=4096)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = {name: {0: batch, 2: seq} for name in ("q", "k", "v", "kv_mask")}
    exported = torch.export.export(_Attention(), inputs(2, 43), dynamic_shapes=dynamic)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.attnopt.neighborhood_attention.default]
    module = exported.module()
    for b, n in ((1, 42), (3, 50)):  # 0 and 8 extra tokens
        q, k, v, kv_mask = inputs(b, n)
        expected = neighborhood_attention_reference(
            q, k, v, kv_mask, grid=(6, 7), kernel=(3, 5), dilation=(1, 2), scale=0.25
        )
        torch.testing.assert_close(module(q, k, v, kv_mask), expected, atol=1e-5, rtol=1e-5)


# -- end to end on tiny transformers models ------------------------------------------------------


def _registered_neighborhood(grid, kernel, dilation):
    """Masked attention with a neighbourhood mask for transformers' registry, built with
    this file's naive definition (no attnopt code)."""
    rank = len(grid)
    pattern_cache = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        b, h, n, d = query.shape
        if n not in pattern_cache:
            pattern_cache[n] = naive_visible(
                n, grid, kernel, dilation, (1,) * rank, (False,) * rank
            )
        keep = pattern_cache[n].view(1, 1, n, n)
        if attention_mask is not None:
            mask = attention_mask[..., :n]
            keep = keep & (mask if mask.dtype == torch.bool else mask > -1e4)
        scale = d**-0.5 if scaling is None else scaling
        scores = query.double() @ key.double().transpose(-1, -2) * scale
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = (probs @ value.double()).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _reference_model(model, grid, kernel, dilation):
    name = f"attnopt_test_neighborhood_{'x'.join(map(str, grid + kernel + dilation))}"
    AttentionInterface.register(name, _registered_neighborhood(grid, kernel, dilation))
    AttentionMaskInterface.register(name, sdpa_mask)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(name)
    return ref


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name, impl):
    if (name, impl) not in models:
        models[name, impl] = tiny_model(name, attn_implementation=impl)
    return models[name, impl]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kernel", [(8, 8), (11, 9)], ids=["8x8", "11x9"])
def test_vit_kernel_covering_the_grid_is_exact(models, impl, kernel):
    model = _model(models, "tiny-vit", impl)
    optimized = attnopt.optimize(model, Neighborhood(kernel=kernel))
    assert len(optimized.report.applied) == 2, str(optimized.report)
    ops = {n.target for n in optimized.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.attnopt.neighborhood_attention.default in ops
    inputs = example_inputs_for(model, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            _main(optimized(**inputs)), _main(model(**inputs)), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("kernel", "dilation"), [((3, 3), (1, 1)), ((3, 5), (2, 1))], ids=["3x3", "3x5-dilated"]
)
def test_vit_small_kernel_matches_masked_reference(models, impl, kernel, dilation):
    model = _model(models, "tiny-vit", impl)
    optimized = attnopt.optimize(model, Neighborhood(kernel=kernel, dilation=dilation))
    report = optimized.report
    assert len(report.applied) == len(report.sites) == 2
    assert report.output_error.max_abs > 1e-3  # a real change, not dense by accident
    reference = _reference_model(model, (8, 8), kernel, dilation)
    inputs = example_inputs_for(model, batch=2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            _main(optimized(**inputs)), _main(reference(**inputs)), atol=1e-5, rtol=1e-5
        )


def test_text_model_without_grid_is_skipped_and_explicit_grid_honours_padding(models):
    model = _model(models, "tiny-bert", "sdpa")
    skipped = attnopt.optimize(model, Neighborhood())
    assert not skipped.report.applied
    assert all("needs a token grid" in s.reason for s in skipped.report.sites)

    # 23 tokens as 3 extra tokens + a 4×5 grid; padding keys must stay hidden.
    inputs = example_inputs_for(model, batch=2, seq_len=23, seed=1)
    inputs.pop("use_cache", None)
    inputs["attention_mask"][0, :5] = 0
    inputs["attention_mask"][1, 19:] = 0
    optimized = attnopt.optimize(model, Neighborhood(kernel=3, grid=(4, 5)), inputs)
    assert len(optimized.report.applied) == 2
    reference = _reference_model(model, (4, 5), (3, 3), (1, 1))
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            _main(optimized(**inputs))[keep],
            _main(reference(**inputs))[keep],
            atol=1e-5,
            rtol=1e-5,
        )


def test_causal_model_is_skipped_with_reason(models):
    model = _model(models, "tiny-llama", "sdpa")
    optimized = attnopt.optimize(model, Neighborhood(kernel=3, grid=(4, 4)))
    assert not optimized.report.applied
    assert all("token-order causal" in s.reason for s in optimized.report.sites)
