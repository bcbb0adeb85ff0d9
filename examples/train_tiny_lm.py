"""Train a small Llama-style byte-level language model on the Python standard library.

Random weights make attention meaningless, so approximation quality must be judged on
a trained model. With no model hub and no datasets on our machines, the training
text is one found on every machine: the ``.py`` files of the standard library of the
Python running this script. Files are split into train and held-out sets by a hash
of their path, so the split is the same everywhere.

The model: 4 layers, width 256, 4 heads of 64, byte vocabulary (256), context 512.
About 10 minutes on 2 CPU cores with the defaults.

    python examples/train_tiny_lm.py --out runs/tiny-lm
    python benchmarks/quality.py --model runs/tiny-lm

The output directory holds the transformers checkpoint (``save_pretrained``,
safetensors) and ``training.json`` (settings, losses, held-out perplexity).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

CONTEXT = 512


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.parts)]
    return sorted(files)


def is_heldout(path: Path, fraction: float = 0.05) -> bool:
    digest = hashlib.sha256(str(path.name).encode()).digest()
    return digest[0] / 256 < fraction


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) as uint8 tensors."""
    train, heldout = bytearray(), bytearray()
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (heldout if is_heldout(path) else train).extend(data + b"\n\n")
    return (
        torch.frombuffer(train, dtype=torch.uint8).clone(),
        torch.frombuffer(heldout, dtype=torch.uint8).clone(),
    )


def heldout_batches(heldout: torch.Tensor, count: int, context: int = CONTEXT) -> torch.Tensor:
    """``count`` evenly spaced held-out windows of ``context + 1`` bytes, [count, context+1]."""
    starts = torch.linspace(0, len(heldout) - context - 2, count).long()
    return torch.stack([heldout[s : s + context + 1] for s in starts]).long()


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Held-out perplexity (per byte) of ``model`` on ``windows`` [count, context+1]."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += targets.numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-lm"))
    parser.add_argument("--minutes", type=float, default=9.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")

    torch.manual_seed(args.seed)
    train, heldout = load_corpus()
    windows = heldout_batches(heldout, 64)
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95)
    )
    budget = args.minutes * 60
    warmup = 50
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(
        total=int(budget),
        unit="s",
        desc="training",
        bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}",
    )
    step = 0
    while step < args.max_steps and time.perf_counter() - start < budget:
        elapsed = time.perf_counter() - start
        # Linear warm-up, then cosine decay over the time budget.
        progress = min(1.0, elapsed / budget)
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - CONTEXT - 2, (args.batch_size,), generator=gen)
        batch = torch.stack([train[s : s + CONTEXT + 1] for s in starts]).long()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        step += 1
        bar.n = min(int(time.perf_counter() - start), int(budget))
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    ppl = perplexity(model, windows)
    info = {
        "parameters": params,
        "steps": step,
        "tokens": step * args.batch_size * CONTEXT,
        "seconds": round(time.perf_counter() - start, 1),
        "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "heldout_perplexity": ppl,
        "heldout_bytes": len(heldout),
        "train_bytes": len(train),
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    # Atomic: write next to the destination, then rename.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-lm-", dir=args.out.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        json.dumps({k: info[k] for k in ("parameters", "steps", "seconds", "heldout_perplexity")})
    )


if __name__ == "__main__":
    main()
