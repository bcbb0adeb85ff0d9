"""ONNX prefill latency in onnxruntime (CPU): exact attention vs sliding window.

Model: a Llama-style decoder built from ``transformers.LlamaConfig`` with random
weights: width 256, 4 layers, 4 query heads / 2 key-value heads (head dim 64), MLP
1024, vocabulary 1024 (small, so the logits do not dominate). Two files are exported
with :func:`attnopt.exporters.onnx.export_onnx` (each verified against PyTorch on
short inputs, fp32, dynamic batch and sequence):

* ``original``: every site as ``Dense()``, i.e. exact causal attention through
  MatMul/Softmax (same model, same export path: only the attention differs);
* ``sliding_window``: every site as ``SlidingWindow(window=256)``, blocked attention.

Time: one onnxruntime session per file (CPUExecutionProvider, default threads),
batch 1, ``input_ids`` and an all-ones ``attention_mask`` of length N; one warm-up
run, then the fastest of ``--repeats`` runs (on a shared machine other processes
inflate some runs; the minimum is the steadier statistic). The ratio is
original / sliding_window.

Measured on the shared 2-core CPU development machine (other jobs running, so the
numbers move by ±30% from run to run), opset 20, onnxruntime 1.32:

     N   original ms   sliding ms   ratio
  1024         446.5        341.7   1.31x
  4096        3525.7       1012.5   3.48x
  8192       10616.6       2212.3   4.80x

Run: ``python benchmarks/bench_onnx.py --seq-lens 1024 4096 8192 --repeats 3``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Measure the checkout this script lives in, not whichever attnopt is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(max_len: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(max_len, 2048),
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def export(model, config, path: str) -> float:
    import attnopt
    from attnopt.exporters.onnx import export_onnx

    t0 = time.perf_counter()
    optimized = attnopt.optimize(model, config, measure=False)
    report = export_onnx(optimized, path, verify=True)
    print(report, file=sys.stderr)
    return time.perf_counter() - t0


def time_session(path: str, n: int, repeats: int) -> float:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 1024, size=(1, n), dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
    }
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out-dir", default=None, help="keep the .onnx files here")
    args = parser.parse_args(argv)

    import attnopt

    model = build_model(max(args.seq_lens))
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="attnopt-bench-onnx-")
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "original": (attnopt.Dense(), os.path.join(out_dir, "llama_dense.onnx")),
        "sliding_window": (
            attnopt.SlidingWindow(window=args.window),
            os.path.join(out_dir, "llama_sliding_window.onnx"),
        ),
    }
    for name, (config, path) in files.items():
        seconds = export(model, config, path)
        print(f"exported {name} to {path} in {seconds:.0f} s", file=sys.stderr)

    print(
        f"onnxruntime CPU prefill, batch 1, Llama-style 256 wide x 4 layers, window {args.window}"
    )
    print(f"{'N':>6}  {'original ms':>12}  {'sliding ms':>11}  {'ratio':>6}")
    for n in args.seq_lens:
        ms = {}
        for name, (_, path) in files.items():
            try:
                ms[name] = time_session(path, n, args.repeats)
            except Exception as e:  # e.g. out of memory for the dense file at long N
                print(f"{name} at N={n} failed: {type(e).__name__}: {e}", file=sys.stderr)
                ms[name] = float("nan")
        ratio = ms["original"] / ms["sliding_window"]
        print(
            f"{n:>6}  {ms['original']:>12.1f}  {ms['sliding_window']:>11.1f}  {ratio:>5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
