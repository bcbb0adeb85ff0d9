"""Distill linear and hybrid attention into the tiny byte-level LM: before/after table.

Uses the model trained by ``examples/train_tiny_lm.py`` and its data (the Python
standard library: training files for distillation, the held-out files at context
512 for perplexity, as in ``benchmarks/quality.py``). For each variant it prints the
held-out perplexity per byte of the original model, of the variant untrained, after
stage 1 (attention transfer) and, for linear attention, after stage 2 (LoRA).

    python examples/train_tiny_lm.py --out runs/tiny-lm
    python examples/distill_tiny_lm.py --model runs/tiny-lm

Targets (issue 6): Hybrid(window=64, sinks=4) after stage 1 within 5% of the original;
Linear(hedgehog) after both stages within 15%; stage 1 in at most 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_lm import CONTEXT, heldout_batches, load_corpus  # noqa: E402

import attnopt  # noqa: E402
from attnopt.distill import PackedData, distill, pack_tokens  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/tiny-lm"))
    parser.add_argument("--windows", type=int, default=64, help="held-out sequences")
    parser.add_argument("--steps", type=int, default=300, help="stage 1 steps")
    parser.add_argument("--finetune-steps", type=int, default=900, help="stage 2 steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument(
        "--finetune-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 2 also trains the Hedgehog feature maps (default: on)",
    )
    parser.add_argument("--variants", default="hybrid,linear", help="comma-separated")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable runs")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        parser.error(f"no checkpoint at {args.model}: run examples/train_tiny_lm.py first")
    from transformers import AutoModelForCausalLM

    train, heldout = load_corpus()
    data = PackedData(
        train=pack_tokens(train.long(), CONTEXT),
        heldout=heldout_batches(heldout, args.windows),
        seq_len=CONTEXT,
    )
    common = dict(
        batch_size=args.batch_size,
        seq_len=CONTEXT,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        eval_sequences=args.windows,
    )
    configs = {
        "hybrid": (
            "Hybrid(window=64, sinks=4, hedgehog, mixing)",
            "attention",
            attnopt.Hybrid(window=64, sinks=4, feature_map="hedgehog", mixing=True),
        ),
        "linear": ("Linear(hedgehog)", "both", attnopt.Linear(feature_map="hedgehog")),
    }
    rows = []
    original = None
    for name in args.variants.split(","):
        label, stage, cfg = configs[name]
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        optimized = attnopt.optimize(model, cfg, measure=False)
        ckpt = str(args.checkpoint_dir / f"{name}-stage1") if args.checkpoint_dir else None
        t0 = time.perf_counter()
        r1 = distill(
            optimized, data, stage="attention", steps=args.steps, checkpoint_dir=ckpt, **common
        )
        t1 = time.perf_counter() - t0
        print(r1, file=sys.stderr)
        original = r1.perplexity_original
        rows.append((label, "untrained", r1.perplexity_before, None))
        rows.append((label, f"stage 1 ({args.steps} steps)", r1.perplexity_after, t1))
        if stage == "both":
            ckpt = str(args.checkpoint_dir / f"{name}-stage2") if args.checkpoint_dir else None
            t0 = time.perf_counter()
            r2 = distill(
                optimized,
                data,
                stage="finetune",
                steps=args.finetune_steps,
                checkpoint_dir=ckpt,
                lora_rank=args.lora_rank,
                finetune_attention=args.finetune_attention,
                **common,
            )
            print(r2, file=sys.stderr)
            rows.append(
                (
                    label,
                    f"+ stage 2 ({args.finetune_steps} steps, LoRA rank {args.lora_rank}"
                    + (" + feature maps)" if args.finetune_attention else ")"),
                    r2.perplexity_after,
                    time.perf_counter() - t0,
                )
            )
    lines = [
        f"held-out perplexity per byte, context {CONTEXT}, {args.windows} sequences, "
        f"{torch.get_num_threads()} threads",
        "",
        "| attention | training | perplexity | vs original | time |",
        "|---|---|---:|---:|---:|",
        f"| original (SDPA) | - | {original:.3f} | +0.0% | - |",
    ]
    for label, what, ppl, secs in rows:
        t = "-" if secs is None else f"{secs:.0f}s"
        lines.append(f"| {label} | {what} | {ppl:.3f} | {100 * (ppl / original - 1):+.1f}% | {t} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
