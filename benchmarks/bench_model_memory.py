"""Peak memory of one forward of a rewritten transformers model: is there an N×N mask?

Problem: ``tiny-llama`` from the zoo, ``attnopt.optimize(model, Linear())``, one
sequence of N random token ids whose first 7 positions are left padding, fp32, 1
thread. Each row runs in its own subprocess: one short warm-up call, then the peak
growth of resident memory (``ru_maxrss``) during one forward at N, logits included.
The table also counts graph nodes whose value ends in ``[s, s]`` (an N×N tensor).

Since the rewrite reads key padding from ``attention_mask`` itself, the
``[B, 1, N, N]`` mask transformers builds is gone from the graph; before that change
(commit 3f2f6a1) the same rows were 130 MiB at N = 8192 and 2057 MiB at N = 32768.

Run: ``python benchmarks/bench_model_memory.py --seq-lens 8192 32768``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, warnings
import torch
import attnopt
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
n = int(sys.argv[1])
model = attnopt.zoo.tiny_model("tiny-llama")
fast = attnopt.optimize(model, attnopt.Linear(), measure=False)
square = sum(
    1
    for gm in fast.graphs
    for node in gm.graph.nodes
    if isinstance(v := node.meta.get("val"), torch.Tensor) and v.dim() >= 2
    and isinstance(v.shape[-1], torch.SymInt) and str(v.shape[-1]) == str(v.shape[-2])
)
ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[0, :7] = 0
with torch.no_grad():
    fast(input_ids=ids[:, :64], attention_mask=mask[:, :64])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = fast(input_ids=ids, attention_mask=mask).logits
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak": (after - before) / 1024, "logits": logits.numel() * 4 / 2**20,
                  "square": square}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    args = parser.parse_args(argv)
    print("| N | peak growth (MiB) | of which logits (MiB) | N×N graph nodes |")
    print("|---:|---:|---:|---:|")
    for n in args.seq_lens:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {n} | {row['peak']:.0f} | {row['logits']:.0f} | {row['square']} |")


if __name__ == "__main__":
    main()
