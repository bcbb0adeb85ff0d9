"""Agent attention on CPU: adaptive average pooling plus two SDPA calls, O(N·n).

The agents are the queries average-pooled to ``n`` tokens (``adaptive_avg_pool``
over the grid, or over the sequence). Agent aggregation ``V_A = softmax(A·Kᵀ)·V``
is one SDPA call with ``n`` queries against ``N`` keys; agent broadcast
``O = softmax(Q·Aᵀ)·V_A`` is one SDPA call with ``N`` queries against ``n`` keys.
Both run in PyTorch's fused CPU attention kernel, so the extra memory is a few
``[n, D]`` tensors and the kernel's own blocks: no ``[N, N]`` and no ``[N, n]``
tensor is kept.

Grouped-query attention needs no repeated keys: the agents of the ``H / Hkv`` query
heads sharing a key/value head are stacked as ``R·n`` queries of that head.

Padding: a padded token's query is left out of its agent's mean (the pooled
numerator and denominator both carry the 0/1 weight) and its key out of the
aggregation (boolean SDPA mask). SDPA returns NaN for a query that sees no key, so
such rows (an agent of all-padding, a head whose keys are all padding) are given
every key and zeroed afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.agent.reference import agent_grid, check_agent_args, check_agent_sequence
from attnopt.kernels.dense.reference import compute_dtype

__all__ = ["agent_attention_pooled", "pool_agents"]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pool_agents(
    q: torch.Tensor, weights: torch.Tensor | None, num_agents: int, grid: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Agents ``[B, H, n, D]`` (compute dtype) and ``present [B, H, n]`` (``None`` when
    every agent has tokens for sure, i.e. no weights); same semantics as
    :func:`~attnopt.kernels.agent.reference.pool_agents_reference`."""
    ct = compute_dtype(q.dtype)
    B, H, N, D = q.shape
    cells = math.prod(grid) if grid else N
    sides = agent_grid(num_agents, len(grid)) if grid else (num_agents,)
    lengths = tuple(grid) if grid else (N,)
    x = q[:, :, N - cells :].to(ct)  # [B, H, P, D]
    if weights is not None:
        w = weights.to(ct)[..., N - cells :].expand(B, H, cells).unsqueeze(-1)  # [B, H, P, 1]
        x = torch.cat([x * w, w], dim=-1)  # the weight rides along as one more channel
    C = x.shape[-1]
    # Channels last: [B*H, *grid, C] viewed as [B*H, C, *grid] without a copy.
    rank = len(lengths)
    x = x.reshape(B * H, *lengths, C).permute(0, rank + 1, *range(1, rank + 1))
    pooled = _POOL[rank](x, sides)  # [B*H, C, *sides]
    pooled = pooled.reshape(B, H, C, num_agents).transpose(-1, -2)  # [B, H, n, C]
    if weights is None:
        return pooled, None
    total = pooled[..., D]
    present = total > 0
    agents = pooled[..., :D] / torch.where(present, total, torch.ones_like(total))[..., None]
    return agents, present


def _attend(q, k, v, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA with a boolean ``visible`` mask broadcastable to ``[.., Nq, Nk]``; rows that
    see no key return 0 (SDPA alone would return NaN)."""
    if visible is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty = ~visible.any(dim=-1, keepdim=True)  # [.., Nq|1, 1]
    if not bool(empty.any()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


def agent_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    num_agents: int,
    grid: Sequence[int],
    scale: float | None,
) -> torch.Tensor:
    """Agent attention from differentiable torch ops; inputs must already be checked."""
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    R = H // Hkv
    ct = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.numel() == 0 or N == 0:
        return q.new_zeros(B, H, N, Dv)
    km = None
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))  # [Bm, Hm, N]
    weights = None if km is None else km.expand(B, H, N)
    agents, present = pool_agents(q, weights, num_agents, tuple(grid))  # [B, H, n, D]
    n = agents.shape[2]

    # Aggregation: the agents of one kv head's R query heads as R·n queries of it.
    agg_q = agents.reshape(B, Hkv, R * n, D)
    visible = None
    if km is not None:
        if km.shape[1] == 1:
            visible = km.unsqueeze(-2)  # [Bm, 1, 1, N]
        else:  # per query head: rows of head h see that head's keys
            visible = km.expand(km.shape[0], H, N).reshape(-1, Hkv, R, 1, N)
            visible = visible.expand(-1, Hkv, R, n, N).reshape(-1, Hkv, R * n, N)
    agent_values = _attend(agg_q, k.to(ct), v.to(ct), visible, scale)
    agent_values = agent_values.reshape(B, H, n, Dv)

    # Broadcast: every query against the agents that hold a token.
    visible = None if present is None else present.unsqueeze(-2)  # [B, H, 1, n]
    out = _attend(q.to(ct), agents, agent_values, visible, scale)
    return out.to(q.dtype)


def agent_attention_pooled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    num_agents: int,
    grid: Sequence[int] = (),
    scale: float | None = None,
) -> torch.Tensor:
    """Agent attention in O(N·n) time and memory; differentiable.

    Same semantics as
    :func:`~attnopt.kernels.agent.reference.agent_attention_reference`.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, N]``; False tokens are padding.
        num_agents: ``n``; a perfect square (cube) with a 2-D (3-D) grid.
        grid: empty to pool the whole sequence, else the token grid after
            ``N - prod(grid)`` extra tokens.
        scale: multiplier of both score products; default ``1/sqrt(D)``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 64 * 64, 32) for _ in range(3))
        >>> agent_attention_pooled(q, k, v, num_agents=49, grid=(64, 64)).shape
        torch.Size([1, 2, 4096, 32])
    """
    caller = "agent_attention_pooled"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_agent_args(caller, num_agents, grid)
    check_agent_sequence(caller, shapes.q_len, shapes.kv_len, grid)
    return agent_forward(q, k, v, kv_mask, num_agents=num_agents, grid=tuple(grid), scale=scale)
