"""The ``linear`` variant: softmax attention replaced by normalised linear attention.

``exp(q·k·scale)`` becomes ``φ(q)·φ(k)`` for a feature map φ, so the keys can be
summed into a ``[F, Dv]`` state once: bidirectional attention costs O(N·d²) instead of
O(N²·d), and causal attention runs chunk by chunk (Lightning Attention-2) in
O(N·(C·d + d²)) with a constant-size state, optionally decaying per head
(RetNet/TransNormer). It is an approximation of the original attention, not a
rewrite that keeps the numbers: training-free with the fixed maps (elu, relu,
Performer random features), or distilled with the learnable Hedgehog map whose
weights live on the optimized model.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, ParamRef, Variant, register_variant
from attnopt.kernels.linear import op as _op  # noqa: F401  (registers attnopt::linear_attention)
from attnopt.kernels.linear.chunked import linear_attention_chunked
from attnopt.kernels.linear.feature_maps import (
    FEATURE_MAPS,
    FeatureMapParameters,
    check_feature_map_args,
    feature_map_refs,
    site_seed,
)
from attnopt.kernels.linear.reference import check_decay, linear_attention_reference
from attnopt.site import AttentionSite, MaskKind

__all__ = [
    "FEATURE_MAPS",
    "FeatureMapParameters",
    "Linear",
    "linear_attention_chunked",
    "linear_attention_reference",
]


@register_config
@dataclasses.dataclass(frozen=True)
class Linear(AttentionConfig):
    """Normalised linear attention with a choice of feature map.

    Query ``i`` (at key position ``p = i + M − N``) outputs
    ``Σ_j a_ij v_j / (Σ_j a_ij + eps)`` with ``a_ij = φ(q_i)·φ(k_j)·λ^(p−j)`` over the
    keys it sees (causal sites: ``j <= p``; padding keys never). ``λ`` is the decay
    (1 without), i.e. the state recurrence ``S_t = λ·S_(t−1) + φ(k_t) v_tᵀ``, applied
    to the normaliser too; it counts positions, padding included.

    Args:
        feature_map: ``"elu"`` (``elu(x)+1``), ``"relu"``, ``"softmax_rf"`` (Performer
            FAVOR+ positive random features with a fixed orthogonal Gaussian
            projection drawn per site and stored as a buffer on the optimized model)
            or ``"hedgehog"`` (learnable per-head maps, identity-initialised
            parameters on the optimized model). See
            :mod:`attnopt.kernels.linear.feature_maps`.
        chunk: positions per chunk of the causal kernel (speed/memory only).
        decay: ``None``, one ``λ`` in (0, 1] for every head, or a tuple with one per
            query head. Causal sites only (bidirectional sites are refused).
        num_features: random features ``m`` of softmax_rf (default ``2·head_dim``) or
            features per half of hedgehog (default ``head_dim``); None for elu/relu.
        eps: added to every normaliser (keeps rows whose keys are all hidden, or
            relu rows orthogonal to every key, at 0 instead of NaN).

    Example:
        >>> Linear("elu", decay=0.99).describe()
        'Linear(decay=0.99)'
    """

    variant = "linear"

    feature_map: str = "elu"
    chunk: int = 64
    decay: float | tuple[float, ...] | None = None
    num_features: int | None = None
    eps: float = 1e-6

    def validate(self) -> None:
        check_feature_map_args("Linear", self.feature_map, self.num_features)
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"Linear: chunk must be a positive int, got {self.chunk!r}")
        check_decay("Linear", self.decay)
        eps = self.eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):
            raise ValueError(f"Linear: eps must be a positive finite number, got {eps!r}")


def decay_arg(decay: float | tuple[float, ...] | None) -> list[float] | None:
    if decay is None:
        return None
    return [float(x) for x in (decay if isinstance(decay, tuple) else (decay,))]


def feature_map_reason(config, site: AttentionSite, what: str) -> str | None:
    """Why ``site`` cannot get ``config``'s feature map / per-head settings, or None."""
    if config.feature_map == "hedgehog" and (site.num_heads is None or site.num_kv_heads is None):
        return (
            f"{what} with hedgehog feature maps needs the site's head counts (per-head "
            f"weights), but heads were not recovered; site left as dense attention"
        )
    return None


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    assert isinstance(config, Linear)
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"linear attention cannot honour an additive position bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if config.decay is not None and not site.causal:
        return (
            "decay is defined for causal attention only, but this site is bidirectional; "
            "site left as dense attention"
        )
    per_head = isinstance(config.decay, tuple) and len(config.decay) != 1
    if per_head and site.num_heads != len(config.decay):
        return (
            f"decay has {len(config.decay)} values (one per head) but the site has "
            f"{site.num_heads} heads; site left as dense attention"
        )
    return feature_map_reason(config, site, "linear attention")


def _parameters(config: AttentionConfig, site: AttentionSite) -> torch.nn.Module:
    return FeatureMapParameters(
        config.feature_map,
        heads=site.num_heads,
        kv_heads=site.num_kv_heads,
        head_dim=site.head_dim,
        num_features=config.num_features,
        seed=site_seed(site.name),
    )


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, Linear)
    return OpCall(
        torch.ops.attnopt.linear_attention.default,
        (
            float(site.scale),
            site.causal,
            config.feature_map,
            config.chunk,
            decay_arg(config.decay),
            float(config.eps),
            *feature_map_refs(config.feature_map, ParamRef),
        ),
    )


register_variant(
    Variant(
        Linear,
        supports=_supports,
        build=_build,
        accepts_bias=False,
        parameters=_parameters,
    )
)
