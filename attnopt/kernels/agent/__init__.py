"""The ``agent`` variant: softmax attention through a few pooled agent tokens.

Agent Attention (Han et al., 2024) puts ``n ≪ N`` agent tokens ``A`` between the
queries and the keys: the agents gather from the keys (``V_A = softmax(A·Kᵀ)·V``)
and broadcast to the queries (``O = softmax(Q·Aᵀ)·V_A``). Cost is O(N·n·d), linear
in ``N``; it is training-free on diffusion UNets/DiTs and two small SDPA calls, so
it exports cleanly. It is an approximation with no exact setting: use it where a
global, low-rank mixing of the sequence is acceptable (image generation, ViTs
after fine-tuning). The paper's trainable agent bias and depthwise-convolution
term are not included.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, Variant, register_variant
from attnopt.kernels.agent import op as _op  # noqa: F401  (registers the op)
from attnopt.kernels.agent.pooled_sdpa import agent_attention_pooled
from attnopt.kernels.agent.reference import agent_attention_reference, check_agent_args
from attnopt.site import AttentionSite, MaskKind

__all__ = ["Agent", "agent_attention_pooled", "agent_attention_reference"]


@register_config
@dataclasses.dataclass(frozen=True)
class Agent(AttentionConfig):
    """Agent attention with ``num_agents`` agents pooled from the queries.

    The agents are the mean of the queries over ``num_agents`` segments: over the
    site's token grid when it has one (adaptive average pooling of an ``(H, W)``
    grid to ``√n × √n``, of a ``(T, H, W)`` grid to ``∛n × ∛n × ∛n``; leading extra
    tokens such as CLS are not pooled), else over the whole sequence. With ``s``
    the site's scale: ``V_A = softmax(A·Kᵀ·s)·V`` and ``O = softmax(Q·Aᵀ·s)·V_A``.
    Padding tokens (``kv_mask`` False) are left out of the means and of the
    aggregation. Self-attention without a causal mask only.

    Args:
        num_agents: agent tokens ``n`` (default 49, a 7×7 agent grid); a perfect
            square for 2-D grids (a cube for 3-D).

    Example:
        >>> Agent(num_agents=16).to_dict()
        {'variant': 'agent', 'version': 1, 'num_agents': 16}
    """

    variant = "agent"

    num_agents: int = 49

    def validate(self) -> None:
        check_agent_args("Agent", self.num_agents, ())


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    assert isinstance(config, Agent)
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"agent attention cannot honour an additive bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if site.causal:
        return "agent attention is not causal; site left as dense attention"
    if site.cross:
        return (
            "agent attention pools its agents from the sequence it attends to, but this is "
            "cross-attention; site left as dense attention"
        )
    if site.grid is not None:
        try:
            check_agent_args("Agent", config.num_agents, site.grid)
        except ValueError as err:
            return f"{err}; site left as dense attention"
    return None


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, Agent)
    grid = list(site.grid) if site.grid is not None else []
    return OpCall(
        torch.ops.attnopt.agent_attention.default,
        (float(site.scale), config.num_agents, grid),
    )


register_variant(Variant(Agent, supports=_supports, build=_build, accepts_bias=False))
