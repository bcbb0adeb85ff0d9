"""Decode speed at a long context: original model vs sliding window vs linear attention.

Model: a random-weight Llama-style causal LM (width 256, 4 layers, 4 query heads and 2
kv heads of dim 64, MLP 688, vocab 1024), fp32, CPU, default torch thread count. Each
row runs ``generate()`` (greedy, batch 1) on a ``--context``-token prompt (default
8192) for ``--new`` tokens and times the decode steps only: a streamer records the
time each new token arrives, and the rate is measured from the first generated token
(the end of the prefill) to the last. Rows:

* ``original``: the transformers model itself (SDPA, ``DynamicCache``: every step
  attends and appends to the whole context);
* ``sliding window 256``: ``attnopt.optimize(model, SlidingWindow(256, sinks=4))`` (a
  260-key cache per layer);
* ``linear (elu)``: ``attnopt.optimize(model, Linear("elu"))`` (a 64×64 state per kv
  head).

The cache column is what the layers hold after the last step (``DynamicCache``:
keys and values; attnopt: :meth:`attnopt.cache.AttnoptCache.nbytes`).

Run: ``python benchmarks/bench_decode.py --context 8192 --new 64 [--threads 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import attnopt  # noqa: E402


class _Clock(BaseStreamer):
    """Records when each generated token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _model(context: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context + 1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _run(model, ids, new: int) -> tuple[float, int]:
    clock = _Clock()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
        return_dict_in_generate=True,
    )
    steps = len(clock.times) - 1
    rate = steps / (clock.times[-1] - clock.times[0])
    cache = getattr(out, "cache", None) or out.past_key_values
    return rate, _cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens generated (timed)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args.context)
    ids = torch.randint(1, 1024, (1, args.context), generator=torch.Generator().manual_seed(0))
    rows = [("original", model)]
    rows.append(
        ("sliding window 256", attnopt.optimize(model, attnopt.SlidingWindow(256, sinks=4)))
    )
    rows.append(("linear (elu)", attnopt.optimize(model, attnopt.Linear("elu"))))
    results = []
    with torch.no_grad():
        for name, m in rows:
            _run(m, ids[:, :256], 4)  # warm-up: library start-up, first-call costs
            rate, nbytes = _run(m, ids, args.new)
            results.append((name, rate, nbytes))
    base = results[0][1]
    print(
        f"decode at {args.context} context, {args.new} new tokens, batch 1, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'model':<20} {'tokens/s':>9} {'speedup':>8} {'cache MiB':>10}")
    for name, rate, nbytes in results:
        print(f"{name:<20} {rate:>9.1f} {rate / base:>7.2f}x {nbytes / 2**20:>10.2f}")


if __name__ == "__main__":
    main()
