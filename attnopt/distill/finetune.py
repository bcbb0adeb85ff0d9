"""Stage 2, fine-tuning: LoRA adapters on the attention projections, merged at the end.

After attention transfer the student's layers still see inputs a little off the
teacher's, and the errors add up through depth; low-rank adapters on the projections
feeding and leaving each rewritten attention (q/k/v/o), trained end to end on
next-token loss and/or KL to the teacher's logits, close most of that gap (LoLCATs,
Lizard). The adapters come from ``peft``.

Why a copy and a second ``optimize``: the optimized model runs a graph captured with
``torch.export`` from the original modules, so adapters injected into those modules
afterwards would never run. Instead the original model is copied, ``peft`` injects
the adapters into the copy, the copy is optimized with the same per-site configs
(the trained variant parameters are copied over), and the student trains there. At
the end the adapters are merged (``merge_and_unload``) and the optimized model gets the
merged weights as new tensors (its graphs re-pointed to them,
``OptimizedModule._replace_parameters``): it becomes the fine-tuned student, while the
model given to ``optimize`` keeps its weights and stays the teacher.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["LoraStudent", "attention_projections", "logits_of", "lm_losses"]

FINETUNE_LOSSES = ("ce", "kl", "ce+kl")


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output (``.logits``, the first element, or the tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(out).__name__}: distill needs a "
        f"language model returning .logits, a tuple starting with logits, or a tensor"
    )


def lm_losses(
    logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, kind: str
) -> torch.Tensor:
    """Next-token cross-entropy and/or ``KL(teacher ‖ student)`` per token (both means)."""
    vocab = logits.shape[-1]
    flat = logits.float().reshape(-1, vocab)
    loss = flat.new_zeros(())
    if "ce" in kind.split("+"):
        loss = loss + torch.nn.functional.cross_entropy(flat, targets.reshape(-1))
    if "kl" in kind.split("+"):
        t = torch.log_softmax(teacher.float().reshape(-1, vocab), dim=-1)
        s = torch.log_softmax(flat, dim=-1)
        loss = loss + torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return loss


def attention_projections(model: nn.Module, site_names: list[str]) -> list[str]:
    """Full names of the linear layers inside each attention site's module."""
    names = []
    modules = dict(model.named_modules())
    for site in site_names:
        owner = modules.get(site)
        if owner is None:
            continue
        for sub, mod in owner.named_modules():
            if sub and (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
                names.append(f"{site}.{sub}")
    return names


class LoraStudent:
    """A copy of ``optimized``'s model with LoRA adapters, optimized like it.

    Args:
        optimized: an :class:`~attnopt.api.OptimizedModule` (not modified until
            :meth:`merge_into`, and the model it wraps never).
        rank, alpha: LoRA rank and scaling numerator (``alpha / rank`` scales the update).
        train_attention: also train the variant parameters (default: frozen).
    """

    def __init__(
        self, optimized: nn.Module, *, rank: int, alpha: float, train_attention: bool = False
    ) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:  # pragma: no cover - peft is in the distill extra
            raise ImportError("stage='finetune' needs peft: pip install 'attnopt[distill]'") from e
        import attnopt

        original = optimized.original
        sites = [r.name for r in optimized.report.applied]
        targets = attention_projections(original, sites)
        if not targets:
            raise ValueError(
                f"stage='finetune': found no linear projections inside the rewritten attention "
                f"modules {sites}; LoRA has nothing to adapt (use stage='attention')"
            )
        base = copy.deepcopy(original)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none"
        )
        self.peft_model = get_peft_model(base, config)
        self.base = base
        args, kwargs = optimized.example_inputs
        example = kwargs if kwargs and not args else (args if not kwargs else None)
        self.module = attnopt.optimize(
            base,
            optimized.attention_config,
            example,
            layers=optimized.layer_selector,
            measure=False,
        )
        self.module.attnopt_params.load_state_dict(optimized.attnopt_params.state_dict())
        for p in self.module.attnopt_params.parameters():
            p.requires_grad_(train_attention)
        self.train_attention = train_attention

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        if set(params) != set(state):
            raise ValueError(
                f"checkpoint adapters do not match this model: expected {sorted(params)}, "
                f"got {sorted(state)}; resume with the same settings (lora_rank, variant)"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def merge_into(self, optimized: nn.Module) -> None:
        """Merge the adapters and give ``optimized`` the merged weights: new tensors for
        the changed parameters, so the model given to ``optimize`` keeps its own."""
        merged = self.peft_model.merge_and_unload()
        src = dict(merged.named_parameters())
        with torch.no_grad():
            changed = {
                name: src[name]
                for name, p in optimized.original.named_parameters()
                if name in src and not torch.equal(p, src[name])
            }
            optimized._replace_parameters(changed)
            if self.train_attention:
                optimized.attnopt_params.load_state_dict(self.module.attnopt_params.state_dict())
