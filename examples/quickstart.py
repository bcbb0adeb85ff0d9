"""Quick start: rewrite a tiny Llama's attention into a sliding window and see what moved.

Runs anywhere attnopt is installed, with no downloads: the model is built from a
config with random weights.

    python examples/quickstart.py
"""

import torch

import attnopt

model = attnopt.zoo.tiny_model("tiny-llama")  # 2 layers, 4 heads, 2 kv heads

for site in attnopt.find_attention(model):
    print(
        f"found {site.name}: {site.num_heads} heads / {site.num_kv_heads} kv heads, "
        f"head dim {site.head_dim}, mask {site.mask}"
    )

# Every site becomes a causal sliding window of 8 keys plus 2 always-visible sinks.
optimized = attnopt.optimize(model, attnopt.SlidingWindow(window=8, sinks=2))
print(optimized.report)

# Called exactly like the original, at any length.
ids = torch.randint(0, model.config.vocab_size, (2, 100))
mask = torch.ones_like(ids)
with torch.no_grad():
    original = model(input_ids=ids, attention_mask=mask).logits
    approx = optimized(input_ids=ids, attention_mask=mask).logits
    exact = attnopt.optimize(model, attnopt.SlidingWindow(window=4096))(
        input_ids=ids, attention_mask=mask
    ).logits
print(f"window 8:    max |optimized - original| = {(approx - original).abs().max():.3e}")
print(f"window 4096: max |optimized - original| = {(exact - original).abs().max():.3e}")
