"""``distill``: train an optimized model's new attention to imitate the original.

One verb for both stages of the LoLCATs/Lizard recipe: attention transfer (stage 1,
per site, only the variants' parameters) and LoRA fine-tuning (stage 2, end to end).
The same code runs in one process or under ``torchrun`` (data parallel), and resumes
from its checkpoint to the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from attnopt.distill.checkpointing import load_checkpoint, restore_rng, rng_state, save_checkpoint
from attnopt.distill.data import DataSource, PackedData, prepare_data
from attnopt.distill.distributed import World, world
from attnopt.distill.finetune import FINETUNE_LOSSES, LoraStudent, lm_losses, logits_of
from attnopt.distill.report import DistillReport, SiteDistill
from attnopt.distill.teacher import TeacherMode
from attnopt.distill.transfer import SiteStudent, teacher_captures
from attnopt.passes.rewrite_attention import site_module_key

__all__ = ["STAGES", "distill"]

STAGES = ("attention", "finetune", "both")

Callback = Callable[[str, int, float], None]


# -- checks ---------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _trainable_sites(optimized: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``{site_key: parameter module}`` of applied sites with trainable tensors, and
    ``{site_key: site name}``."""
    report = getattr(optimized, "report", None)
    params = getattr(optimized, "attnopt_params", None)
    if report is None or params is None:
        raise TypeError(
            f"optimized must be the OptimizedModule returned by attnopt.optimize, got "
            f"{type(optimized).__name__}"
        )
    sites, names = {}, {}
    modules = dict(params.items())
    for result in report.applied:
        key = site_module_key(result.name)
        names[key] = result.name
        module = modules.get(key)
        if module is not None and any(True for _ in module.parameters()):
            sites[key] = module
    return sites, names


def _no_trainable_error(optimized: nn.Module) -> ValueError:
    applied = optimized.report.applied
    if not applied:
        return ValueError(
            "optimized has no rewritten attention site (see optimized.report): nothing to distill"
        )
    variants = sorted({r.variant for r in applied})
    return ValueError(
        f"stage='attention' trains the variants' own parameters, but the rewritten sites use "
        f"{variants}, which have none to train; optimize with a distillable variant, e.g. "
        f"attnopt.Linear(feature_map='hedgehog') or attnopt.Hybrid(window=64, sinks=4, "
        f"feature_map='hedgehog', mixing=True), or use stage='finetune' (LoRA) only"
    )


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


# -- evaluation -----------------------------------------------------------------------------


def _eval_chunks(n: int, batch_size: int) -> list[slice]:
    # Never a batch of one: the captured graphs are specialised away from batch size 1.
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@torch.no_grad()
def _evaluate(
    optimized: nn.Module,
    heldout: torch.Tensor,
    owners: dict[int, str],
    batch_size: int,
    *,
    original: bool,
) -> dict[str, Any]:
    """Perplexity of the student (and of the teacher if ``original``) on ``heldout``
    ``[m, N + 1]``, and each trained site's relative L2 attention error."""
    if len(heldout) == 0:
        return {"ppl": None, "ppl_original": None, "errors": {}}
    device = _device_of(optimized)
    nll = nll_t = 0.0
    count = 0
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for sl in _eval_chunks(len(heldout), batch_size):
        chunk = heldout[sl].to(device)
        ids, targets = chunk[:, :-1], chunk[:, 1:]
        mask = torch.ones_like(ids)
        with TeacherMode(owners) as mode:
            teacher = logits_of(optimized(input_ids=ids, attention_mask=mask))
        for key, caps in mode.captures.items():
            for cap in caps:
                out = cap.student().float()
                num[key] = num.get(key, 0.0) + float((out - cap.target.float()).square().sum())
                den[key] = den.get(key, 0.0) + float(cap.target.float().square().sum())
        del mode
        student = logits_of(optimized(input_ids=ids, attention_mask=mask))
        flat = targets.reshape(-1)
        nll += float(lm_losses(student, targets, None, "ce")) * flat.numel()
        if original:
            nll_t += float(lm_losses(teacher, targets, None, "ce")) * flat.numel()
        count += flat.numel()
    errors = {k: math.sqrt(num[k] / max(den[k], 1e-30)) for k in num}
    return {
        "ppl": math.exp(nll / count),
        "ppl_original": math.exp(nll_t / count) if original else None,
        "errors": errors,
    }


