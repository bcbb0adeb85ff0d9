"""One token of causal linear attention in Triton: update the running state, read it.

Token generation with linear attention keeps, per batch row and query head, the
state ``S = Σ_j λ^(t−j) φ(k_j) v_jᵀ`` (``[Dk, Dv]``) and normaliser
``z = Σ_j λ^(t−j) φ(k_j)`` (``[Dk]``) of every token so far; a new token at position
``t`` costs O(Dk·Dv) whatever the length of the prefix::

    S <- λ S + φ(k_t) v_tᵀ        z <- λ z + φ(k_t)
    out = φ(q_t)·S / (φ(q_t)·z + eps)

This is exactly the last row of the causal
:func:`~attnopt.kernels.linear.reference.linear_attention_reference` over the prefix
plus the new token (the new token sees itself, decay counts every position). A padding
token (``kv_mask`` False) adds nothing to the state, which still decays, as a padding
key does in the full op.

One program per ``(b, h)`` owns that head's state: it reads and writes ``z`` once and
``S`` a block of value columns at a time, so the in-place update has no races.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.kernels._triton import triton_runs_on
from attnopt.kernels.linear.reference import check_decay, decay_per_head
from attnopt.kernels.linear.triton_linear import MAX_TRITON_DIM, _block, _phi

__all__ = ["linear_decode_step_triton"]

_FMAP = {None: 0, "elu": 1, "relu": 2}


@triton.jit
def _decode_kernel(
    S, Z, Q, K, V, Out, MASK, LOGD,
    ssb, ssh, ssk, ssv, szb, szh, szk, sqb, sqh, sqk, skb, skh, skk, svb, svh, svv,
    sob, soh, sov, smb, smh,
    H, R, DK, DV, eps,
    FMAP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DECAY: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // R
    kc = tl.arange(0, BK)
    k_ok = kc < DK
    q = tl.load(Q + b * sqb + h * sqh + kc * sqk, mask=k_ok, other=0.0).to(tl.float32)
    qf = _phi(q, k_ok, FMAP)
    key = tl.load(K + b * skb + hk * skh + kc * skk, mask=k_ok, other=0.0).to(tl.float32)
    keep = k_ok
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * smb + h * smh) != 0)
    kf = _phi(key, keep, FMAP)
    if HAS_DECAY:  # noqa: SIM108 (a constexpr if-block compiles one branch only)
        lam = tl.exp(tl.load(LOGD + h).to(tl.float32))
    else:
        lam = 1.0
    z_ptrs = Z + b * szb + h * szh + kc * szk
    z = tl.load(z_ptrs, mask=k_ok, other=0.0) * lam + kf
    tl.store(z_ptrs, z, mask=k_ok)
    den = tl.sum(qf * z, 0) + eps
    for v0 in range(0, DV, BV):
        vc = v0 + tl.arange(0, BV)
        v_ok = vc < DV
        val = tl.load(V + b * svb + hk * svh + vc * svv, mask=v_ok, other=0.0).to(tl.float32)
        s_ptrs = S + b * ssb + h * ssh + kc[:, None] * ssk + vc[None, :] * ssv
        s_mask = k_ok[:, None] & v_ok[None, :]
        state = tl.load(s_ptrs, mask=s_mask, other=0.0) * lam + kf[:, None] * val[None, :]
        tl.store(s_ptrs, state, mask=s_mask)
        out = tl.sum(qf[:, None] * state, 0) / den
        tl.store(Out + b * sob + h * soh + vc * sov, out.to(Out.dtype.element_ty), mask=v_ok)


def linear_decode_step_triton(
    state: torch.Tensor,
    normalizer: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    feature_map: str | None = None,
    decay: float | tuple[float, ...] | list[float] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advance a causal linear-attention state by one token (in place) and return that
    token's output.

    Contract: after prefilling ``state``/``normalizer`` with a prefix of ``t`` tokens
    (``S = Σ_j λ^(t−1−j) φ(k_j) v_jᵀ``, ``z = Σ_j λ^(t−1−j) φ(k_j)``, both zero for an
    empty prefix), the output equals the last query row of causal
    ``linear_attention_reference`` over the ``t + 1`` tokens with the same
    ``feature_map``, ``decay`` and ``eps``, and the state is that of ``t + 1`` tokens.

    Args:
        state: ``[B, H, Dk, Dv]`` float32, updated in place to ``λ S + φ(k) vᵀ`` (one
            state per query head: decay and padding are per head).
        normalizer: ``[B, H, Dk]`` float32, updated in place to ``λ z + φ(k)``.
        q: ``[B, H, Dk]``, the new token's query (raw when ``feature_map`` is given,
            else already its features φ(q)).
        k: ``[B, Hkv, Dk]`` with ``H % Hkv == 0`` (grouped-query heads share a kv head);
            raw or features like ``q``.
        v: ``[B, Hkv, Dv]``.
        kv_mask: optional bool broadcastable to ``[B, H]``; False: the token is padding
            and adds nothing to the state (which still decays); its output is still
            computed from the state.
        feature_map: ``"elu"`` (elu + 1) or ``"relu"`` fused into the kernel, or None
            when q and k are already features (softmax_rf, hedgehog: apply
            ``apply_feature_map`` first).
        decay: None, one ``λ`` in (0, 1] or one per query head.
        eps: added to the normaliser.

    Returns:
        ``[B, H, Dv]`` in ``q.dtype``.

    Example (on a GPU):
        >>> S = torch.zeros(1, 4, 16, 16, device="cuda"); z = torch.zeros(1, 4, 16, device="cuda")
        >>> q, k, v = (torch.randn(1, 4, 16, device="cuda") for _ in range(3))
        >>> linear_decode_step_triton(S, z, q, k, v, feature_map="elu").shape  # doctest: +SKIP
        torch.Size([1, 4, 16])
    """
    caller = "linear_decode_step_triton"
    for name, t, rank, layout in (
        ("state", state, 4, "[B, H, Dk, Dv]"),
        ("normalizer", normalizer, 3, "[B, H, Dk]"),
        ("q", q, 3, "[B, H, Dk]"),
        ("k", k, 3, "[B, Hkv, Dk]"),
        ("v", v, 3, "[B, Hkv, Dv]"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{caller}: {name} must be a {rank}-D tensor {layout}, got {got}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{caller}: {name} must be floating-point, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{caller}: {name} must be on q's device {q.device}, got {t.device}")
    B, H, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if state.dtype != torch.float32 or normalizer.dtype != torch.float32:
        raise ValueError(
            f"{caller}: state and normalizer must be float32 (they accumulate every token), "
            f"got {state.dtype} and {normalizer.dtype}"
        )
    if k.shape != (B, Hkv, Dk) or Hkv == 0 or H % Hkv:
        raise ValueError(
            f"{caller}: k must be [B, Hkv, Dk] = [{B}, Hkv, {Dk}] with H ({H}) a multiple of "
            f"Hkv, got shape {tuple(k.shape)}"
        )
    if v.shape[:2] != (B, Hkv):
        raise ValueError(
            f"{caller}: v must be [B, Hkv, Dv] = [{B}, {Hkv}, Dv], got shape {tuple(v.shape)}"
        )
    if state.shape != (B, H, Dk, Dv):
        raise ValueError(
            f"{caller}: state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}], got shape "
            f"{tuple(state.shape)}"
        )
    if normalizer.shape != (B, H, Dk):
        raise ValueError(
            f"{caller}: normalizer must be [B, H, Dk] = [{B}, {H}, {Dk}], got shape "
            f"{tuple(normalizer.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{caller}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if feature_map not in _FMAP:
        raise ValueError(
            f"{caller}: feature_map must be 'elu', 'relu' or None (q and k already "
            f"features), got {feature_map!r}"
        )
    check_decay(caller, decay, H)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):
        raise ValueError(f"{caller}: eps must be a positive finite number, got {eps!r}")
    if Dk > MAX_TRITON_DIM:
        raise ValueError(f"{caller}: Dk must be at most {MAX_TRITON_DIM}, got {Dk}")
    mask, smb, smh = None, 0, 0
    if kv_mask is not None:
        if not isinstance(kv_mask, torch.Tensor) or kv_mask.dtype != torch.bool:
            raise ValueError(f"{caller}: kv_mask must be a bool tensor broadcastable to [B, H]")
        if kv_mask.dim() > 2 or any(
            s not in (1, t) for s, t in zip(reversed(kv_mask.shape), (H, B))
        ):
            raise ValueError(
                f"{caller}: kv_mask must be broadcastable to [B, H] = [{B}, {H}], got shape "
                f"{tuple(kv_mask.shape)}"
            )
        mask = kv_mask.reshape((1,) * (2 - kv_mask.dim()) + tuple(kv_mask.shape))
        mask = mask.to(device=q.device, dtype=torch.int8)
        smb = 0 if mask.shape[0] == 1 else mask.stride(0)
        smh = 0 if mask.shape[1] == 1 else mask.stride(1)
    if not triton_runs_on(q.device):
        raise ValueError(
            f"{caller}: Triton kernels take CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1), got q on {q.device}"
        )
    if isinstance(decay, list):
        decay = tuple(decay)
    log_decay = decay_per_head(decay, H, torch.float32, q.device)
    out = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _decode_kernel[(B * H,)](
        state,
        normalizer,
        q,
        k,
        v,
        out,
        mask if mask is not None else q,
        log_decay if log_decay is not None else q,
        *state.stride(),
        *normalizer.stride(),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        smb,
        smh,
        H=H,
        R=H // Hkv,
        DK=Dk,
        DV=Dv,
        eps=float(eps),
        FMAP=_FMAP[feature_map],
        HAS_MASK=mask is not None,
        HAS_DECAY=log_decay is not None,
        BK=_block(Dk, MAX_TRITON_DIM),
        BV=_block(Dv, 64),
    )
    return out
