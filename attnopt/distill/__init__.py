"""Distillation: train linear and hybrid attention to imitate a pretrained model's softmax.

Linear and hybrid attention keep a pretrained model's quality only once their new
parameters (Hedgehog feature maps, mixing gates) have learned to imitate the
attention they replace. :func:`distill` does it in the two stages of LoLCATs and
Lizard: per-site attention transfer against exact softmax attention on the same
inputs, then LoRA fine-tuning (``peft``) of the attention projections. Resumable from
atomic checkpoints and data-parallel under ``torchrun``.

>>> import attnopt, torch
>>> from attnopt.distill import distill
>>> model = attnopt.zoo.tiny_model("tiny-llama")
>>> fast = attnopt.optimize(model, attnopt.Linear(feature_map="hedgehog"))
>>> report = distill(fast, torch.randint(0, 256, (4000,)), steps=5, batch_size=4, seq_len=64,
...                  progress=False)
>>> print(report)  # doctest: +SKIP
"""

from attnopt.distill.api import STAGES, distill
from attnopt.distill.data import PackedData, pack_tokens, prepare_data
from attnopt.distill.report import DistillReport, SiteDistill

__all__ = [
    "STAGES",
    "DistillReport",
    "PackedData",
    "SiteDistill",
    "distill",
    "pack_tokens",
    "prepare_data",
]
