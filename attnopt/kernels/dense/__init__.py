"""The ``dense`` variant: exact attention behind the attnopt op boundary.

It changes no numbers. Rewriting a model with ``Dense()`` tests the plumbing
(discovery, rewrite, export) in isolation from any approximation, and gives every
site one canonical op even where the model spelled attention by hand.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, Variant, register_variant
from attnopt.kernels.dense import op as _op  # noqa: F401  (registers attnopt::dense_attention)
from attnopt.kernels.dense.reference import dense_attention_reference
from attnopt.site import AttentionSite

__all__ = ["Dense", "dense_attention_reference"]


@register_config
@dataclasses.dataclass(frozen=True)
class Dense(AttentionConfig):
    """Exact softmax attention, any mask or bias; the identity rewrite.

    Example:
        >>> Dense().to_dict()
        {'variant': 'dense', 'version': 1}
    """

    variant = "dense"


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    return None


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    return OpCall(torch.ops.attnopt.dense_attention.default, (float(site.scale), site.causal))


register_variant(Variant(Dense, supports=_supports, build=_build, accepts_bias=True))
