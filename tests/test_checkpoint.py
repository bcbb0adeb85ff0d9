"""Converted checkpoints in-process: round trips, atomic writes, corrupt directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import attnopt
from attnopt import checkpoint
from attnopt.capture import example_inputs_for
from attnopt.checkpoint import CheckpointError

pytest.importorskip("transformers")


def _outputs_equal(a, b, model, *, seq_len=37, batch=3):
    inputs = example_inputs_for(model, batch=batch, seq_len=seq_len, seed=5)
    with torch.no_grad():
        x, y = a(**inputs), b(**inputs)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


@pytest.fixture(scope="module")
def hedgehog(tmp_path_factory):
    """A tiny Llama with trained-looking (perturbed) Hedgehog feature maps, saved once."""
    model = attnopt.zoo.tiny_model("tiny-llama")
    optimized = attnopt.optimize(model, attnopt.Linear(feature_map="hedgehog"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in optimized.attnopt_params.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    out = checkpoint.save(optimized, tmp_path_factory.mktemp("ckpt") / "llama-hedgehog")
    return model, optimized, out


def test_round_trip_keeps_outputs_and_variant_parameters(hedgehog):
    model, optimized, out = hedgehog
    names = sorted(p.name for p in out.iterdir())
    assert {"attnopt.json", "attnopt_params.safetensors", "config.json"} <= set(names)
    assert any(n.endswith(".safetensors") and n.startswith("model") for n in names)
    loaded = checkpoint.load(out)
    assert isinstance(loaded, attnopt.OptimizedModule)
    assert [(r.name, r.applied, r.config) for r in loaded.report] == [
        (r.name, r.applied, r.config) for r in optimized.report
    ]
    saved = optimized.attnopt_params.state_dict()
    again = loaded.attnopt_params.state_dict()
    assert saved.keys() == again.keys() and saved
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], rtol=0, atol=0)
    _outputs_equal(optimized, loaded, model)


def test_metadata_records_the_per_site_policy(hedgehog):
    _, optimized, out = hedgehog
    meta = checkpoint.read_metadata(out)
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["attnopt_version"] == attnopt.__version__
    assert meta["model"]["class"] == "LlamaForCausalLM"
    assert meta["model"]["auto_class"] == "AutoModelForCausalLM"
    assert meta["model"]["attn_implementation"] == "sdpa"
    sites = {s["name"]: s for s in meta["sites"]}
    assert sorted(sites) == [r.name for r in optimized.report]
    for s in sites.values():
        assert s["applied"] is True
        assert attnopt.config_from_dict(s["config"]) == attnopt.Linear(feature_map="hedgehog")
    assert set(meta["parameters"]["tensors"]) == set(optimized.attnopt_params.state_dict())


def test_partial_policy_and_absent_pooler_round_trip(tmp_path):
    # BertModel(add_pooling_layer=False): from_pretrained alone would add a random pooler.
    model = attnopt.zoo.tiny_model("tiny-bert")
    policy = {"encoder.layer.0.*": attnopt.SlidingWindow(window=3, sinks=1), "*": None}
    optimized = attnopt.optimize(model, policy)
    out = checkpoint.save(optimized, tmp_path / "bert")
    loaded = checkpoint.load(out)
    assert [(r.name, r.applied) for r in loaded.report] == [
        ("encoder.layer.0.attention.self", True),
        ("encoder.layer.1.attention.self", False),
    ]
    assert loaded.original.pooler is None
    assert not (out / checkpoint.PARAMS_FILE).exists()  # no variant owns tensors
    _outputs_equal(optimized, loaded, model, seq_len=11)


def test_existing_output_is_refused_and_untouched(hedgehog, tmp_path):
    _, optimized, _ = hedgehog
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="force=True"):
        checkpoint.save(optimized, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_only_when_complete(hedgehog, tmp_path, monkeypatch):
    _, optimized, _ = hedgehog
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = optimized.original

    def broken(self, directory, **kwargs):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(optimized, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp left
    with pytest.raises(OSError):
        checkpoint.save(optimized, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    checkpoint.save(optimized, out, force=True)
    assert not (out / "keep.txt").exists() and checkpoint.is_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_meta(path, fn):
    meta = json.loads((path / "attnopt.json").read_text())
    fn(meta)
    (path / "attnopt.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: (p / "attnopt.json").unlink(), "has no attnopt.json"),
        (lambda p: (p / "attnopt.json").write_text("{"), "is corrupt"),
        (
            lambda p: _edit_meta(p, lambda m: m.update(format_version=99)),
            "newer than this attnopt",
        ),
        (lambda p: _edit_meta(p, lambda m: m.update(sites=[])), "'sites' or 'model'"),
        (lambda p: (p / "attnopt_params.safetensors").unlink(), "incomplete"),
        (lambda p: (p / "attnopt_params.safetensors").write_bytes(b"junk"), "sha256"),
        (lambda p: (p / "config.json").unlink(), "no config.json"),
        (lambda p: (p / "model.safetensors").write_bytes(b"junk"), "cannot load the model"),
        (
            lambda p: _edit_meta(p, lambda m: m["sites"][0].update(config={"variant": "nope"})),
            "bad config for site",
        ),
    ],
    ids=[
        "no-json",
        "bad-json",
        "newer-format",
        "no-sites",
        "no-params",
        "params-digest",
        "no-hf-config",
        "bad-weights",
        "unknown-variant",
    ],
)
def test_corrupt_checkpoints_raise_checkpoint_error(hedgehog, tmp_path, corrupt, match):
    path = _copy(hedgehog[2], tmp_path)
    corrupt(path)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path)


def test_recorded_sites_must_be_found(hedgehog, tmp_path):
    path = _copy(hedgehog[2], tmp_path)
    _edit_meta(path, lambda m: m["sites"][1].update(name="model.layers.9.self_attn"))
    with pytest.raises(CheckpointError, match=r"recorded sites not found: \['model.layers.9"):
        checkpoint.load(path)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load("/nonexistent/attnopt-checkpoint")


class _Attention(nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_save_needs_an_optimized_transformers_model(tmp_path):
    with pytest.raises(TypeError, match="OptimizedModule"):
        checkpoint.save(nn.Linear(2, 2), tmp_path / "x")
    x = torch.randn(2, 2, 8, 4)
    optimized = attnopt.optimize(_Attention(), attnopt.Dense(), (x,), measure=False)
    with pytest.raises(TypeError, match="save_pretrained"):
        checkpoint.save(optimized, tmp_path / "x")
    assert not (tmp_path / "x").exists()
