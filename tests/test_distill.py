"""attnopt.distill: data packing, attention transfer, fine-tuning, resume, data parallel.

Models are the random-weight ``tiny-llama`` of the zoo (2 layers, 4/2 heads of 16);
its attention is nearly uniform, so errors are small but must still drop with
training. Runs are a few steps at ``seq_len=32`` to keep the file well under 2 minutes.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt.distill import DistillReport, distill, pack_tokens, prepare_data
from attnopt.distill.checkpointing import CHECKPOINT_NAME

pytest.importorskip("transformers")

SEQ = 32
BATCH = 4
REPO = Path(__file__).resolve().parents[1]


def _tokens(n: int = 6000, seed: int = 1) -> torch.Tensor:
    # Random ids with some structure (a repeated motif) so attention is not trivial.
    gen = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 256, (97,), generator=gen)
    noise = torch.randint(0, 256, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.5, motif.repeat(n // 97 + 1)[:n], noise)


@pytest.fixture(scope="module")
def model():
    return attnopt.zoo.tiny_model("tiny-llama")


@pytest.fixture(scope="module")
def _hedgehog_once(model):
    fast = attnopt.optimize(model, attnopt.Linear(feature_map="hedgehog"), measure=False)
    return fast, _variant_state(fast)


@pytest.fixture
def hedgehog(_hedgehog_once):
    """The Linear(hedgehog) model with its feature maps back at their initial values
    (one capture for the whole file: capturing is the slow part)."""
    fast, init = _hedgehog_once
    fast.attnopt_params.load_state_dict(init)
    return fast


def _run(optimized, **kwargs):
    args = dict(steps=8, lr=1e-2, batch_size=BATCH, seq_len=SEQ, progress=False, eval_sequences=4)
    args.update(kwargs)
    return distill(optimized, _tokens(), **args)


def _variant_state(optimized) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in optimized.attnopt_params.state_dict().items()}


# -- data ---------------------------------------------------------------------------------


def test_pack_tokens_stride_and_targets():
    w = pack_tokens(torch.arange(11), 5)
    assert w.tolist() == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10]]
    assert pack_tokens(torch.arange(5), 5).shape == (0, 6)


def test_prepare_data_split_and_order():
    d = prepare_data(torch.arange(1001) % 200, seq_len=10, heldout_fraction=0.1)
    assert d.train.shape == (90, 11) and d.heldout.shape == (10, 11)
    # The held-out windows are the last ones, disjoint from the training windows.
    assert d.heldout[0, 0] == d.train[-1, -1]
    # Batches are a pure function of the step; an epoch visits every row once.
    rows = torch.cat([d.batch_indices(s, 9, seed=3) for s in range(10)])
    assert sorted(rows.tolist()) == list(range(90))
    assert torch.equal(d.batch_indices(4, 9, seed=3), d.batch_indices(4, 9, seed=3))
    assert not torch.equal(d.batch_indices(0, 9, seed=3), d.batch_indices(0, 9, seed=4))


def test_prepare_data_text_files_are_bytes(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(bytes(range(256)))
    (tmp_path / ".hidden").write_text("skipped")
    d = prepare_data(tmp_path, seq_len=16, heldout_fraction=0.2)
    stream = torch.cat([d.train[:, :-1].reshape(-1), d.heldout[:, :-1].reshape(-1)])
    assert stream[:6].tolist() == list(b"x = 1\n")
    assert b"skipped" not in bytes(stream.tolist())
    one = prepare_data(tmp_path / "a.py", seq_len=16, heldout_fraction=0.0)
    assert len(one.heldout) == 0 and len(one.train) == (300 + 2 - 1) // 16


def test_prepare_data_tokenizer_callable(tmp_path):
    (tmp_path / "t.txt").write_text("a b c " * 40)
    d = prepare_data(tmp_path / "t.txt", seq_len=8, tokenizer=lambda s: [ord(c) % 7 for c in s])
    assert int(d.train.max()) < 7


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        (torch.empty(0, dtype=torch.long), {}, "holds no tokens"),
        (torch.arange(20), {"seq_len": 32}, "too few"),
        (torch.rand(100), {}, "must be integer"),
        (torch.arange(300), {"vocab_size": 256}, r"\[0, 256\)"),
        (torch.arange(300), {"heldout_fraction": 1.0}, "heldout_fraction"),
        (torch.arange(300), {"seq_len": 0}, "seq_len"),
    ],
    ids=["empty", "too-short", "float-ids", "out-of-vocab", "heldout-1", "seq-len-0"],
)
def test_prepare_data_errors(data, kwargs, match):
    args = {"seq_len": 8, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_data(data, **args)


def test_empty_text_directory(tmp_path):
    with pytest.raises(ValueError, match="holds no tokens"):
        prepare_data(tmp_path, seq_len=8)


# -- stage 1: attention transfer ------------------------------------------------------------


def test_attention_transfer_linear_hedgehog(model, hedgehog):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    variant_before = _variant_state(hedgehog)
    report = _run(hedgehog, steps=6, lr=2e-2)
    assert isinstance(report, DistillReport) and report.steps == {"attention": 6}
    losses = report.losses["attention"]
    assert sum(losses[-2:]) < sum(losses[:2])
    for site in report.sites:
        assert site.trained and site.error_after < site.error_before, site
    # Only the variant parameters moved; the model's weights are bitwise untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    after = _variant_state(hedgehog)
    assert all(not torch.equal(after[k], variant_before[k]) for k in after)
    assert report.perplexity_original == pytest.approx(report.perplexity_before, rel=1e-2)
    text = str(report)
    assert "model.layers.0.self_attn" in text and "attn error after" in text
    assert '"perplexity_after"' in report.to_json()


def test_attention_transfer_hybrid(model):
    cfg = attnopt.Hybrid(window=8, sinks=2, feature_map="hedgehog", mixing=True)
    fast = attnopt.optimize(model, cfg, measure=False)
    report = _run(fast, steps=3, lr=2e-2, batch_size=2, eval_sequences=2)
    for site in report.sites:
        assert site.error_after < site.error_before, site
    mix = [v for k, v in fast.attnopt_params.state_dict().items() if k.endswith("mix_logit")]
    assert mix and all(bool((m != 0).any()) for m in mix)


def test_attention_ce_adds_hedgehog_loss(hedgehog):
    from attnopt.distill.transfer import SiteStudent, hedgehog_attention_ce, teacher_captures

    sites = dict(hedgehog.attnopt_params.items())
    owners = {id(p): k for k, m in sites.items() for p in m.parameters()}
    caps = teacher_captures(hedgehog, _tokens(2 * SEQ).reshape(2, SEQ), owners)
    assert sorted(caps) == sorted(sites)
    ce = hedgehog_attention_ce(caps[next(iter(sites))][0])
    assert math.isfinite(float(ce)) and float(ce) > 0
    plain, with_ce = SiteStudent(sites)(caps), SiteStudent(sites, attention_ce=1.0)(caps)
    assert float(with_ce) > float(plain)
    with_ce.backward()
    assert all(p.grad is not None for m in sites.values() for p in m.parameters())
    hedgehog.attnopt_params.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "config",
    [attnopt.SlidingWindow(window=8), attnopt.Linear(feature_map="elu")],
    ids=["sliding-window", "linear-elu"],
)
def test_not_distillable_names_the_fix(model, config):
    fast = attnopt.optimize(model, config, measure=False)
    with pytest.raises(ValueError, match="feature_map='hedgehog'"):
        _run(fast)


def test_argument_errors(model, hedgehog):
    with pytest.raises(ValueError, match="stage must be one of"):
        _run(hedgehog, stage="all")
    with pytest.raises(ValueError, match="lr must be"):
        _run(hedgehog, lr=0)
    with pytest.raises(ValueError, match="finetune_loss"):
        _run(hedgehog, stage="finetune", finetune_loss="mse")
    with pytest.raises(ValueError, match="batch_size"):
        _run(hedgehog, batch_size=0)
    with pytest.raises(TypeError, match="OptimizedModule"):
        distill(model, _tokens(), steps=1, seq_len=SEQ)
    with pytest.raises(ValueError, match="holds no tokens"):
        distill(hedgehog, torch.empty(0, dtype=torch.long), steps=1, seq_len=SEQ)


# -- stage 2: LoRA fine-tuning ----------------------------------------------------------------


def test_finetune_merges_lora_into_attention_projections(model):
    import copy

    user_model = copy.deepcopy(model)
    cfg = attnopt.Linear(feature_map="hedgehog")
    fast = attnopt.optimize(user_model, cfg, measure=False)
    base = {k: v.clone() for k, v in user_model.state_dict().items()}
    report = _run(fast, stage="both", steps=1, finetune_steps=2, finetune_lr=1e-2, eval_sequences=2)
    assert report.steps == {"attention": 1, "finetune": 2}
    assert len(report.losses["finetune"]) == 2
    assert all(math.isfinite(x) for x in report.losses["finetune"])
    # The model given to optimize() keeps every weight; the optimized model wraps a copy.
    assert all(torch.equal(v, base[k]) for k, v in user_model.state_dict().items())
    assert fast.original is not user_model
    # The adapters were merged into the attention projections, and only there.
    merged = fast.original.state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, base[k])}
    assert changed and all(".self_attn." in k and k.endswith("proj.weight") for k in changed)
    assert not any("lora" in n for n, _ in fast.named_parameters())
    # Unchanged weights are still shared, not copied.
    unchanged = next(k for k in merged if k not in changed and k.endswith("weight"))
    assert merged[unchanged].data_ptr() == user_model.state_dict()[unchanged].data_ptr()
    # The optimized model computes the merged model: same as optimizing it afresh.
    fresh = attnopt.optimize(fast.original, cfg, measure=False)
    fresh.attnopt_params.load_state_dict(fast.attnopt_params.state_dict())
    ids = _tokens(2 * SEQ).reshape(2, SEQ)
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        before = attnopt.optimize(user_model, cfg, measure=False)
        before.attnopt_params.load_state_dict(fast.attnopt_params.state_dict())
        c = before(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # the merged weights are what the graph runs
    assert math.isfinite(report.perplexity_after)


def test_replace_parameters_repoints_graphs_and_rejects_unknown_names(model):
    import copy

    user_model = copy.deepcopy(model)
    fast = attnopt.optimize(user_model, attnopt.Linear(), measure=False)
    ids = _tokens(2 * SEQ).reshape(2, SEQ)
    name = next(n for n, _ in user_model.named_parameters() if n.endswith("q_proj.weight"))
    old = dict(user_model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        out_before = fast(input_ids=ids).logits
        fast._replace_parameters({name: torch.randn_like(old)})
        out_after = fast(input_ids=ids).logits
    assert torch.equal(dict(user_model.named_parameters())[name], old)
    assert not torch.allclose(out_before, out_after)
    # The same as a model optimized from the new weights.
    again = attnopt.optimize(fast.original, attnopt.Linear(), measure=False)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, out_after)
    with pytest.raises(KeyError, match="no parameters named"):
        fast._replace_parameters({"not.a.parameter": old})


# -- resume after a real kill -------------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {repo!r})  # the repo root: `tests.test_distill` imports as a package
    import attnopt
    from attnopt.distill import distill
    from tests.test_distill import _tokens
    torch.set_num_threads(int(os.environ["THREADS"]))
    model = attnopt.zoo.tiny_model("tiny-llama")
    fast = attnopt.optimize(model, attnopt.Linear(feature_map="hedgehog"), measure=False)
    delay = float(os.environ.get("STEP_DELAY", "0"))
    distill(fast, _tokens(), steps=int(os.environ["STEPS"]), lr=1e-2, batch_size=4, seq_len=32,
            checkpoint_dir=os.environ.get("CKPT") or None, checkpoint_every=2, progress=False,
            eval_sequences=2, callback=lambda *a: time.sleep(delay))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(fast.attnopt_params.state_dict(), sys.argv[1])
    """
)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "run_distill.py"
    path.write_text(_SCRIPT.format(repo=str(REPO)))
    return path


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_resume_after_kill_matches_uninterrupted(tmp_path, hedgehog):
    init = _variant_state(hedgehog)
    steps = 8
    ckpt = tmp_path / "ckpt"
    threads = torch.get_num_threads()
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path)), str(tmp_path / "unused.pt")],
        env=_env(THREADS=threads, STEPS=steps, CKPT=ckpt, STEP_DELAY=0.5),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    step = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (ckpt / CHECKPOINT_NAME).exists():
                step = torch.load(ckpt / CHECKPOINT_NAME, weights_only=False)["step"]
                if step >= 4:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = torch.load(ckpt / CHECKPOINT_NAME, weights_only=False)["step"]
    assert 4 <= killed_at < steps

    torch.set_num_threads(threads)
    kw = dict(steps=steps, checkpoint_dir=str(ckpt), checkpoint_every=2, eval_sequences=2)
    report = _run(hedgehog, **kw)
    assert report.resumed_from == ("attention", killed_at)
    assert len(report.losses["attention"]) == steps
    resumed = _variant_state(hedgehog)
    hedgehog.attnopt_params.load_state_dict(init)
    _run(hedgehog, steps=steps, eval_sequences=2)
    straight = _variant_state(hedgehog)
    for k in resumed:
        assert torch.equal(resumed[k], straight[k]), (k, (resumed[k] - straight[k]).abs().max())
    # Resuming a finished run trains nothing more and gives the same parameters.
    hedgehog.attnopt_params.load_state_dict(init)
    report = _run(hedgehog, **kw)
    assert report.resumed_from == ("attention", steps)
    assert all(torch.equal(v, resumed[k]) for k, v in _variant_state(hedgehog).items())


