"""ONNX translations of the sparse and grid ops (``attnopt.exporters.onnx_sparse``).

Each op family is exported once (``torch.onnx.export(dynamo=True)`` with
``SPARSE_TRANSLATIONS``), as a small module that calls the op in many settings and
returns every output, so one export and one onnxruntime session serve a table of
cases; each case is then its own test. Outputs are compared with the PyTorch op on
fresh random inputs (fixed seed) at the sequence lengths below: the block selection
must agree exactly for the outputs to match, and random inputs leave no ties.
Graph-cost tests check that no intermediate of a block-sparse graph has two dims of
the sequence length or more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import attnopt  # noqa: E402  (after the importorskips, which name the missing package)
from attnopt.exporters.onnx_sparse import (  # noqa: E402
    SPARSE_TRANSLATIONS,
    neighborhood_attention,
    neighborhood_tables,
)
from attnopt.kernels.dense.reference import dense_attention_reference  # noqa: E402
from attnopt.kernels.neighborhood.reference import neighborhood_visible  # noqa: E402

# fp32, onnxruntime CPU against the PyTorch op: max absolute error.
ATOL = 1e-4
SCALE = 0.3
D = 8


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes=None):
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        custom_translation_table=SPARSE_TRANSLATIONS,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    return program.model_proto


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, args: tuple) -> list[np.ndarray]:
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _mask(gen, *shape):
    return torch.rand(*shape, generator=gen) > 0.25


def _max_err(a: np.ndarray, b: torch.Tensor) -> float:
    assert a.shape == tuple(b.shape)
    return float(np.abs(a - b.numpy()).max())


# -- block-sparse, dynamic sequence length -------------------------------------------------------

# name: (causal, block, topk, threshold, local_blocks, sink_blocks, pattern, mask, heads, sparse)
# mask: None, "keys" ([B, 1, M]) or "heads" ([B, H, M]); heads: "gqa" (4 q / 2 kv) or "mha";
# sparse: the setting drops blocks at these lengths, so it must differ from dense attention.
BS_CASES = {
    "topk-bidirectional": (False, 16, 3, None, 1, 1, "dynamic", None, "gqa", True),
    "topk-causal-padding": (True, 16, 3, None, 1, 1, "dynamic", "keys", "gqa", True),
    "topk-causal-head-mask-local2": (True, 16, 2, None, 2, 1, "dynamic", "heads", "gqa", True),
    "topk-mha-no-sink-block8": (False, 8, 4, None, 1, 0, "dynamic", "keys", "mha", True),
    "threshold-bidirectional-padding": (False, 16, None, 0.7, 1, 1, "dynamic", "keys", "gqa", True),
    "threshold-causal-head-mask": (True, 16, None, 0.5, 1, 1, "dynamic", "heads", "gqa", True),
    "threshold-one-keeps-all": (True, 16, None, 1.0, 1, 1, "dynamic", None, "gqa", False),
    "a-shape-causal": (True, 8, None, None, 2, 1, "a-shape", None, "gqa", True),
    "a-shape-bidirectional-padding": (False, 8, None, None, 1, 2, "a-shape", "keys", "gqa", True),
    "radial-bidirectional-padding": (False, 8, None, None, 1, 1, "radial", "keys", "gqa", True),
    "radial-causal-mha": (True, 8, None, None, 2, 0, "radial", None, "mha", True),
}
BS_LENGTHS = (100, 77, 33)  # exported at the first; none a multiple of the blocks


def _block_sparse(q, k, v, mask, case):
    causal, block, topk, threshold, local, sink, pattern = case[:7]
    return torch.ops.attnopt.block_sparse_attention(
        q, k, v, mask, None, SCALE, causal, block, topk, threshold, local, sink, pattern
    )


class _BlockSparseCases(torch.nn.Module):
    def forward(self, q, k, v, k_mha, v_mha, mask_keys, mask_heads):
        outs = []
        for case in BS_CASES.values():
            kk, vv = (k, v) if case[8] == "gqa" else (k_mha, v_mha)
            mask = {None: None, "keys": mask_keys, "heads": mask_heads}[case[7]]
            outs.append(_block_sparse(q, kk, vv, mask, case))
        return tuple(outs)


def _bs_inputs(gen, n: int) -> tuple:
    return (
        _randn(gen, 2, 4, n, D),
        _randn(gen, 2, 2, n, D),
        _randn(gen, 2, 2, n, D),
        _randn(gen, 2, 4, n, D),
        _randn(gen, 2, 4, n, D),
        _mask(gen, 2, 1, n),
        _mask(gen, 2, 4, n),
    )


@pytest.fixture(scope="module")
def block_sparse_results():
    gen = torch.Generator().manual_seed(0)
    module = _BlockSparseCases()
    seq = torch.export.Dim("seq", min=2, max=8192)
    dynamic = tuple({2: seq} for _ in range(7))
    session = _session(_export(module, _bs_inputs(gen, BS_LENGTHS[0]), dynamic))
    results = {}
    for n in BS_LENGTHS:
        args = _bs_inputs(gen, n)
        got = _run(session, args)
        with torch.no_grad():
            want = module(*args)
        for i, name in enumerate(BS_CASES):
            results[name, n] = (got[i], want[i], args)
    return results


@pytest.mark.parametrize("n", BS_LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("name", list(BS_CASES))
def test_block_sparse_matches_op(block_sparse_results, name, n):
    got, want, args = block_sparse_results[name, n]
    assert _max_err(got, want) < ATOL
    case = BS_CASES[name]
    if case[9] and n >= 77:  # the selection really drops blocks (not dense in disguise)
        q, k, v, k_mha, v_mha, mask_keys, mask_heads = args
        kk, vv = (k, v) if case[8] == "gqa" else (k_mha, v_mha)
        mask = {None: None, "keys": mask_keys, "heads": mask_heads}[case[7]]
        dense = dense_attention_reference(q, kk, vv, mask, scale=SCALE, causal=case[0])
        assert (want - dense).abs().max() > 1e-2


# -- block-sparse, queries and keys of different lengths (static) --------------------------------

BS_CROSS_CASES = {
    "topk-causal": (True, 16, 3, None, 1, 1, "dynamic"),
    "threshold-causal": (True, 16, None, 0.8, 1, 1, "dynamic"),
    "a-shape-causal": (True, 16, None, None, 1, 1, "a-shape"),
    "radial-bidirectional": (False, 8, None, None, 1, 1, "radial"),
}
BS_CROSS_SHAPES = {"fewer-queries": (40, 90), "more-queries": (90, 40)}


class _BlockSparseCross(torch.nn.Module):
    def forward(self, q1, k1, v1, m1, q2, k2, v2, m2):
        outs = []
        for case in BS_CROSS_CASES.values():
            outs.append(_block_sparse(q1, k1, v1, m1, case))
            outs.append(_block_sparse(q2, k2, v2, m2, case))
        return tuple(outs)


def _cross_inputs(gen) -> tuple:
    args = []
    for n, m in BS_CROSS_SHAPES.values():
        args += [_randn(gen, 1, 4, n, D), _randn(gen, 1, 2, m, D), _randn(gen, 1, 2, m, D)]
        args.append(_mask(gen, 1, 1, m))
    return tuple(args)


@pytest.fixture(scope="module")
def block_sparse_cross_results():
    gen = torch.Generator().manual_seed(1)
    module = _BlockSparseCross()
    session = _session(_export(module, _cross_inputs(gen)))
    args = _cross_inputs(gen)
    got = _run(session, args)
    with torch.no_grad():
        want = module(*args)
    keys = [(c, s) for c in BS_CROSS_CASES for s in BS_CROSS_SHAPES]
    return {key: (got[i], want[i]) for i, key in enumerate(keys)}


@pytest.mark.parametrize("shape", list(BS_CROSS_SHAPES))
@pytest.mark.parametrize("name", list(BS_CROSS_CASES))
def test_block_sparse_cross_lengths_match_op(block_sparse_cross_results, name, shape):
    got, want = block_sparse_cross_results[name, shape]
    assert _max_err(got, want) < ATOL


# -- half precision: computed in fp32, rounded once ------------------------------------------

HALF_ATOL = 2e-3  # fp16 outputs: a few ulps at |x| ~ 1
HALF_CASES = ("block-sparse-topk-causal", "neighborhood-2d-extra", "agent-sequence")


class _HalfCases(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return (
            _block_sparse(q, k, v, mask, (True, 8, 2, None, 1, 1, "dynamic")),
            torch.ops.attnopt.neighborhood_attention(
                q, k, v, mask, None, SCALE, [5, 9], [3, 3], [1, 1], [1, 1], [False, False]
            ),
            torch.ops.attnopt.agent_attention(q, k, v, mask, None, SCALE, 4, []),
        )


def _half_inputs(gen) -> tuple:
    n = 1 + 5 * 9
    tensors = (_randn(gen, 1, 4, n, D), _randn(gen, 1, 2, n, D), _randn(gen, 1, 2, n, D))
    return tuple(t.half() for t in tensors) + (_mask(gen, 1, 1, n),)


@pytest.fixture(scope="module")
def half_results():
    gen = torch.Generator().manual_seed(7)
    module = _HalfCases()
    session = _session(_export(module, _half_inputs(gen)))
    args = _half_inputs(gen)
    got = _run(session, args)
    with torch.no_grad():
        want = module(*args)
    return {name: (got[i], want[i]) for i, name in enumerate(HALF_CASES)}


@pytest.mark.parametrize("name", HALF_CASES)
def test_half_precision_matches_op(half_results, name):
    got, want = half_results[name]
    assert got.dtype == np.float16 and got.shape == tuple(want.shape)
    assert float(np.abs(got.astype(np.float32) - want.float().numpy()).max()) < HALF_ATOL


# -- block-sparse graph cost ---------------------------------------------------------------------

COST_N, COST_BLOCK = 1024, 64


class _CostStatic(torch.nn.Module):
    """Selections whose sizes are known at export time (top-k and static patterns)."""

    def forward(self, q, k, v, mask):
        bs = torch.ops.attnopt.block_sparse_attention
        return (
            bs(q, k, v, mask, None, SCALE, True, COST_BLOCK, 4, None, 1, 1, "dynamic"),
            bs(q, k, v, None, None, SCALE, False, COST_BLOCK, 3, None, 1, 1, "dynamic"),
            bs(q, k, v, mask, None, SCALE, False, COST_BLOCK, None, None, 2, 1, "a-shape"),
            bs(q, k, v, None, None, SCALE, True, COST_BLOCK, None, None, 1, 1, "radial"),
        )


class _CostThreshold(torch.nn.Module):
    """A threshold selection: its width is data-dependent, so it is checked at run time."""

    def forward(self, q, k, v, mask):
        bs = torch.ops.attnopt.block_sparse_attention
        return bs(q, k, v, mask, None, SCALE, True, COST_BLOCK, None, 0.6, 1, 1, "dynamic")


def _cost_inputs(gen) -> tuple:
    n = COST_N
    return (_randn(gen, 1, 4, n, 16), _randn(gen, 1, 2, n, 16), _randn(gen, 1, 2, n, 16)) + (
        _mask(gen, 1, 1, n),
    )


def _dims(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def test_block_sparse_graph_has_no_quadratic_intermediate():
    gen = torch.Generator().manual_seed(2)
    model = _export(_CostStatic(), _cost_inputs(gen))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    assert len(values) > 50
    for vi in values:
        dims = _dims(vi)
        assert None not in dims, f"{vi.name} has unknown dims {dims}"
        assert sum(d >= COST_N for d in dims) < 2, f"{vi.name} is quadratic: {dims}"
    # The largest tensors are scores [B, Hkv, R, nQ, block, kept·block]: at most 6 of the
    # 16 key blocks are kept (radial: distances 0, 1, 2, 4, 8 and the sink).
    largest = max(math.prod(_dims(vi)) for vi in values)
    assert largest <= 4 * COST_N * 6 * COST_BLOCK


def test_block_sparse_threshold_run_has_no_quadratic_intermediate():
    """Every intermediate as a graph output, measured in an onnxruntime run."""
    module = _CostThreshold()
    gen = torch.Generator().manual_seed(3)
    model = _export(module, _cost_inputs(gen))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    outputs = {o.name for o in inferred.graph.output}
    extra = [vi for vi in inferred.graph.value_info if vi.name not in outputs]
    inferred.graph.output.extend(extra)
    session = _session(inferred)
    args = _cost_inputs(gen)
    got = _run(session, args)
    assert len(got) > 50
    for meta, value in zip(session.get_outputs(), got):
        assert sum(d >= COST_N for d in value.shape) < 2, f"{meta.name}: {value.shape}"
    with torch.no_grad():
        assert _max_err(got[0], module(*args)) < ATOL


# -- neighborhood --------------------------------------------------------------------------------

# name: (grid, kernel, dilation, stride, causal, extra tokens, mask, heads)
NA_CASES = {
    "2d-odd": ((5, 7), (3, 3), (1, 1), (1, 1), (False, False), 0, None, "gqa"),
    "2d-extra2-dilation-stride-padding": (
        (7, 5),
        (3, 5),
        (2, 1),
        (1, 2),
        (False, False),
        2,
        "keys",
        "gqa",
    ),
    "3d-causal-time-head-mask": (
        (3, 4, 5),
        (2, 3, 3),
        (1, 2, 1),
        (1, 1, 1),
        (True, False, False),
        1,
        "heads",
        "gqa",
    ),
    "1d-causal-dilation-mha": ((11,), (4,), (3,), (1,), (True,), 0, "keys", "mha"),
    "2d-kernel-covers-grid": ((3, 5), (7, 7), (1, 1), (1, 1), (False, False), 1, None, "gqa"),
    "2d-dynamic-extra-tokens": ((4, 5), (3, 3), (1, 2), (1, 1), (False, True), 3, "keys", "gqa"),
}
# Exported with a dynamic sequence length (the number of extra tokens is read at run
# time), run again with this many extra tokens.
NA_RERUN = {"2d-dynamic-extra-tokens": 0}
NA_NAMES = list(NA_CASES) + [f"{name}-rerun-{extra}-extra" for name, extra in NA_RERUN.items()]


def _na_inputs(gen, rerun: bool = False) -> tuple:
    args = []
    for name, (grid, *_, extra, mask, heads) in NA_CASES.items():
        n = (NA_RERUN[name] if rerun and name in NA_RERUN else extra) + math.prod(grid)
        hkv = 2 if heads == "gqa" else 4
        args += [_randn(gen, 2, 4, n, D), _randn(gen, 2, hkv, n, D), _randn(gen, 2, hkv, n, D)]
        args.append(_mask(gen, 2, 4 if mask == "heads" else 1, n))
    return tuple(args)


def _na_case(q, k, v, mask, case):
    grid, kernel, dilation, stride, causal, _, mask_kind, _ = case
    return torch.ops.attnopt.neighborhood_attention(
        q,
        k,
        v,
        mask if mask_kind else None,
        None,
        SCALE,
        list(grid),
        list(kernel),
        list(dilation),
        list(stride),
        list(causal),
    )


class _NeighborhoodCases(torch.nn.Module):
    def forward(self, *args):
        return tuple(
            _na_case(*args[4 * i : 4 * i + 4], case) for i, case in enumerate(NA_CASES.values())
        )


@pytest.fixture(scope="module")
def neighborhood_results():
    gen = torch.Generator().manual_seed(4)
    module = _NeighborhoodCases()
    dynamic = []
    for name, case in NA_CASES.items():
        seq = torch.export.Dim(f"seq_{len(dynamic)}", min=math.prod(case[0]), max=4096)
        dynamic += [{2: seq} if name in NA_RERUN else None] * 4
    session = _session(_export(module, _na_inputs(gen), (tuple(dynamic),)))  # forward(*args)
    results = {}
    for rerun in (False, True):
        args = _na_inputs(gen, rerun)
        got = _run(session, args)
        with torch.no_grad():
            want = module(*args)
        for i, name in enumerate(NA_CASES):
            if rerun and name in NA_RERUN:
                name = f"{name}-rerun-{NA_RERUN[name]}-extra"
            results[name] = (got[i], want[i], args[4 * i : 4 * i + 4])
    return results


@pytest.mark.parametrize("name", NA_NAMES)
def test_neighborhood_matches_op(neighborhood_results, name):
    got, want, (q, k, v, _) = neighborhood_results[name]
    assert _max_err(got, want) < ATOL
    if name == "2d-kernel-covers-grid":  # the exact setting is dense attention
        assert _max_err(got, dense_attention_reference(q, k, v, scale=SCALE)) < ATOL


@pytest.mark.parametrize("name", list(NA_CASES))
def test_neighborhood_tables_match_reference_pattern(name):
    grid, kernel, dilation, stride, causal = NA_CASES[name][:5]
    index, valid = neighborhood_tables(grid, kernel, dilation, stride, causal)
    cells = math.prod(grid)
    pattern = np.zeros((cells, cells), dtype=bool)
    rows = np.broadcast_to(np.arange(cells)[:, None], index.shape)
    pattern[rows[valid], index[valid]] = True
    want = neighborhood_visible(cells, grid, kernel, dilation, stride, causal).numpy()
    np.testing.assert_array_equal(pattern, want)
    assert valid.sum() == want.sum()  # no key twice


def test_neighborhood_translation_rejects_bias():
    with pytest.raises(ValueError, match="bias must be None"):
        neighborhood_attention(
            None, None, None, None, torch.zeros(1), SCALE, [2, 2], [1, 1], [1, 1], [1, 1], [0, 0]
        )


def test_neighborhood_vit_end_to_end():
    """A tiny ViT rewritten to neighbourhood attention, its graph exported and run."""
    model = attnopt.zoo.tiny_model("tiny-vit").eval()
    config = attnopt.Neighborhood(kernel=3, dilation=(1, 2))
    optimized = attnopt.optimize(model, config, measure=False)
    assert len(optimized.report.applied) == 2
    graph = optimized.graph_module
    ops = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.attnopt.neighborhood_attention.default) == 2
    gen = torch.Generator().manual_seed(5)
    size = model.config.image_size
    example = _randn(gen, 2, 3, size, size)
    program = torch.onnx.export(
        graph,
        (),
        kwargs={"pixel_values": example},
        dynamo=True,
        custom_translation_table=SPARSE_TRANSLATIONS,
        verbose=False,
    )
    session = _session(program.model_proto)
    pixels = _randn(gen, 2, 3, size, size)
    got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        want = optimized(pixel_values=pixels).last_hidden_state
        original = model(pixel_values=pixels).last_hidden_state
    assert _max_err(got, want) < ATOL
    assert (want - original).abs().max() > 1e-2  # the variant survived the export


# -- agent ---------------------------------------------------------------------------------------

# name: (num_agents, grid, extra tokens, mask, heads); empty grid: dynamic sequence length.
AGENT_SEQ_CASES = {
    "sequence-7-agents": (7, (), 0, None, "gqa"),
    "sequence-padding": (9, (), 0, "keys", "gqa"),
    "sequence-head-mask-mha": (5, (), 0, "heads", "mha"),
}
AGENT_SEQ_LENGTHS = (100, 77)
AGENT_GRID_CASES = {
    "2d-grid-cls-padding": (9, (7, 9), 1, "keys", "gqa"),
    "3d-grid-extra2-head-mask": (8, (3, 5, 7), 2, "heads", "gqa"),
    "2d-grid-no-extra-mha": (4, (6, 6), 0, None, "mha"),
}


def _agent_case(q, k, v, mask, case):
    num_agents, grid, _, mask_kind, _ = case
    return torch.ops.attnopt.agent_attention(
        q, k, v, mask if mask_kind else None, None, SCALE, num_agents, list(grid)
    )


class _AgentCases(torch.nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = cases

    def forward(self, *args):
        return tuple(
            _agent_case(*args[4 * i : 4 * i + 4], case)
            for i, case in enumerate(self.cases.values())
        )


def _agent_inputs(gen, cases, n=None) -> tuple:
    args = []
    for _, grid, extra, mask, heads in cases.values():
        length = n if n is not None else extra + math.prod(grid)
        hkv = 2 if heads == "gqa" else 4
        args += [_randn(gen, 2, 4, length, D)]
        args += [_randn(gen, 2, hkv, length, D), _randn(gen, 2, hkv, length, D)]
        args.append(_mask(gen, 2, 4 if mask == "heads" else 1, length))
    return tuple(args)


@pytest.fixture(scope="module")
def agent_results():
    gen = torch.Generator().manual_seed(6)
    results = {}
    module = _AgentCases(AGENT_SEQ_CASES)
    seq = torch.export.Dim("seq", min=2, max=8192)
    dynamic = tuple({2: seq} for _ in range(4 * len(AGENT_SEQ_CASES)))
    args = _agent_inputs(gen, AGENT_SEQ_CASES, AGENT_SEQ_LENGTHS[0])
    session = _session(_export(module, args, (dynamic,)))  # forward(*args)
    for n in AGENT_SEQ_LENGTHS:
        args = _agent_inputs(gen, AGENT_SEQ_CASES, n)
        got = _run(session, args)
        with torch.no_grad():
            want = module(*args)
        for i, name in enumerate(AGENT_SEQ_CASES):
            results[f"{name}-N{n}"] = (got[i], want[i])
    module = _AgentCases(AGENT_GRID_CASES)
    session = _session(_export(module, _agent_inputs(gen, AGENT_GRID_CASES)))
    args = _agent_inputs(gen, AGENT_GRID_CASES)
    got = _run(session, args)
    with torch.no_grad():
        want = module(*args)
    for i, name in enumerate(AGENT_GRID_CASES):
        results[name] = (got[i], want[i])
    return results


AGENT_NAMES = [f"{c}-N{n}" for n in AGENT_SEQ_LENGTHS for c in AGENT_SEQ_CASES]
AGENT_NAMES += list(AGENT_GRID_CASES)


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_agent_matches_op(agent_results, name):
    got, want = agent_results[name]
    assert _max_err(got, want) < ATOL
