"""Approximation quality on a trained model: held-out perplexity of each variant.

Random weights make attention meaningless, so this uses the byte-level model trained
by ``examples/train_tiny_lm.py`` on the Python standard library, evaluated on its
held-out files at context 512. Each variant is applied training-free (no
distillation) to every attention site with ``attnopt.optimize``; the table gives
held-out perplexity per byte and each variant's attention cost relative to dense
causal attention at that context (the fraction of query-key score entries computed,
or "state" for linear attention's d×d running state).

    python examples/train_tiny_lm.py --out runs/tiny-lm
    python benchmarks/quality.py --model runs/tiny-lm
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_tiny_lm import CONTEXT, heldout_batches, load_corpus, perplexity  # noqa: E402

import attnopt  # noqa: E402


def _variant(module: str, name: str, **kwargs):
    """A config from a variant folder, or None where that variant is not installed."""
    try:
        return getattr(importlib.import_module(f"attnopt.kernels.{module}"), name)(**kwargs)
    except (ImportError, AttributeError):
        return None


def _window_cost(n: int, window: int, sinks: int = 0) -> float:
    dense = n * (n + 1) / 2
    kept = sum(min(i + 1, window + min(sinks, max(0, i + 1 - window))) for i in range(n))
    return kept / dense


def _block_cost(n: int, block: int, topk: int) -> float:
    blocks = -(-n // block)
    dense = blocks * (blocks + 1) / 2
    return sum(min(i + 1, topk) for i in range(blocks)) / dense


def candidates(n: int) -> list[tuple[str, object, str]]:
    """(label, config, attention cost) rows, at roughly a quarter of dense cost."""
    rows = [
        ("Dense (exact)", attnopt.Dense(), "1.00"),
        ("SlidingWindow(64, sinks=4)", attnopt.SlidingWindow(64, sinks=4), None),
        ("SlidingWindow(128, sinks=4)", attnopt.SlidingWindow(128, sinks=4), None),
    ]
    for label, cfg, cost in (
        (
            "BlockSparse(64, topk=2)",
            _variant("block_sparse", "BlockSparse", block=64, topk=2),
            f"{_block_cost(n, 64, 2):.2f}",
        ),
        (
            "BlockSparse(64, topk=3)",
            _variant("block_sparse", "BlockSparse", block=64, topk=3),
            f"{_block_cost(n, 64, 3):.2f}",
        ),
        ("Linear(elu)", _variant("linear", "Linear", feature_map="elu"), "state"),
        (
            "Linear(hedgehog, untrained)",
            _variant("linear", "Linear", feature_map="hedgehog"),
            "state",
        ),
        (
            "Hybrid(window=64, sinks=4)",
            _variant("hybrid", "Hybrid", window=64, sinks=4),
            f"{_window_cost(n, 64, 4):.2f} + state",
        ),
    ):
        if cfg is not None:
            rows.append((label, cfg, cost))
    out = []
    for label, cfg, cost in rows:
        if cost is None:
            cost = f"{_window_cost(n, cfg.window, cfg.sinks):.2f}"
        out.append((label, cfg, cost))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/tiny-lm"))
    parser.add_argument("--windows", type=int, default=64, help="held-out sequences")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        parser.error(f"no checkpoint at {args.model}: run examples/train_tiny_lm.py first")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    _, heldout = load_corpus()
    windows = heldout_batches(heldout, args.windows)
    base = perplexity(model, windows)
    example = {
        "input_ids": windows[:2, :-1],
        "attention_mask": torch.ones_like(windows[:2, :-1]),
    }
    lines = [
        f"held-out perplexity per byte, context {CONTEXT}, {args.windows} sequences",
        "",
        "| attention | cost vs dense | perplexity | vs original |",
        "|---|---:|---:|---:|",
        f"| original (SDPA) | 1.00 | {base:.3f} | +0.0% |",
    ]
    for label, cfg, cost in candidates(CONTEXT):
        t0 = time.perf_counter()
        optimized = attnopt.optimize(model, cfg, example, measure=False)
        applied = len(optimized.report.applied)
        ppl = perplexity(optimized, windows)
        note = "" if applied == len(optimized.report) else f" ({applied} sites)"
        lines.append(f"| {label}{note} | {cost} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")
        print(f"{label}: {ppl:.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
