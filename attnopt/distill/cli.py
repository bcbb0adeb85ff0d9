"""``attnopt distill``: optimize a model, distill its new attention, save the result.

    attnopt distill runs/tiny-lm --variant hybrid --data corpus/ --steps 300 -o runs/hybrid
    torchrun --nproc_per_node 2 -m attnopt.distill.cli runs/tiny-lm --variant linear ...

The subcommand is registered on the main ``attnopt`` parser by
:func:`add_distill_command`; ``python -m attnopt.distill.cli`` runs it on its own.
The output is written with :func:`attnopt.checkpoint.save` (loadable with
``attnopt.load``), imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_distill_command", "build_config", "main", "run_distill"]


def add_distill_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill`` to an ``argparse`` subparsers object; its handler is
    ``args.func`` (:func:`run_distill`, returning the exit status)."""
    p = subparsers.add_parser(
        "distill",
        help="train linear/hybrid attention to imitate a model's softmax attention",
        description=(
            "Rewrite MODEL's attention into a linear or hybrid variant, distill it "
            "(stage 1: attention transfer; stage 2: LoRA fine-tuning) and save the result."
        ),
    )
    _add_arguments(p)
    p.set_defaults(func=run_distill)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a transformers checkpoint or a zoo name")
    p.add_argument("--variant", choices=["linear", "hybrid"], required=True)
    p.add_argument("--feature-map", default="hedgehog", help="linear part's map (hedgehog)")
    p.add_argument("--num-features", type=int, default=None)
    p.add_argument("--window", type=int, default=64, help="hybrid: softmax window")
    p.add_argument("--sinks", type=int, default=4, help="hybrid: sink keys")
    p.add_argument(
        "--no-mixing", action="store_true", help="hybrid: no learned per-head softmax/linear gate"
    )
    p.add_argument("--data", required=True, help="text file, directory of them, or .pt ids")
    p.add_argument("--tokenizer", default="auto", help="auto (MODEL's, else bytes), bytes, PATH")
    p.add_argument("--stage", choices=["attention", "finetune", "both"], default="attention")
    p.add_argument("--steps", type=int, required=True, help="stage 1 steps")
    p.add_argument("--finetune-steps", type=int, default=None, help="stage 2 (default --steps)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-loss", choices=["ce", "kl", "ce+kl"], default="ce+kl")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--finetune-attention",
        action="store_true",
        help="stage 2 also trains the variant's own parameters (feature maps, gates)",
    )
    p.add_argument("--attention-ce", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8, help="over all processes")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--checkpoint-dir", default=None, help="resume from / write latest.pt here")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--out", type=Path, required=True, help="where to save the result")


def build_config(args: argparse.Namespace):
    """The variant config the arguments describe."""
    import attnopt

    if args.variant == "linear":
        return attnopt.Linear(feature_map=args.feature_map, num_features=args.num_features)
    return attnopt.Hybrid(
        window=args.window,
        sinks=args.sinks,
        feature_map=args.feature_map,
        num_features=args.num_features,
        mixing=not args.no_mixing,
    )


def _load_model(name: str):
    import attnopt

    if name in attnopt.zoo.TINY_MODELS:
        return attnopt.zoo.tiny_model(name)
    if not Path(name).exists():
        raise SystemExit(
            f"attnopt distill: MODEL {name!r} is neither a directory nor a zoo model "
            f"({', '.join(sorted(attnopt.zoo.TINY_MODELS))})"
        )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name).eval()


def _tokenizer(spec: str, model_name: str):
    if spec == "bytes":
        return None
    source = model_name if spec == "auto" else spec
    if spec == "auto" and not (Path(model_name) / "tokenizer_config.json").exists():
        return None  # no tokenizer beside the checkpoint: bytes are the tokens
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _data(path: str):
    if path.endswith(".pt"):
        import torch

        return torch.load(path, weights_only=True)
    return path


def _saver():
    try:
        from attnopt.checkpoint import save
    except ImportError as e:
        raise SystemExit(
            "attnopt distill: saving needs attnopt.checkpoint.save, which this install lacks"
        ) from e
    return save


def run_distill(args: argparse.Namespace) -> int:
    """Handler of ``attnopt distill``; returns the exit status."""
    import torch

    import attnopt
    from attnopt.distill import distill

    save = _saver()  # before training, not after it
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    model = _load_model(args.model).to(device)
    optimized = attnopt.optimize(model, build_config(args))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(optimized.report, file=sys.stderr)
    report = distill(
        optimized,
        _data(args.data),
        stage=args.stage,
        steps=args.steps,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        finetune_loss=args.finetune_loss,
        lora_rank=args.lora_rank,
        finetune_attention=args.finetune_attention,
        attention_ce=args.attention_ce,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        heldout_fraction=args.heldout_fraction,
        eval_sequences=args.eval_sequences,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        tokenizer=_tokenizer(args.tokenizer, args.model),
        progress=not args.no_progress,
    )
    if rank0:
        print(report)
        if args.json is not None:
            args.json.write_text(report.to_json())
        save(optimized, args.out)
    return 0


def add_command(subparsers: Any) -> None:
    """``attnopt distill`` in the main CLI (:data:`attnopt.cli.COMMAND_MODULES`), whose
    handlers take ``(args, log)``."""
    p = add_distill_command(subparsers)
    p.set_defaults(handler=lambda args, log: run_distill(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt distill", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run_distill(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