def test_resume_refuses_other_settings(tmp_path, hedgehog):
    _run(hedgehog, steps=1, checkpoint_dir=str(tmp_path), eval_sequences=2)
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 1"):
        _run(hedgehog, steps=1, seed=1, checkpoint_dir=str(tmp_path), eval_sequences=2)


# -- data parallel --------------------------------------------------------------------------


def test_two_process_ddp_matches_single_process(tmp_path, hedgehog):
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(_script(tmp_path)),
        str(out),
    ]
    res = subprocess.run(
        cmd, env=_env(THREADS=1, STEPS=4, OMP_NUM_THREADS=1), capture_output=True, timeout=240
    )
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    ddp = torch.load(out, weights_only=True)
    _run(hedgehog, steps=4, eval_sequences=2)
    for k, v in _variant_state(hedgehog).items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)


# -- command line -----------------------------------------------------------------------------


def test_cli_distill_subcommand(tmp_path, monkeypatch, capsys):
    import argparse

    from attnopt.distill import cli

    saved = {}
    monkeypatch.setattr(cli, "_saver", lambda: lambda m, out: saved.update(model=m, out=out))
    parser = argparse.ArgumentParser(prog="attnopt")
    cli.add_distill_command(parser.add_subparsers(dest="command"))
    data = tmp_path / "corpus.txt"
    data.write_bytes(bytes(_tokens(3000).to(torch.uint8).tolist()))
    args = parser.parse_args(
        ["distill", "tiny-llama", "--variant", "hybrid", "--window", "8", "--sinks", "2",
         "--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len", str(SEQ),
         "--eval-sequences", "2", "--no-progress", "-o", str(tmp_path / "out")]
    )  # fmt: skip
    assert args.func(args) == 0
    assert saved["out"] == tmp_path / "out"
    assert isinstance(saved["model"], attnopt.OptimizedModule)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn" in out and "attn error before" in out
