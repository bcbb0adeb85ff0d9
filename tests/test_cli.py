"""The ``attnopt`` command line, through the real entry point in subprocesses.

Every subprocess imports torch, so the independent runs are made once, a few at a time
(module fixture ``runs``), and each test reads the result it needs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt import checkpoint, cli

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("attnopt: error:")]


def _run_cli(args, cwd: Path) -> Result:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "attnopt.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _tiny_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    # A Hugging Face checkpoint without attention (a tiny ResNet).
    resnet = transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])
    )
    resnet.save_pretrained(root / "resnet")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "attnopt.json").write_text('{"format": "attnopt-checkpoint", ')
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("not yours")
    _tiny_onnx(root / "softmax.onnx")
    return root


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Result]:
    commands = {
        "inspect_table": ["inspect", "tiny-bert"],
        "inspect_json": ["inspect", "tiny-llama", "--json"],
        "convert": [
            "convert", "tiny-llama", "--variant", "linear", "--feature-map", "hedgehog",
            "--seq-len", "24", "-o", work / "out" / "llama-hedgehog",
        ],
        "refused": ["convert", "tiny-llama", "--variant", "dense", "-o", work / "existing"],
        "missing": ["inspect", work / "no-such-checkpoint"],
        "corrupt": ["export", work / "corrupt", "--onnx", work / "x.onnx"],
        "unknown_variant": ["convert", "tiny-llama", "--variant", "fast", "-o", work / "x"],
        "unknown_option": [
            "convert", "tiny-llama", "--variant", "sliding-window", "--window", "4",
            "--topk", "2", "-o", work / "x",
        ],
        "no_attention": ["inspect", work / "resnet"],
        "no_tensorrt": ["build-engine", work / "softmax.onnx", "-o", work / "softmax.engine"],
    }  # fmt: skip
    # A few at a time: the machine is shared, and each run imports torch.
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_cli, args, work) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def _assert_one_error(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, result
    assert "Traceback" not in result.err, result.err
    assert len(result.error_lines) == 1, result.err
    assert result.err.strip().splitlines()[-1] == result.error_lines[0]
    for fragment in fragments:
        assert fragment in result.error_lines[0], result.error_lines[0]


def test_inspect_table(runs):
    r = runs["inspect_table"]
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["site", "module", "kind", "heads/kv", "head", "dim", "mask"]
    assert "encoder.layer.0.attention.self" in r.out and "padding" in r.out
    assert lines[-1] == "2 attention site(s) in BertModel"
    assert "[1] loading tiny-bert" in r.err  # progress goes to stderr


def test_inspect_json(runs):
    r = runs["inspect_json"]
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["model"] == "tiny-llama" and data["converted"] is False
    assert [s["name"] for s in data["sites"]] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]
    assert data["sites"][0]["num_kv_heads"] == 2 and data["sites"][0]["mask"] == "causal+padding"


def test_convert_then_load_round_trip(runs, work):
    r = runs["convert"]
    assert r.code == 0, r.err
    assert "2 of 2 attention sites rewritten" in r.out
    assert "max |optimized - original| on fresh random inputs" in r.out
    out = work / "out" / "llama-hedgehog"
    assert checkpoint.is_checkpoint(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["llama-hedgehog"]  # no temp left
    loaded = checkpoint.load(out)
    in_memory = attnopt.optimize(
        attnopt.zoo.tiny_model("tiny-llama"), attnopt.Linear(feature_map="hedgehog"), measure=False
    )
    saved, fresh = loaded.attnopt_params.state_dict(), in_memory.attnopt_params.state_dict()
    assert saved.keys() == fresh.keys() and any("q_weight" in k for k in saved)
    for k in saved:
        torch.testing.assert_close(saved[k], fresh[k], rtol=0, atol=0)
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=mask).logits
        b = in_memory(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_existing_output_is_refused_and_left_untouched(runs, work):
    _assert_one_error(runs["refused"], 1, "already exists", "--force")
    assert _tree(work / "existing") == {"keep.txt": hashlib.sha256(b"not yours").hexdigest()}
    assert runs["refused"].out == ""


@pytest.mark.parametrize(
    "name, code, fragments",
    [
        ("missing", 1, ("no-such-checkpoint", "not a built-in tiny model", "tiny-llama")),
        ("corrupt", 1, ("attnopt.json", "is corrupt")),
        ("unknown_variant", 2, ("--variant", "'fast'", "sliding-window")),
        ("unknown_option", 2, ("--topk does not apply to --variant sliding-window", "--window")),
        ("no_attention", 1, ("no attention found",)),
        ("no_tensorrt", 1, ("'tensorrt'", "pip install 'attnopt[tensorrt]'")),
    ],
)
def test_errors_are_one_line_without_traceback(runs, name, code, fragments):
    _assert_one_error(runs[name], code, *fragments)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["convert", "tiny-llama", "--variant", "sliding-window", "--window", "0", "-o", "x"],
            ("window must be a positive int", "got 0"),
        ),
        (
            ["convert", "tiny-llama", "--variant", "sliding-window", "--window", "x", "-o", "x"],
            ("--window 'x' is not valid for --variant sliding-window", "expected int"),
        ),
        (
            ["convert", "tiny-llama", "--variant", "sliding-window", "-o", "x"],
            ("--variant sliding-window needs --window",),
        ),
        (["inspect", "tiny-llama", "--bogus"], ("unrecognized arguments: --bogus",)),
        (["build-engine", "f.onnx", "-o", "e", "--seq-range", "4,2,8"], ("--seq-range",)),
        ([], ("COMMAND",)),
    ],
    ids=["bad-value", "bad-type", "missing-required", "unknown-flag", "bad-range", "no-command"],
)
def test_usage_errors_exit_2_in_one_line(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv)
    _assert_one_error(Result(code, "", capsys.readouterr().err), 2, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_build_engine_runs_preflight_before_needing_tensorrt(runs, work):
    assert "pre-flight" in runs["no_tensorrt"].err
    assert not (work / "softmax.engine").exists()


# -- in-process: paths that need a stand-in exporter or a registered command -------------


def _fake_exporter(monkeypatch, behaviour):
    module = types.ModuleType("attnopt.exporters.onnx")

    class ExportVerificationError(RuntimeError):
        pass

    def export_onnx(optimized, path, *, opset=None, dynamic_seq=True, verify=True):
        return behaviour(ExportVerificationError, Path(path))

    module.ExportVerificationError = ExportVerificationError
    module.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "attnopt.exporters.onnx", module)


def test_export_verification_failure_is_one_line(monkeypatch, capsys, runs, work):
    assert runs["convert"].code == 0

    def fail(error, path):
        raise error("max error 3.1e-01 at seq 97 exceeds tolerance 1e-04\nsecond line")

    _fake_exporter(monkeypatch, fail)
    monkeypatch.setattr(cli, "_load_converted", lambda path: object())
    code = cli.main(
        ["export", str(work / "out" / "llama-hedgehog"), "--onnx", str(work / "f.onnx")]
    )
    err = capsys.readouterr().err
    assert code == 1
    result = Result(code, "", err)
    _assert_one_error(result, 1, "ONNX export verification failed", "3.1e-01", "second line")


def test_export_refuses_an_existing_file(capsys, runs, work):
    assert runs["convert"].code == 0
    target = work / "existing.onnx"
    target.write_bytes(b"old")
    code = cli.main(["export", str(work / "out" / "llama-hedgehog"), "--onnx", str(target)])
    _assert_one_error(Result(code, "", capsys.readouterr().err), 1, "already exists")
    assert target.read_bytes() == b"old"


def test_demo_runs_the_whole_path(monkeypatch, capsys):
    exported = []

    def export(error, path):
        _tiny_onnx(path)
        exported.append(path)
        return "exported and verified (stand-in)"

    _fake_exporter(monkeypatch, export)
    monkeypatch.setattr(cli, "_tensorrt_status", lambda: "tensorrt is not installed (test)")
    assert cli.main(["--quiet", "demo", "--seq-len", "20"]) == 0
    out = capsys.readouterr().out
    assert "== inspect tiny-llama" in out and "2 of 2 attention sites rewritten" in out
    assert "loaded vs in-memory optimized: max abs diff 0.000e+00" in out
    assert "exported and verified (stand-in)" in out and exported
    assert "pre-flight: TensorRT 10's ONNX parser supports every operator" in out
    assert "skipped the build: tensorrt is not installed (test)" in out
    assert not exported[0].exists()  # the temporary directory is cleaned up


def test_subcommands_can_be_registered_from_other_modules(monkeypatch, capsys):
    def add_hello(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(handler=lambda args, log: print(f"hello {args.name}") or 0)

    monkeypatch.setattr(cli, "_REGISTRARS", list(cli._REGISTRARS))
    cli.register_subcommand(add_hello)
    assert cli.main(["hello", "--name", "attnopt"]) == 0
    assert capsys.readouterr().out == "hello attnopt\n"
