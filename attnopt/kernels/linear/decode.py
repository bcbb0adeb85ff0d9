"""Linear attention for token generation: a constant-size running state per head.

Causal linear attention is a recurrence. With features ``φ(k_t)`` (see
:mod:`attnopt.kernels.linear.feature_maps`) and decay ``λ`` (1 without), the state
after position ``t`` is ``S_t = λ·S_(t−1) + φ(k_t) v_tᵀ`` (``[F, Dv]``) and the
normaliser ``z_t = λ·z_(t−1) + φ(k_t)`` (``[F]``); query ``t`` outputs
``φ(q_t)·S_t / (φ(q_t)·z_t + eps)``, exactly what
:func:`~attnopt.kernels.linear.reference.linear_attention_reference` computes from the
whole sequence. Decoding therefore costs O(F·Dv) per token and head, however long the
sequence, and the cache is the pair ``(S, z)``.

The state lives per *state head*: one per kv head when every query head shares one
decay (query heads of a group read the same state), one per query head when the
decay differs per head. Everything here is in the compute dtype (fp32 for half
inputs); the state is kept in it too.
"""

from __future__ import annotations

import torch

__all__ = ["linear_decode_step", "linear_state"]


def _triton_step():
    try:
        from attnopt.kernels.linear.triton_decode import linear_decode_step_triton
    except ImportError:  # Triton or the kernel is absent: the PyTorch path serves
        return None
    return linear_decode_step_triton


def _masked(kf: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    # Padding keys contribute nothing: zero features zero both the state and normaliser.
    return kf if valid is None else kf * valid[:, None, :, None].to(kf.dtype)


def linear_state(
    kf: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state ``(S, z)`` after a whole prefix, from its key features.

    Args:
        kf: ``[B, Hs, L, F]`` key features (``Hs`` state heads); v: ``[B, Hs, L, Dv]``.
        valid: optional bool ``[B, L]``; False keys (padding) are left out.
        log_decay: optional ``[Hs]`` ``log λ`` per state head; key ``j`` of ``L`` is
            weighted ``λ^(L−1−j)``.

    Returns:
        ``S [B, Hs, F, Dv]`` and ``z [B, Hs, F]``.

    Example:
        >>> S, z = linear_state(torch.rand(1, 2, 5, 4), torch.randn(1, 2, 5, 3))
        >>> S.shape, z.shape
        (torch.Size([1, 2, 4, 3]), torch.Size([1, 2, 4]))
    """
    kf = _masked(kf, valid)
    if log_decay is not None:
        age = torch.arange(kf.shape[2] - 1, -1, -1, device=kf.device, dtype=kf.dtype)
        kf = kf * torch.exp(age[None, :] * log_decay[:, None])[None, :, :, None]
    return kf.transpose(-1, -2) @ v.to(kf.dtype), kf.sum(2)


def linear_decode_step(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
    eps: float = 1e-6,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of ``N`` new positions given the state of everything before them.

    Args:
        qf: ``[B, H, N, F]`` query features; ``H`` a multiple of ``Hs``.
        kf: ``[B, Hs, N, F]`` key features; v: ``[B, Hs, N, Dv]``.
        state: ``[B, Hs, F, Dv]``; norm: ``[B, Hs, F]``: ``(S, z)`` before the new keys.
        valid: optional bool ``[B, N]``; False keys (padding) are left out.
        log_decay: optional ``[Hs]`` ``log λ`` per state head.
        eps: added to every normaliser.
        use_triton: one token with one state per query head (``Hs == H``, fp32 state)
            runs the Triton decode step, updating ``state``/``norm`` in place; default:
            on CUDA tensors when it is importable. ``True`` on CPU needs
            ``TRITON_INTERPRET=1``.

    Returns:
        ``out [B, H, N, Dv]`` (compute dtype) and the state and normaliser after the
        new keys.

    Example:
        >>> S, z = torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)
        >>> out, S, z = linear_decode_step(torch.rand(1, 4, 1, 4), torch.rand(1, 2, 1, 4),
        ...                                torch.randn(1, 2, 1, 3), S, z)
        >>> out.shape
        torch.Size([1, 4, 1, 3])
    """
    B, H, N, F = qf.shape
    Hs = kf.shape[1]
    rep = H // Hs
    if use_triton is None:
        use_triton = qf.is_cuda
    fits = N == 1 and Hs == H and state.dtype == torch.float32 and norm.dtype == torch.float32
    kernel = _triton_step() if use_triton and fits else None
    if kernel is not None:
        decay = None if log_decay is None else torch.exp(log_decay).tolist()
        mask = None if valid is None else valid[:, :1]  # [B, 1]: broadcast over heads
        state, norm = state.contiguous(), norm.contiguous()
        out = kernel(state, norm, qf[:, :, 0], kf[:, :, 0], v[:, :, 0], mask, decay=decay, eps=eps)
        return out.unsqueeze(2), state, norm
    kf = _masked(kf, valid)
    v = v.to(kf.dtype)
    q5 = qf.reshape(B, Hs, rep, N, F)
    steps = torch.arange(N, device=qf.device)
    causal = steps[:, None] >= steps[None, :]  # [N, N]
    if log_decay is None:
        intra = causal.to(kf.dtype)[None]  # [1, N, N]
        carry = torch.ones(1, N, device=qf.device, dtype=kf.dtype)  # [1, N]
        total = None
    else:
        dist = (steps[:, None] - steps[None, :]).clamp(min=0).to(kf.dtype)
        intra = torch.exp(dist[None] * log_decay[:, None, None]) * causal  # [Hs, N, N]
        carry = torch.exp((steps + 1).to(kf.dtype)[None, :] * log_decay[:, None])  # [Hs, N]
        total = torch.exp(N * log_decay)  # [Hs]
    a = (q5 @ kf.unsqueeze(2).transpose(-1, -2)) * intra[None, :, None]  # [B, Hs, rep, N, N]
    c = carry[None, :, None, :, None]  # [1, Hs|1, 1, N, 1]
    num = a @ v.unsqueeze(2) + c * (q5 @ state.unsqueeze(2))  # [B, Hs, rep, N, Dv]
    den = a.sum(-1, keepdim=True) + c * (q5 @ norm.unsqueeze(2).unsqueeze(-1)) + eps
    out = (num / den).reshape(B, H, N, -1)
    if total is None:
        new_state, new_norm = state + kf.transpose(-1, -2) @ v, norm + kf.sum(2)
    else:
        add_s, add_z = linear_state(kf, v, None, log_decay)
        new_state = state * total[None, :, None, None] + add_s
        new_norm = norm * total[None, :, None] + add_z
    return out, new_state, new_norm
