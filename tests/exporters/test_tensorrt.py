"""TensorRT exporter: pre-flight on real ONNX files, the missing-TensorRT path, argument
checks; the build and run themselves only where TensorRT and a GPU exist."""

from __future__ import annotations

import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from attnopt.exporters import tensorrt as trt_exp  # noqa: E402


def _model(nodes, *, opsets=(("", 17),), functions=(), inputs=None, outputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])]
    outputs = outputs or [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
        functions=list(functions),
    )
    return model


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _attention_like(tmp_path):
    """softmax(x·xᵀ)·x with dynamic batch and sequence: every op TensorRT imports."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["s"], name="qk"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["y"], name="pv"),
    ]
    return _save(tmp_path, _model(nodes), "attention.onnx")


def test_preflight_supported_file_is_clean(tmp_path):
    assert trt_exp.preflight(_attention_like(tmp_path)) == []


def test_preflight_lists_every_unsupported_op_with_nodes(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Bernoulli", ["a"], ["b"], name="coin0"),
        helper.make_node("Bernoulli", ["b"], ["c"], name="coin1"),
        helper.make_node("BitShift", ["c", "c"], ["y"], direction="LEFT"),  # unnamed
    ]
    found = trt_exp.preflight(_save(tmp_path, _model(nodes)))
    by_op = {u.op_type: u for u in found}
    assert sorted(by_op) == ["Bernoulli", "BitShift"]
    assert by_op["Bernoulli"].nodes == ("coin0", "coin1")
    assert by_op["Bernoulli"].domain == "" and by_op["Bernoulli"].opset == 17
    assert by_op["BitShift"].nodes == ("<unnamed BitShift #3>",)
    assert "not supported" in by_op["Bernoulli"].reason
    assert "Bernoulli" in str(by_op["Bernoulli"])


def test_preflight_flags_custom_domains(tmp_path):
    nodes = [
        helper.make_node("sliding_window_attention", ["x"], ["y"], name="sw", domain="attnopt")
    ]
    model = _model(nodes, opsets=(("", 17), ("attnopt", 1)))
    (found,) = trt_exp.preflight(_save(tmp_path, model))
    assert (found.domain, found.op_type, found.opset, found.nodes) == (
        "attnopt",
        "sliding_window_attention",
        1,
        ("sw",),
    )
    assert "custom domain 'attnopt'" in found.reason


def test_preflight_reads_subgraphs_and_local_functions(tmp_path):
    # A local function is inlined by the parser: its call is fine, its body is checked.
    body = [helper.make_node("Unique", ["a"], ["b"], name="inner_unique")]
    fn = helper.make_function("local", "f", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, None)
    then_g = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["t"]), helper.make_node("Unique", ["x"], ["u"])],
        "then",
        [],
        [then_out],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    nodes = [
        helper.make_node("If", ["c"], ["i"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("f", ["i"], ["y"], name="call", domain="local"),
    ]
    model = _model(nodes, opsets=(("", 17), ("local", 1)), functions=[fn], inputs=[cond, x])
    found = trt_exp.preflight(_save(tmp_path, model))
    assert [u.op_type for u in found] == ["Unique"]
    assert found[0].nodes == ("branch/then_branch/<unnamed Unique #1>", "call/inner_unique")


def test_preflight_flags_an_opset_outside_tensorrt_range(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], opsets=(("", 7),))
    model.ir_version = 3
    (found,) = trt_exp.preflight(_save(tmp_path, model))
    assert found.op_type == "opset" and found.opset == 7
    assert "9 to 24" in found.reason


def test_preflight_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        trt_exp.preflight(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx file\xff" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        trt_exp.preflight(junk)


def test_supported_table_matches_the_documented_matrix():
    # Spot checks against onnx-tensorrt docs/operators.md (TensorRT 10.x).
    for op in ("Attention", "TopK", "CumSum", "GatherElements", "Trilu", "RMSNormalization"):
        assert op in trt_exp.SUPPORTED_OPS
    for op in ("Bernoulli", "Unique", "SequenceAt", "MatMulInteger", "ConvInteger", "DFT"):
        assert op not in trt_exp.SUPPORTED_OPS


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail


def test_build_engine_without_tensorrt_names_the_package_and_extra(tmp_path, no_tensorrt):
    onnx_path = _attention_like(tmp_path)
    engine = tmp_path / "m.engine"
    with pytest.raises(trt_exp.TensorRTUnavailable) as info:
        trt_exp.build_engine(onnx_path, engine, seq_range=(1, 16, 64))
    message = str(info.value)
    assert "'tensorrt'" in message and "pip install 'attnopt[tensorrt]'" in message
    assert isinstance(info.value, ImportError)
    assert not engine.exists()
    assert trt_exp.preflight(onnx_path) == []  # pre-flight needs only onnx


def test_run_engine_without_tensorrt(tmp_path, no_tensorrt):
    with pytest.raises(trt_exp.TensorRTUnavailable, match="attnopt\\[tensorrt\\]"):
        trt_exp.run_engine(tmp_path / "m.engine", {"x": np.zeros((1, 2, 8), np.float32)})


def test_build_engine_refuses_unsupported_ops_before_any_build(tmp_path, no_tensorrt):
    nodes = [helper.make_node("custom", ["x"], ["y"], name="c", domain="com.example")]
    path = _save(tmp_path, _model(nodes, opsets=(("", 17), ("com.example", 1))))
    with pytest.raises(ValueError, match="com.example::custom"):
        trt_exp.build_engine(path, tmp_path / "m.engine")


@pytest.mark.parametrize(
    "seq_range",
    [(0, 1, 2), (4, 2, 8), (1, 2), (1, 2, 3, 4), "1,2,3", (1.5, 2, 3), None],
    ids=["zero-min", "min>opt", "two", "four", "string", "float", "none"],
)
def test_seq_range_validation(tmp_path, seq_range):
    with pytest.raises(ValueError, match="seq_range must be three integers"):
        trt_exp.build_engine(_attention_like(tmp_path), tmp_path / "e", seq_range=seq_range)


def test_batch_range_and_workspace_validation(tmp_path):
    path = _attention_like(tmp_path)
    with pytest.raises(ValueError, match="batch_range"):
        trt_exp.build_engine(path, tmp_path / "e", batch_range=(2, 1, 4))
    with pytest.raises(ValueError, match="workspace_gb must be a positive"):
        trt_exp.build_engine(path, tmp_path / "e", workspace_gb=0)


# -- where TensorRT and a GPU exist ------------------------------------------------------


@pytest.mark.tensorrt
def test_build_and_run_engine_matches_onnxruntime(tmp_path):
    onnx_path = _attention_like(tmp_path)
    engine = tmp_path / "attention.engine"
    cache = tmp_path / "timing.cache"
    report = trt_exp.build_engine(
        onnx_path,
        engine,
        fp16=False,
        seq_range=(1, 33, 100),
        batch_range=(1, 2, 3),
        workspace_gb=1,
        timing_cache=cache,
    )
    assert engine.is_file() and report.engine_bytes == engine.stat().st_size
    assert report.profile["x"] == ((1, 1, 8), (2, 33, 8), (3, 100, 8))
    assert cache.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 8), (3, 63, 8), (2, 100, 8)]:
        x = rng.standard_normal(shape).astype(np.float32)
        out = trt_exp.run_engine(engine, {"x": x})
        assert out["y"].shape == shape
        comparison = trt_exp.compare_engine_to_onnxruntime(engine, onnx_path, {"x": x})
        assert comparison.worst_abs < 1e-3, comparison


@pytest.mark.tensorrt
def test_run_engine_takes_torch_tensors_and_checks_names(tmp_path):
    import torch

    onnx_path = _attention_like(tmp_path)
    engine = tmp_path / "attention.engine"
    trt_exp.build_engine(onnx_path, engine, fp16=True, seq_range=(1, 8, 16))
    out = trt_exp.run_engine(engine, {"x": torch.randn(1, 7, 8)})
    assert out["y"].shape == (1, 7, 8) and np.isfinite(out["y"]).all()
    with pytest.raises(KeyError, match="missing"):
        trt_exp.run_engine(engine, {"z": torch.randn(1, 7, 8)})
