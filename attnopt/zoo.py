"""Tiny random-weight transformers models built from configs, for trying attnopt and
for tests without any download (there is no model hub on many machines).

>>> from attnopt.zoo import tiny_model
>>> model = tiny_model("tiny-llama")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TINY_MODELS", "tiny_model"]


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dev installs have it
        raise ImportError(
            "the built-in tiny models need transformers: pip install 'attnopt[hf]'"
        ) from e
    return transformers


_DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _llama(t, impl):
    return t.LlamaForCausalLM(t.LlamaConfig(**_DECODER, attn_implementation=impl))


def _mistral(t, impl):
    # sliding_window=None: the model's own window would otherwise change the mask class
    # only past 4096 tokens, which small example inputs never show.
    cfg = t.MistralConfig(**_DECODER, sliding_window=None, attn_implementation=impl)
    return t.MistralForCausalLM(cfg)


def _qwen2(t, impl):
    cfg = t.Qwen2Config(**_DECODER, use_sliding_window=False, attn_implementation=impl)
    return t.Qwen2ForCausalLM(cfg)


def _gpt2(t, impl):
    cfg = t.GPT2Config(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=impl,
    )
    return t.GPT2LMHeadModel(cfg)


def _bert(t, impl):
    cfg = t.BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=1024,
        attn_implementation=impl,
    )
    return t.BertModel(cfg, add_pooling_layer=False)


def _vit(t, impl):
    cfg = t.ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation=impl,
    )
    return t.ViTModel(cfg, add_pooling_layer=False)


def _t5(t, impl):
    cfg = t.T5Config(
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        attn_implementation=impl,
    )
    return t.T5ForConditionalGeneration(cfg)


TINY_MODELS: dict[str, Callable[[Any, str], nn.Module]] = {
    "tiny-llama": _llama,
    "tiny-mistral": _mistral,
    "tiny-qwen2": _qwen2,
    "tiny-gpt2": _gpt2,
    "tiny-bert": _bert,
    "tiny-vit": _vit,
    "tiny-t5": _t5,
}


def tiny_model(name: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A tiny random-weight transformers model in eval mode.

    Args:
        name: one of :data:`TINY_MODELS` (``tiny-llama``, ``tiny-bert``, ``tiny-vit``, ...).
        attn_implementation: ``"sdpa"`` or ``"eager"``: which attention code the model runs.
        seed: weights are drawn from this seed.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {sorted(TINY_MODELS)}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
        )
    t = _require_transformers()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TINY_MODELS[name](t, attn_implementation)
    return model.eval()
