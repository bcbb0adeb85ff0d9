"""``attnopt::agent_attention``: agent attention as one graph node.

The forward runs the pooled two-SDPA path. The backward is its own op
(``agent_attention_backward``) that recomputes the forward and differentiates it
with ``torch.func.vjp``, so a traced backward is one node too and only the inputs
are kept between forward and backward (the forward's intermediates are O(n·D)).
"""

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.agent.pooled_sdpa import agent_forward
from attnopt.kernels.agent.reference import check_agent_args, check_agent_sequence
from attnopt.kernels.dense.reference import compute_dtype

__all__ = ["agent_attention", "agent_attention_backward"]

_NAME = "attnopt::agent_attention"


def _check(q, k, v, kv_mask, bias, num_agents, grid) -> None:
    if bias is not None:
        raise ValueError(
            f"{_NAME}: bias must be None (agent attention takes masks only as kv_mask), "
            f"got a tensor of shape {tuple(bias.shape)}"
        )
    shapes = check_attention_inputs(_NAME, q, k, v, kv_mask)
    check_agent_args(_NAME, num_agents, grid)
    # Symbolic lengths (torch.export) are checked when the graph runs.
    if isinstance(shapes.q_len, int) and isinstance(shapes.kv_len, int):
        check_agent_sequence(_NAME, shapes.q_len, shapes.kv_len, grid)


@torch.library.custom_op(_NAME, mutates_args=())
def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    num_agents: int,
    grid: list[int],
) -> torch.Tensor:
    """Agent attention; semantics of :class:`~attnopt.kernels.agent.Agent`.

    Shapes: ``q [B, H, N, D]``, ``k [B, Hkv, N, D]``, ``v [B, Hkv, N, Dv]``,
    ``kv_mask`` bool broadcastable to ``[B, H, N]``; ``bias`` must be None. ``grid``
    is empty (agents pool the sequence) or the token grid after ``N - prod(grid)``
    extra tokens. Returns ``[B, H, N, Dv]`` in ``q.dtype``.
    """
    _check(q, k, v, kv_mask, bias, num_agents, grid)
    out = agent_forward(q, k, v, kv_mask, num_agents=num_agents, grid=tuple(grid), scale=scale)
    return out.contiguous()


@agent_attention.register_fake
def _agent_attention_fake(q, k, v, kv_mask, bias, scale, num_agents, grid):
    _check(q, k, v, kv_mask, bias, num_agents, grid)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("attnopt::agent_attention_backward", mutates_args=())
def agent_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
    num_agents: int,
    grid: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`agent_attention` for ``q``, ``k`` and ``v``."""
    ct = compute_dtype(q.dtype)

    def forward(q_, k_, v_):
        return agent_forward(q_, k_, v_, kv_mask, num_agents=num_agents, grid=grid, scale=scale)

    # Custom-op bodies run below the autograd dispatch key, so plain autograd would
    # record nothing here; torch.func.vjp differentiates through its own transform.
    _, vjp = torch.func.vjp(forward, q.to(ct), k.to(ct), v.to(ct))
    dq, dk, dv = vjp(grad_out.to(ct))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@agent_attention_backward.register_fake
def _agent_attention_backward_fake(grad_out, q, k, v, kv_mask, scale, num_agents, grid):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_mask, bias, scale, num_agents, grid = inputs
    ctx.save_for_backward(q, k, v, kv_mask)
    ctx.args = (scale, num_agents, grid)


def _backward(ctx, grad_out):
    q, k, v, kv_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnopt.agent_attention_backward(grad_out, q, k, v, kv_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


agent_attention.register_autograd(_backward, setup_context=_setup_context)
