"""The ``hybrid`` variant: exact softmax over a sliding window, linear attention beyond.

Each query keeps softmax attention over its nearest ``window`` keys and a few sink
keys, where pretrained attention concentrates, and reaches every older key through a
linear-attention state, where a sliding window would see nothing. Both kinds of term
share one normaliser (LoLCATs, Zhang et al. 2024; Lizard), so the output is one
convex combination of values. Cost is O(N·(window + C)·d + N·d²) with a state of
constant size; ``window >= N`` is exactly softmax attention, and the linear part
(Hedgehog maps, mixing gate) is what distillation trains.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, ParamRef, Variant, register_variant
from attnopt.kernels._checks import check_window_args
from attnopt.kernels.hybrid import op as _op  # noqa: F401  (registers attnopt::hybrid_attention)
from attnopt.kernels.hybrid.blockwise import hybrid_attention_blockwise
from attnopt.kernels.hybrid.reference import hybrid_attention_reference
from attnopt.kernels.linear import feature_map_reason
from attnopt.kernels.linear.feature_maps import (
    FeatureMapParameters,
    check_feature_map_args,
    feature_map_refs,
    site_seed,
)
from attnopt.site import AttentionSite, MaskKind

__all__ = ["Hybrid", "hybrid_attention_blockwise", "hybrid_attention_reference"]


@register_config
@dataclasses.dataclass(frozen=True)
class Hybrid(AttentionConfig):
    """Sliding-window softmax attention plus linear attention over older keys.

    Query ``i`` sits at key position ``p = i + M − N`` (causal sites only). Window keys
    ``p − window < j <= p`` and sink keys ``j < sinks`` (``j <= p``) get
    ``g·exp(q·k·scale)``, older keys ``sinks <= j <= p − window`` get
    ``(1 − g)·φ(q)·φ(k)``, and the output is the weighted mean of their values under
    one shared normaliser. ``g = sigmoid(mix_logit_h)`` with ``mixing=True``
    (a learnable per-head parameter on the optimized model, initialised to 0, i.e.
    ``g = ½``); without mixing both weights are 1, which is the same as ``g = ½``.
    Padding keys are never used. ``window >= M`` is exactly softmax attention. The
    max-subtraction is done in log space over both kinds of term (see
    :mod:`attnopt.kernels.hybrid.reference`).

    Args:
        window: softmax keys per query, its own position included (``>= 1``).
        sinks: leading keys that always get softmax terms (``>= 0``).
        feature_map: the linear terms' map: ``"elu"``, ``"relu"``, ``"softmax_rf"`` or
            ``"hedgehog"`` (see :class:`~attnopt.kernels.linear.Linear`).
        chunk: query rows per block / positions per chunk (speed and memory only).
        num_features: as in :class:`~attnopt.kernels.linear.Linear`.
        mixing: learn a per-head weight between the softmax and the linear terms.

    Bidirectional sites are refused (the linear part here is a causal state; a
    bidirectional version needs a reverse scan as well) and so are
    cross-attention and additive biases.

    Example:
        >>> Hybrid(window=64, sinks=4, feature_map="hedgehog").describe()
        "Hybrid(feature_map='hedgehog')"
    """

    variant = "hybrid"

    window: int = 64
    sinks: int = 4
    feature_map: str = "elu"
    chunk: int = 64
    num_features: int | None = None
    mixing: bool = False

    def validate(self) -> None:
        check_window_args("Hybrid", self.window, self.sinks, 1)
        check_feature_map_args("Hybrid", self.feature_map, self.num_features)
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"Hybrid: chunk must be a positive int, got {self.chunk!r}")
        if not isinstance(self.mixing, bool):
            raise ValueError(f"Hybrid: mixing must be a bool, got {self.mixing!r}")


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    assert isinstance(config, Hybrid)
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"hybrid attention cannot honour an additive position bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if site.cross:
        return (
            "hybrid attention needs queries and keys from one sequence, but this is "
            "cross-attention; site left as dense attention"
        )
    if not site.causal:
        return (
            "hybrid attention is implemented for causal sites only (its linear part is a "
            "running state of older keys); this site is bidirectional; site left as dense "
            "attention"
        )
    if config.mixing and site.num_heads is None:
        return (
            "hybrid attention with mixing needs the site's head count (one weight per head), "
            "but heads were not recovered; site left as dense attention"
        )
    return feature_map_reason(config, site, "hybrid attention")


def _parameters(config: AttentionConfig, site: AttentionSite) -> torch.nn.Module:
    return FeatureMapParameters(
        config.feature_map,
        heads=site.num_heads,
        kv_heads=site.num_kv_heads,
        head_dim=site.head_dim,
        num_features=config.num_features,
        seed=site_seed(site.name),
        mixing=config.mixing,
    )


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, Hybrid)
    return OpCall(
        torch.ops.attnopt.hybrid_attention.default,
        (
            float(site.scale),
            site.causal,
            config.window,
            config.sinks,
            config.feature_map,
            config.chunk,
            *feature_map_refs(config.feature_map, ParamRef),
            ParamRef("mix_logit") if config.mixing else None,
        ),
    )


register_variant(
    Variant(
        Hybrid,
        supports=_supports,
        build=_build,
        accepts_bias=False,
        parameters=_parameters,
    )
)