# -- the training loop ------------------------------------------------------------------------


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%: a pure function of the step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(
    stage: str,
    *,
    steps: int,
    start: int,
    lr: float,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    packed: PackedData,
    batch_size: int,
    seed: int,
    w: World,
    progress: bool,
    callback: Callback | None,
    save: Callable[[int, list[float]], None] | None,
    checkpoint_every: int,
    losses: list[float],
) -> None:
    warmup = min(max(1, steps // 10), 50)
    device = params[0].device if params else torch.device("cpu")
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"distill {stage}",
        disable=not (progress and w.main),
        dynamic_ncols=True,
    )
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            rows = w.shard(packed.batch_indices(step, batch_size, seed))
            loss = step_loss(packed.train[rows].to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(stage, step + 1, value)
            if save is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save(step + 1, losses)
    finally:
        bar.close()


# -- the verb -----------------------------------------------------------------------------------


def distill(
    optimized: nn.Module,
    data: DataSource | PackedData,
    *,
    stage: str = "attention",
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 8,
    seq_len: int = 512,
    finetune_steps: int | None = None,
    finetune_lr: float = 1e-3,
    finetune_loss: str = "ce+kl",
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    finetune_attention: bool = False,
    attention_ce: float = 0.0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 50,
    seed: int = 0,
    tokenizer: Any = None,
    heldout_fraction: float = 0.05,
    eval_sequences: int = 32,
    eval_batch_size: int | None = None,
    progress: bool = True,
    callback: Callback | None = None,
) -> DistillReport:
    """Train ``optimized``'s new attention to imitate the original model's, in place.

    Args:
        optimized: the :class:`~attnopt.api.OptimizedModule` of a language model (its
            output has ``.logits``), from :func:`attnopt.optimize` with a distillable
            variant (``Linear(feature_map="hedgehog")``, ``Hybrid(...,
            feature_map="hedgehog", mixing=True)``).
        data: a text file, a directory of text files, a tensor of token ids, a list of
            those, or a :class:`~attnopt.distill.data.PackedData`.
        stage: ``"attention"`` (stage 1: only the variants' parameters, per site,
            against exact softmax attention on the same inputs), ``"finetune"``
            (stage 2: LoRA adapters on the attention projections, merged into the
            model's weights at the end) or ``"both"`` (1 then 2). The merged weights
            are new tensors of ``optimized``: the model given to ``optimize`` keeps
            its own. The KL teacher is ``optimized`` with exact attention (its own
            weights), so a later stage-2 run on it distils against the fine-tuned
            weights.
        steps, lr: optimizer steps and peak learning rate (AdamW, warm-up then cosine)
            of stage 1.
        batch_size: sequences per step, over all processes (divisible by their number).
        seq_len: tokens per sequence.
        finetune_steps, finetune_lr: the same for stage 2 (``finetune_steps`` defaults
            to ``steps``).
        finetune_loss: ``"ce"`` (next token), ``"kl"`` (to the teacher's logits) or
            ``"ce+kl"``.
        lora_rank, lora_alpha: LoRA rank and alpha (default ``2 × rank``).
        finetune_attention: also train the variants' parameters in stage 2.
        attention_ce: weight of Hedgehog's attention-weight cross-entropy in stage 1
            (linear sites with hedgehog maps; materialises ``[B, H, N, N]``).
        checkpoint_dir: write ``latest.pt`` there every ``checkpoint_every`` steps and
            at the end of each stage; if one is there, resume from it (it must come
            from a run with the same settings).
        seed: data order, and torch's global RNG is seeded with it (LoRA init); with
            the same seed a resumed run ends with the same parameters as an
            uninterrupted one.
        tokenizer: for text data: ``None`` (bytes are the tokens), a transformers
            tokenizer, or ``str -> list[int]``.
        heldout_fraction: the last windows of the data kept for evaluation.
        eval_sequences: held-out sequences evaluated (evenly spaced).
        eval_batch_size: default ``batch_size``.
        progress: a tqdm bar with the loss (rank 0 only).
        callback: called as ``callback(stage, step, loss)`` after every step.

    Returns:
        A :class:`~attnopt.distill.report.DistillReport`: per-site attention error and
        held-out perplexity (original, before, after), steps, losses and time.

    Under ``torchrun`` every process runs this same call; each takes its slice of
    every batch and ``DistributedDataParallel`` averages the gradients (gloo on CPU,
    nccl on GPU; the model must already be on this process's device). Rank 0 writes
    the checkpoints.

    Example:
        >>> import attnopt, torch
        >>> model = attnopt.zoo.tiny_model("tiny-llama")
        >>> fast = attnopt.optimize(model, attnopt.Linear(feature_map="hedgehog"))
        >>> ids = torch.randint(0, 256, (4000,))
        >>> r = distill(fast, ids, steps=5, batch_size=4, seq_len=64, progress=False)
        >>> r.steps
        {'attention': 5}
    """
    started = time.perf_counter()
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    stages = ["attention", "finetune"] if stage == "both" else [stage]
    finetune_steps = steps if finetune_steps is None else finetune_steps
    _check_positive_int("steps", steps, 0)
    _check_positive_int("finetune_steps", finetune_steps, 0)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("checkpoint_every", checkpoint_every)
    _check_positive_int("lora_rank", lora_rank)
    _check_positive_int("eval_sequences", eval_sequences, 0)
    _check_positive_float("lr", lr)
    _check_positive_float("finetune_lr", finetune_lr)
    if finetune_loss not in FINETUNE_LOSSES:
        raise ValueError(
            f"finetune_loss must be one of {list(FINETUNE_LOSSES)}, got {finetune_loss!r}"
        )
    if not isinstance(attention_ce, (int, float)) or attention_ce < 0:
        raise ValueError(f"attention_ce must be a number >= 0, got {attention_ce!r}")
    lora_alpha = 2.0 * lora_rank if lora_alpha is None else lora_alpha
    eval_batch_size = eval_batch_size or max(2, batch_size)

    sites, names = _trainable_sites(optimized)
    if "attention" in stages and not sites:
        raise _no_trainable_error(optimized)
    if not optimized.report.applied:
        raise _no_trainable_error(optimized)
    vocab = getattr(getattr(optimized, "config", None), "vocab_size", None)
    packed = prepare_data(
        data,
        seq_len=seq_len,
        tokenizer=tokenizer,
        heldout_fraction=heldout_fraction,
        vocab_size=vocab,
        max_heldout=eval_sequences,
    )
    owners = {id(p): key for key, module in sites.items() for p in module.parameters()}
    w = world()
    w.shard(torch.arange(batch_size))  # fail early on an indivisible batch size
    fingerprint = {
        "stages": stages,
        "steps": steps,
        "finetune_steps": finetune_steps if "finetune" in stages else None,
        "lr": lr,
        "finetune_lr": finetune_lr if "finetune" in stages else None,
        "finetune_loss": finetune_loss if "finetune" in stages else None,
        "lora": (lora_rank, lora_alpha, finetune_attention) if "finetune" in stages else None,
        "attention_ce": attention_ce,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "world_size": w.size,
        "sites": sorted(names.values()),
        "variants": sorted({r.variant for r in optimized.report.applied}),
        "data": packed.to_dict(),
    }
    # Only the parameters' values are saved and restored (the graphs hold the tensors).
    site_params = optimized.attnopt_params
    try:
        ckpt = load_checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
        if ckpt is not None:
            site_params.load_state_dict(ckpt["site_params"])
            restore_rng(ckpt["rng"])
            before = ckpt["before"]
        else:
            torch.manual_seed(seed)
            before = _evaluate(optimized, packed.heldout, owners, eval_batch_size, original=True)
        all_losses: dict[str, list[float]] = {
            s: list(ckpt["losses"].get(s, [])) if ckpt else [] for s in stages
        }
        done: dict[str, int] = {s: 0 for s in stages}
        if ckpt is not None:
            for s in stages[: stages.index(ckpt["stage"])]:
                done[s] = steps if s == "attention" else finetune_steps
            done[ckpt["stage"]] = ckpt["step"]

        def make_save(stage_name: str, extra: Callable[[], dict]) -> Callable | None:
            if not checkpoint_dir:
                return None

            def save(step: int, losses: list[float]) -> None:
                if w.main:
                    state = {
                        "fingerprint": fingerprint,
                        "stage": stage_name,
                        "step": step,
                        "site_params": site_params.state_dict(),
                        "rng": rng_state(),
                        "before": before,
                        "losses": {**all_losses, stage_name: list(losses)},
                        **extra(),
                    }
                    save_checkpoint(checkpoint_dir, state)
                w.barrier()

            return save

        common = dict(
            packed=packed,
            batch_size=batch_size,
            seed=seed,
            w=w,
            progress=progress,
            callback=callback,
            checkpoint_every=checkpoint_every,
        )
        if "attention" in stages and done["attention"] < steps:
            student = SiteStudent(sites, attention_ce=float(attention_ce))
            params = [p for p in student.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            if ckpt is not None and ckpt["stage"] == "attention":
                optimizer.load_state_dict(ckpt["optimizer"])
            model = w.wrap(student)

            def transfer_loss(batch: torch.Tensor) -> torch.Tensor:
                return model(teacher_captures(optimized, batch[:, :-1], owners))

            _train(
                "attention",
                steps=steps,
                start=done["attention"],
                lr=lr,
                params=params,
                optimizer=optimizer,
                step_loss=transfer_loss,
                save=make_save("attention", lambda: {"optimizer": optimizer.state_dict()}),
                losses=all_losses["attention"],
                **common,
            )
        if "finetune" in stages:
            lora = LoraStudent(
                optimized, rank=lora_rank, alpha=lora_alpha, train_attention=finetune_attention
            )
            if done["finetune"] < finetune_steps:
                trainable = lora.trainable()
                params = list(trainable.values())
                optimizer = torch.optim.AdamW(params, lr=finetune_lr, weight_decay=0.0)
                if ckpt is not None and ckpt["stage"] == "finetune":
                    lora.load_state(ckpt["lora"])
                    optimizer.load_state_dict(ckpt["optimizer"])
                model = w.wrap(lora.module)

                def finetune_step(batch: torch.Tensor) -> torch.Tensor:
                    ids, targets = batch[:, :-1], batch[:, 1:]
                    mask = torch.ones_like(ids)
                    teacher = None
                    if "kl" in finetune_loss:
                        with torch.no_grad(), TeacherMode({}, record=False):
                            teacher = logits_of(optimized(input_ids=ids, attention_mask=mask))
                    logits = logits_of(model(input_ids=ids, attention_mask=mask))
                    return lm_losses(logits, targets, teacher, finetune_loss)

                _train(
                    "finetune",
                    steps=finetune_steps,
                    start=done["finetune"],
                    lr=finetune_lr,
                    params=params,
                    optimizer=optimizer,
                    step_loss=finetune_step,
                    save=make_save(
                        "finetune",
                        lambda: {"optimizer": optimizer.state_dict(), "lora": lora.state()},
                    ),
                    losses=all_losses["finetune"],
                    **common,
                )
            elif ckpt is not None and ckpt["stage"] == "finetune":
                lora.load_state(ckpt["lora"])
            lora.merge_into(optimized)
        after = _evaluate(optimized, packed.heldout, owners, eval_batch_size, original=False)
    finally:
        w.close()

    site_rows = []
    for key, name in names.items():
        result = optimized.report[name]
        site_rows.append(
            SiteDistill(
                name=name,
                variant=result.variant,
                trained=key in sites and "attention" in stages,
                error_before=before["errors"].get(key),
                error_after=after["errors"].get(key),
            )
        )
    return DistillReport(
        stages=stages,
        sites=site_rows,
        perplexity_original=before["ppl_original"],
        perplexity_before=before["ppl"],
        perplexity_after=after["ppl"],
        steps={s: (steps if s == "attention" else finetune_steps) for s in stages},
        losses=all_losses,
        seconds=time.perf_counter() - started,
        resumed_from=(ckpt["stage"], ckpt["step"]) if ckpt is not None else None,
        world_size=w.size,
        data=packed.to_dict(),
    )
