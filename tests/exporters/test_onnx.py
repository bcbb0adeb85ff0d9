"""ONNX export: every translated op matches its PyTorch op in onnxruntime, whole tiny
models export and verify at two lengths, the variant survives (no N×N tensor), the
metadata explains the file, and failures are loud and leave no file.

Exports are slow on CPU (torch.export + decompositions, ~5-15 s each), so the op
translations are checked through one "bank" module that calls every configuration
on the same q, k, v (one export for all), and the model tests share fixtures.

Metric: max |onnxruntime − PyTorch| / max |PyTorch|, fp32, below ``_TOL``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import attnopt  # noqa: E402
from attnopt.exporters import _onnx_ops  # noqa: E402
from attnopt.exporters.onnx import (  # noqa: E402
    ExportError,
    ExportVerificationError,
    export_onnx,
    onnx_translations,
)
from attnopt.kernels.linear.feature_maps import FeatureMapParameters  # noqa: E402

_TOL = 1e-4
ops = torch.ops.attnopt

# (id, op, extra args after (q, k, v, kv_mask, bias), takes kv_mask, feature-map tensors)
_B, _H, _HKV, _D = 2, 4, 2, 8


def _bank_calls():
    sw, lin, hyb, dense = (
        ops.sliding_window_attention.default,
        ops.linear_attention.default,
        ops.hybrid_attention.default,
        ops.dense_attention.default,
    )
    s = 0.35
    return [
        ("dense-causal", dense, (s, True), True, None),
        ("dense-bidir-nomask", dense, (s, False), False, None),
        ("sw-causal-w4", sw, (s, True, 4, 0, 1), True, None),
        ("sw-causal-w3-sinks2", sw, (s, True, 3, 2, 1), True, None),
        ("sw-causal-dil2-sinks1", sw, (s, True, 3, 1, 2), True, None),
        ("sw-bidir-w3-sinks1", sw, (s, False, 3, 1, 1), True, None),
        ("sw-bidir-dil3-nomask", sw, (s, False, 2, 0, 3), False, None),
        ("lin-elu-bidir", lin, (s, False, "elu", 4, None, 1e-6), True, "elu"),
        ("lin-relu-causal", lin, (s, True, "relu", 4, None, 1e-6), True, "relu"),
        ("lin-elu-causal-decay", lin, (s, True, "elu", 3, [0.9], 1e-6), True, "elu"),
        (
            "lin-elu-causal-decay-per-head",
            lin,
            (s, True, "elu", 4, [0.9, 0.8, 1.0, 0.5], 1e-6),
            False,
            "elu",
        ),
        ("lin-softmax_rf-causal", lin, (s, True, "softmax_rf", 5, None, 1e-6), True, "softmax_rf"),
        ("lin-hedgehog-bidir", lin, (s, False, "hedgehog", 4, None, 1e-6), True, "hedgehog"),
        ("hyb-elu-w3-sinks1", hyb, (s, True, 3, 1, "elu", 4), True, "elu"),
        ("hyb-hedgehog-w2-mix", hyb, (s, True, 2, 0, "hedgehog", 3), True, "hedgehog+mix"),
        ("hyb-softmax_rf-w4-sinks2", hyb, (s, True, 4, 2, "softmax_rf", 8), False, "softmax_rf"),
    ]


class _Bank(nn.Module):
    """Calls every configuration of :func:`_bank_calls` on the same inputs."""

    def __init__(self):
        super().__init__()
        self.calls = _bank_calls()
        self.maps = nn.ModuleList()
        torch.manual_seed(1)
        for _, _, _, _, fmap in self.calls:
            mix = fmap is not None and fmap.endswith("+mix")
            name = fmap.split("+")[0] if fmap else "elu"
            m = FeatureMapParameters(name, heads=_H, kv_heads=_HKV, head_dim=_D, seed=3, mixing=mix)
            with torch.no_grad():  # not the identity: exercise the weights
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
            self.maps.append(m)

    def _tensors(self, i, fmap):
        m = self.maps[i]
        if fmap is None or fmap in ("elu", "relu"):
            return (None, None, None, None)
        if fmap == "softmax_rf":
            return (m.projection, None, m.projection, None)
        return (m.q_weight, m.q_bias, m.k_weight, m.k_bias)

    def forward(self, q, k, v, kv_mask):
        outs = []
        for i, (_, op, extra, masked, fmap) in enumerate(self.calls):
            mask = kv_mask if masked else None
            args = (q, k, v, mask, None, *extra)
            if op is ops.linear_attention.default:
                args = args + self._tensors(i, fmap)
            elif op is ops.hybrid_attention.default:
                mix = self.maps[i].mix_logit if fmap.endswith("+mix") else None
                args = args + self._tensors(i, fmap) + (mix,)
            outs.append(op(*args))
        return tuple(outs)


def _qkv(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(_B, _H, n, _D, generator=g)
    k = torch.randn(_B, _HKV, m, _D, generator=g)
    v = torch.randn(_B, _HKV, m, _D, generator=g)
    mask = torch.ones(_B, 1, m, dtype=torch.bool)
    mask[0, 0, -3:] = False  # right padding
    mask[1, 0, :2] = False  # left padding
    return q, k, v, mask


def _rel(ref, got):
    ref = ref.double()
    got = torch.as_tensor(got).double()
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    bank = _Bank().eval()
    path = str(tmp_path_factory.mktemp("onnx") / "bank.onnx")
    n, m = torch.export.Dim("n", min=1), torch.export.Dim("m", min=2)
    b = torch.export.Dim("b", min=1)
    program = torch.onnx.export(
        bank,
        _qkv(9, 13, 0),
        None,
        dynamo=True,
        dynamic_shapes=({0: b, 2: n}, {0: b, 2: m}, {0: b, 2: m}, {0: b, 2: m}),
        custom_translation_table=onnx_translations(),
        verbose=False,
    )
    program.save(path)
    return bank, path


@pytest.mark.parametrize(("n", "m"), [(37, 37), (1, 1), (6, 23)], ids=["n37", "n1", "n6-m23"])
def test_every_translation_matches_its_op(bank_file, n, m):
    bank, path = bank_file
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = _qkv(n, m, seed=n + m)
    if n == 1 and m == 1:  # one key: the mask must leave it visible in a row
        inputs[3][:] = True
        inputs[3][0, 0, 0] = False  # batch 0 sees nothing: must output zeros
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {nm: t.numpy() for nm, t in zip(names, inputs)})
    with torch.no_grad():
        want = bank(*inputs)
    bad = {}
    for (cid, *_), w, g in zip(bank.calls, want, got):
        assert np.isfinite(g).all(), cid
        err = _rel(w, g)
        if err > _TOL:
            bad[cid] = err
    assert not bad, f"relative errors above {_TOL}: {bad}"


def test_sliding_window_translation_has_no_n_by_n_tensor():
    """Every value of a sliding-window op graph run at N = 1024: none has two dims >= N."""

    class SW(nn.Module):
        def forward(self, q, k, v, kv_mask):
            return ops.sliding_window_attention.default(q, k, v, kv_mask, None, 0.3, True, 16, 4, 1)

    n = torch.export.Dim("n", min=2)
    program = torch.onnx.export(
        SW().eval(),
        _qkv(40, 40, 0),
        None,
        dynamo=True,
        dynamic_shapes=({2: n}, {2: n}, {2: n}, {2: n}),
        custom_translation_table=onnx_translations(),
        verbose=False,
    )
    from attnopt.exporters.onnx import _runtime_shapes

    proto = program.model_proto
    values = [o for node in proto.graph.node for o in node.output]
    feeds = dict(zip([i.name for i in proto.graph.input], (t.numpy() for t in _qkv(1024, 1024, 0))))
    shapes = _runtime_shapes(proto, values, feeds)
    assert len(shapes) > 0.9 * len(values)
    square = {k: s for k, s in shapes.items() if sum(d >= 1024 for d in s) >= 2}
    assert not square, f"N x N tensors in the sliding-window graph: {square}"
    assert max(max(s, default=0) for s in shapes.values()) >= 1024  # it did run at length N


def test_dense_uses_attention_op_at_opset_23(tmp_path):
    from attnopt.exporters.onnx import _ort_has_attention

    if not _ort_has_attention():
        pytest.skip("this onnxruntime does not run the opset-23 Attention op")

    class Dense(nn.Module):
        def forward(self, q, k, v, kv_mask, bias):
            a = ops.dense_attention.default(q, k, v, kv_mask, None, 0.3, True)
            b = ops.dense_attention.default(q, k, v, None, bias, 0.3, False)
            return a, b

    q, k, v, mask = _qkv(7, 7, 0)
    mask[0, 0, :] = False  # a batch with no visible key: zeros, not NaN
    bias = torch.randn(_B, _H, 7, 7)
    bias[:, :, 2, :] = float("-inf")
    n = torch.export.Dim("n", min=2)
    program = torch.onnx.export(
        Dense(),
        (q, k, v, mask, bias),
        None,
        dynamo=True,
        opset_version=23,
        dynamic_shapes=({2: n}, {2: n}, {2: n}, {2: n}, {2: n, 3: n}),
        custom_translation_table=onnx_translations(23),
        verbose=False,
    )
    assert "Attention" in {node.op_type for node in program.model_proto.graph.node}
    path = str(tmp_path / "dense23.onnx")
    program.save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (t.numpy() for t in (q, k, v, mask, bias)))))
    with torch.no_grad():
        want = Dense()(q, k, v, mask, bias)
    for w, g in zip(want, got):
        assert np.isfinite(g).all()
        assert _rel(w, g) < _TOL


# -- whole models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    model = attnopt.zoo.tiny_model("tiny-llama")
    policy = {
        "model.layers.0.*": attnopt.SlidingWindow(window=4, sinks=2),
        "*": attnopt.Hybrid(window=4, sinks=1, chunk=4),
    }
    optimized = attnopt.optimize(model, policy, measure=False)
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    report = export_onnx(optimized, path)
    return optimized, path, report


def test_tiny_llama_exports_and_verifies(llama_export):
    optimized, path, report = llama_export
    assert os.path.isfile(path)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".attnopt")]
    assert len(report.checks) == 2
    assert {c.seq_len for c in report.checks}.isdisjoint({report.export_seq_len})
    assert report.max_rel < _TOL
    by_name = {s.name: s for s in report.sites}
    assert by_name["model.layers.0.self_attn"].op == "attnopt::sliding_window_attention"
    assert by_name["model.layers.1.self_attn"].op == "attnopt::hybrid_attention"
    for s in report.sites:  # the variant survived: no N x N tensor at the check length
        assert s.onnx_nodes > 0 and s.quadratic is False, s
    assert "N×N" in str(report)


def test_tiny_llama_file_explains_itself(llama_export):
    _, path, report = llama_export
    model = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["attnopt.version"] == attnopt.__version__
    sites = json.loads(meta["attnopt.sites"])
    first, second = sites["model.layers.0.self_attn"], sites["model.layers.1.self_attn"]
    assert attnopt.config_from_dict(first["variant"]) == attnopt.SlidingWindow(4, sinks=2)
    assert attnopt.config_from_dict(second["variant"]) == attnopt.Hybrid(4, sinks=1, chunk=4)
    assert first["applied"] and first["mask"] == "causal+padding"
    assert json.loads(meta["attnopt.export"])["dynamic_seq"] is True
    assert meta == report.metadata
    # No attnopt op leaked into the file: every node is a standard ONNX operator.
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}


def test_tiny_llama_file_runs_at_other_batch_and_length(llama_export):
    optimized, path, _ = llama_export
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (3, 29), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = optimized(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded query rows are not compared (they are garbage in both)
    assert _rel(want[keep], torch.as_tensor(got)[keep]) < _TOL


def test_tiny_bert_linear_and_dense(tmp_path):
    model = attnopt.zoo.tiny_model("tiny-bert")
    policy = {"encoder.layer.0.*": attnopt.Linear("elu"), "*": attnopt.Dense()}
    optimized = attnopt.optimize(model, policy, measure=False)
    path = str(tmp_path / "bert.onnx")
    report = export_onnx(optimized, path)
    assert report.max_rel < _TOL and len(report.checks) == 2
    by_name = {s.name: s for s in report.sites}
    lin = next(s for n, s in by_name.items() if "layer.0" in n)
    dense = next(s for n, s in by_name.items() if "layer.1" in n)
    assert lin.op == "attnopt::linear_attention" and lin.quadratic is False
    # The check does see N x N tensors where they exist: exact attention has them.
    assert dense.op == "attnopt::dense_attention" and dense.quadratic is True


# -- failures -----------------------------------------------------------------------------------


class _TinyAttention(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@pytest.fixture(scope="module")
def tiny_sw():
    torch.manual_seed(0)
    model = _TinyAttention().eval()
    x = torch.randn(2, 16, 32)
    return attnopt.optimize(model, attnopt.SlidingWindow(window=4, sinks=1), (x,), measure=False)


def test_tolerance_zero_fails_loudly_and_writes_nothing(tiny_sw, tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportVerificationError, match="tolerance"):
        export_onnx(tiny_sw, path, tolerance=0.0)
    assert path.read_bytes() == b"old"  # the existing file is untouched
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx"]


def test_a_dense_translation_for_a_window_is_caught(tiny_sw, tmp_path, monkeypatch):
    def dense_in_disguise(q, k, v, kv_mask, bias, scale, causal, window, sinks, dilation):
        return _onnx_ops.dense_attention(q, k, v, kv_mask, None, scale, causal)

    monkeypatch.setattr(_onnx_ops, "sliding_window_attention", dense_in_disguise)
    with pytest.raises(ExportVerificationError, match="did not survive"):
        export_onnx(tiny_sw, tmp_path / "tiny.onnx")
    assert os.listdir(tmp_path) == []


def test_static_sequence_export(tiny_sw, tmp_path):
    report = export_onnx(tiny_sw, tmp_path / "static.onnx", dynamic_seq=False)
    assert [c.seq_len for c in report.checks] == [16] and report.max_rel < _TOL
    model = onnx.load(str(tmp_path / "static.onnx"))
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [16, 32] and not isinstance(dims[0], int)  # batch stays dynamic
    assert report.sites[0].quadratic is False


def test_op_without_translation_is_an_error_naming_site_and_op(tiny_sw, tmp_path, monkeypatch):
    import attnopt.exporters.onnx as onnx_export

    table = onnx_translations()
    del table[ops.sliding_window_attention.default]
    monkeypatch.setattr(onnx_export, "onnx_translations", lambda opset=None: table)
    with pytest.raises(ExportError, match=r"site '<root>' runs attnopt::sliding_window_attention"):
        export_onnx(tiny_sw, tmp_path / "tiny.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"opset": 12}, ValueError, "opset must be None or an int >= 18, got 12"),
        ({"tolerance": -1.0}, ValueError, "tolerance must be None or a finite number"),
        ({"tolerance": float("nan")}, ValueError, "tolerance"),
        ({"verify": "yes"}, TypeError, "verify must be a bool, got 'yes'"),
        ({"dynamic_seq": 1}, TypeError, "dynamic_seq must be a bool"),
        ({"verify_lengths": (0, 5)}, ValueError, "verify_lengths must be"),
        ({"example_inputs": [1, 2]}, TypeError, "example_inputs must be None, a tuple"),
    ],
    ids=[
        "opset",
        "tolerance-negative",
        "tolerance-nan",
        "verify",
        "dynamic_seq",
        "lengths",
        "example_inputs",
    ],
)
def test_bad_arguments(tiny_sw, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(tiny_sw, tmp_path / "x.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_bad_model_and_path(tiny_sw, tmp_path):
    with pytest.raises(TypeError, match="must be the OptimizedModule"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tiny_sw, tmp_path / "missing" / "x.onnx")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_onnx(tiny_sw, tmp_path)


def test_sliding_window_layers_export_with_their_window(tmp_path):
    # A model whose layers have their own window (Mistral sliding_window=8): the padding
    # mask comes from each key's own query row, and the file keeps the window.
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attn_implementation="sdpa",
    )
    model = transformers.MistralForCausalLM(cfg).eval()
    optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=8), measure=False)
    assert [r.site.window for r in optimized.report.applied] == [8, 8]
    path = str(tmp_path / "mistral.onnx")
    report = export_onnx(optimized, path)
    assert report.max_rel < _TOL
    sites = json.loads(
        {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}[
            "attnopt.sites"
        ]
    )
    assert sites["model.layers.0.self_attn"]["window"] == 8
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(1, 256, (2, 27), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits  # the original model
    keep = mask.bool()
    assert _rel(want[keep], torch.as_tensor(got)[keep]) < _TOL
