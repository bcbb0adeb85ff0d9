"""Agent attention, written plainly: explicit pooling matrices and masked softmax.

The definition the SDPA-based path is checked against. Agent attention is already
O(N·n) for ``n`` agents, so nothing here is quadratic in ``N``; it is plain rather
than fast (explicit ``[n, N]`` pooling matrix, unfused softmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.dense.reference import compute_dtype, masked_attention

__all__ = [
    "agent_attention_reference",
    "agent_grid",
    "check_agent_args",
    "pool_agents_reference",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def agent_grid(num_agents: int, rank: int) -> tuple[int, ...] | None:
    """The agent grid ``(p,) * rank`` with ``p ** rank == num_agents``, or ``None`` when
    ``num_agents`` is not a perfect ``rank``-th power."""
    p = round(num_agents ** (1.0 / rank))
    for c in (p - 1, p, p + 1):
        if c >= 1 and c**rank == num_agents:
            return (c,) * rank
    return None


def check_agent_args(caller: str, num_agents: object, grid: Sequence[int]) -> None:
    """Check the agent count and the (possibly empty) token grid."""
    if not _is_int(num_agents) or num_agents < 1:
        raise ValueError(
            f"{caller}: num_agents must be a positive int (agent tokens pooled from the "
            f"queries), got {num_agents!r}"
        )
    grid = tuple(grid)
    if not grid:
        return
    if len(grid) > 3 or not all(_is_int(g) and g >= 1 for g in grid):
        raise ValueError(
            f"{caller}: grid must be empty (pool over the sequence) or 1 to 3 positive ints, "
            f"got {grid!r}"
        )
    if agent_grid(num_agents, len(grid)) is None:
        root = "square" if len(grid) == 2 else "cube" if len(grid) == 3 else "power"
        raise ValueError(
            f"{caller}: num_agents must be a perfect {root} to pool a {len(grid)}-D grid "
            f"{grid!r} to an agent grid of equal sides, got {num_agents}"
        )


def check_agent_sequence(caller: str, q_len: int, kv_len: int, grid: Sequence[int]) -> int:
    """Extra tokens ``E = N - prod(grid)`` (0 without a grid); raises unless q and k are
    one sequence covering the grid."""
    if q_len != kv_len:
        raise ValueError(
            f"{caller}: agent attention pools its agents from the sequence it attends to "
            f"(self-attention); q has {q_len} tokens but k has {kv_len}"
        )
    cells = math.prod(grid) if grid else q_len
    if q_len < cells:
        raise ValueError(
            f"{caller}: the sequence has {q_len} tokens, fewer than the grid {tuple(grid)!r} "
            f"holds ({cells}); the sequence must be E extra tokens followed by the grid"
        )
    return q_len - cells


def _segments(length: int, parts: int, dtype, device) -> torch.Tensor:
    """``[parts, length]`` 0/1: segment ``o`` covers ``floor(o·L/p) <= i < ceil((o+1)·L/p)``
    (adaptive average pooling's segments)."""
    rows = []
    for o in range(parts):
        lo, hi = (o * length) // parts, -((-(o + 1) * length) // parts)
        rows.append([1.0 if lo <= i < hi else 0.0 for i in range(length)])
    return torch.tensor(rows, dtype=dtype, device=device).reshape(parts, length)


def pool_agents_reference(
    q: torch.Tensor,
    weights: torch.Tensor | None,
    num_agents: int,
    grid: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent tokens: the (weighted) mean of the queries over each pooling segment.

    Args:
        q: ``[B, H, N, D]``.
        weights: optional 0/1 float broadcastable to ``[B, H, N]`` (padding 0).
        num_agents: ``n``; with a grid, a perfect power of its rank.
        grid: empty to pool the whole sequence into ``n`` segments; else the grid
            (after ``E = N - prod(grid)`` extra tokens, which are not pooled), pooled
            per axis to ``n ** (1 / rank)`` segments.

    Returns:
        ``agents [B, H, n, D]`` in the compute dtype and ``present [B, H, n]`` bool
        (False where a segment holds no weight; that agent is then 0).
    """
    ct = compute_dtype(q.dtype)
    B, H, N, D = q.shape
    cells = math.prod(grid) if grid else N
    tokens = q[:, :, N - cells :].to(ct)  # [B, H, P, D]
    sides = agent_grid(num_agents, len(grid)) if grid else (num_agents,)
    lengths = tuple(grid) if grid else (N,)
    pool = torch.ones(1, 1, dtype=ct, device=q.device)
    for side, length in zip(sides, lengths):
        seg = _segments(length, side, ct, q.device)
        pool = torch.kron(pool, seg)  # row-major: the new axis varies fastest
    w = torch.ones(B, H, cells, dtype=ct, device=q.device)
    if weights is not None:
        w = w * weights.to(ct)[..., N - cells :]
    total = w @ pool.t()  # [B, H, n]
    summed = pool @ (tokens * w[..., None])  # [B, H, n, D]
    present = total > 0
    agents = summed / torch.where(present, total, torch.ones_like(total))[..., None]
    return agents, present


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    num_agents: int,
    grid: Sequence[int] = (),
    scale: float | None = None,
) -> torch.Tensor:
    """Agent attention (Han et al., 2024): ``O = softmax(Q·Aᵀ·s)·softmax(A·Kᵀ·s)·V``.

    The ``n`` agent tokens ``A`` are the mean of the queries over ``n`` segments (over
    the grid when one is given, see :func:`pool_agents_reference`); padding tokens
    (``kv_mask`` False) are left out of the means and of the agent aggregation
    ``V_A = softmax(A·Kᵀ·s)·V``; agents with no token are left out of the broadcast
    ``O = softmax(Q·Aᵀ·s)·V_A``.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``, ``H % Hkv == 0``.
        kv_mask: optional bool broadcastable to ``[B, H, N]``; False tokens are padding.
        num_agents: ``n >= 1``.
        grid: empty, or the token grid after ``N - prod(grid)`` extra tokens.
        scale: multiplier of both score products; default ``1/sqrt(D)``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``; rows with no agent are 0.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1 + 8 * 8, 16) for _ in range(3))
        >>> agent_attention_reference(q, k, v, num_agents=16, grid=(8, 8)).shape
        torch.Size([1, 2, 65, 16])
    """
    caller = "agent_attention_reference"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_agent_args(caller, num_agents, grid)
    check_agent_sequence(caller, shapes.q_len, shapes.kv_len, grid)
    weights = None
    if kv_mask is not None:
        weights = kv_mask.expand(shapes.batch, shapes.heads, shapes.kv_len).float()
    agents, present = pool_agents_reference(q, weights, num_agents, grid)
    ct = agents.dtype
    visible = None if kv_mask is None else kv_mask.unsqueeze(-2)  # [.., 1, N]
    agent_values = masked_attention(agents, k.to(ct), v.to(ct), visible, scale=scale)
    out = masked_attention(q.to(ct), agents, agent_values, present.unsqueeze(-2), scale=scale)
    return out.to(q.dtype)
