"""Hybrid attention for token generation: a bounded window of keys plus a linear state.

A decoding query at position ``p`` needs the window keys ``p − window < j <= p``, the
sink keys ``j < sinks``, and, for every older key, only the linear-attention state
``S = Σ φ(k_j) v_jᵀ``, ``z = Σ φ(k_j)`` over ``sinks <= j <= p − window``. The cache
(``attnopt.cache``) keeps the window in a ring buffer and folds each key into the state
when it leaves the window, so memory is constant. The combination is the one of
:mod:`attnopt.kernels.hybrid.reference`: one shared normaliser, stabilised in log
space, with the optional per-head mix ``g = sigmoid(mix_logit)``.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels.dense.reference import compute_dtype
from attnopt.kernels.hybrid.reference import mix_logs

__all__ = ["hybrid_decode_attention"]


def hybrid_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    qf: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    *,
    scale: float,
    mix_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid attention of new queries over cached window keys and the linear state.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, Hkv, L, D]``; v: ``[B, Hkv, L, Dv]``: the window
            and sink keys in the cache, any slot order.
        visible: bool ``[B, N, L]``: which cached keys get the softmax term for each query.
        qf: ``[B, H, N, F]`` query features.
        state: ``[B, Hkv, F, Dv]``; norm: ``[B, Hkv, F]``: the linear state of the keys
            older than every query's window (the same for all ``N`` queries).
        scale: multiplier of ``q·kᵀ``.
        mix_logit: optional ``[H]`` logits of the window weight ``g``.

    Returns:
        ``[B, H, N, Dv]`` in ``q.dtype``.

    Example:
        >>> q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        >>> vis = torch.ones(1, 1, 3, dtype=torch.bool)
        >>> S, z = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4)
        >>> hybrid_decode_attention(q, k, v, vis, torch.rand(1, 2, 1, 4), S, z, scale=0.5).shape
        torch.Size([1, 2, 1, 4])
    """
    B, H, N, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    rep = H // Hkv
    ct = compute_dtype(q.dtype)
    q5 = q.to(ct).reshape(B, Hkv, rep, N, D)
    k5, v5 = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)  # [B, Hkv, 1, L, .]
    log_g, log_1g = mix_logs(mix_logit, ct)
    if isinstance(log_g, torch.Tensor):
        log_g, log_1g = log_g.view(1, H, 1, 1), log_1g.view(1, H, 1)
    scores = (q5 @ k5.transpose(-1, -2) * scale).reshape(B, H, N, L)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf")) + log_g

    f5 = qf.to(ct).reshape(B, Hkv, rep, N, -1)
    den_lin = (f5 @ norm.to(ct).unsqueeze(2).unsqueeze(-1)).reshape(B, H, N)
    num_lin = (f5 @ state.to(ct).unsqueeze(2)).reshape(B, H, N, -1)
    has_lin = den_lin > 0
    safe_den = torch.where(has_lin, den_lin, 1.0)
    ell = torch.where(has_lin, torch.log(safe_den), -math.inf) + log_1g

    m = torch.maximum(scores.amax(-1) if L else ell, ell)
    m = torch.where(torch.isfinite(m), m, 0.0)  # [B, H, N]
    weights = torch.exp(scores - m.unsqueeze(-1))  # [B, H, N, L]
    w_lin = torch.exp(ell - m)
    num = (weights.reshape(B, Hkv, rep, N, L) @ v5).reshape(B, H, N, -1)
    num = num + (w_lin / safe_den).unsqueeze(-1) * num_lin
    den = weights.sum(-1) + w_lin
    out = num / torch.where(den > 0, den, 1.0).unsqueeze(-1)
    return out.to(q.dtype)
