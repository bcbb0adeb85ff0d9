"""Hybrid attention on CPU in O(N·(window + C)·d + N·d²), forward (and autograd).

The linear part is the causal chunked kernel of :mod:`attnopt.kernels.linear.chunked`
with the queries moved back by ``window`` positions (query ``p`` reads the state of
keys ``<= p − window``) and the sink keys left out; it yields, group of chunks by
group, each query's unnormalised ``[Σ φφ v, Σ φφ]``. For the same rows, the window
part scores a band of ``C + window − 1`` keys per chunk of ``C`` queries: the bands of
consecutive chunks are windows of one key sequence at stride ``C``, so
``Tensor.unfold`` gives them as a strided view and one batched matmul scores the
whole group; a fixed ``[C, C + window − 1]`` additive pattern keeps, for row ``r``,
band columns ``r .. r + window − 1``, and a per-key additive mask hides padding,
missing keys and the sinks (scored separately against every query). The three
parts meet in the stabilised shared normaliser of
:mod:`attnopt.kernels.hybrid.reference`.

Memory: one kv head (with its query heads) at a time, groups sized so each
temporary holds about ``max_elements`` numbers; no ``[N, M]`` tensor exists.
"""

from __future__ import annotations

import math

import torch

from attnopt.kernels._checks import check_attention_inputs
from attnopt.kernels.hybrid.reference import check_hybrid_args, check_mix_logit, mix_logs
from attnopt.kernels.linear.chunked import (
    HeadGroup,
    OutputRows,
    Plan,
    causal_groups,
    head_groups,
    make_plan,
    take_rows,
)
from attnopt.kernels.linear.feature_maps import check_feature_tensors

__all__ = ["hybrid_attention_blockwise", "hybrid_forward"]

_NEG_INF = float("-inf")


def hybrid_attention_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    *,
    window: int,
    sinks: int = 0,
    scale: float | None = None,
    causal: bool = True,
    feature_map: str = "elu",
    chunk: int = 64,
    q_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    mix_logit: torch.Tensor | None = None,
    max_elements: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Hybrid attention without an ``[N, M]`` tensor; semantics of
    :func:`~attnopt.kernels.hybrid.reference.hybrid_attention_reference`.

    Differentiable (q, k, v, feature-map tensors, ``mix_logit``) through autograd.

    Args:
        chunk: query rows per block and positions per chunk of the linear part
            (speed/memory only).
        max_elements: numbers per group temporary; default ``2**15``.
        fused: whether inference on CPU may use the fused C++ kernel
            (:mod:`~attnopt.kernels.hybrid.fused`; same result, faster). False keeps
            the blockwise path.
        The rest: as in the reference.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 500, 16) for _ in range(3))
        >>> hybrid_attention_blockwise(q, k, v, window=64, sinks=4).shape
        torch.Size([1, 2, 500, 16])
    """
    caller = "hybrid_attention_blockwise"
    shapes = check_attention_inputs(caller, q, k, v, kv_mask)
    check_hybrid_args(
        caller, window=window, sinks=sinks, feature_map=feature_map, chunk=chunk, causal=causal
    )
    tensors = (q_weight, q_bias, k_weight, k_bias)
    check_feature_tensors(
        caller, feature_map, tensors, shapes.heads, shapes.kv_heads, shapes.head_dim
    )
    check_mix_logit(caller, mix_logit, shapes.heads)
    if max_elements is not None and (not isinstance(max_elements, int) or max_elements < 1):
        raise ValueError(
            f"{caller}: max_elements must be a positive int or None, got {max_elements!r}"
        )
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *tensors, mix_logit)
    )
    return hybrid_forward(
        q,
        k,
        v,
        kv_mask,
        window=window,
        sinks=sinks,
        scale=scale,
        feature_map=feature_map,
        chunk=chunk,
        tensors=tensors,
        mix_logit=mix_logit,
        max_elements=max_elements,
        differentiable=grad,
        fused=fused,
    )


_PATTERNS: dict[tuple, torch.Tensor] = {}


def _band_pattern(C: int, window: int, ct: torch.dtype, device) -> torch.Tensor:
    """Additive ``[C, C + window − 1]``: row ``r`` sees band columns ``r .. r + window − 1``."""
    key = (C, window, ct, device)
    pattern = _PATTERNS.get(key)
    if pattern is None:
        r = torch.arange(C, device=device)[:, None]
        t = torch.arange(C + window - 1, device=device)[None, :]
        seen = (t >= r) & (t <= r + window - 1)
        pattern = torch.zeros(seen.shape, dtype=ct, device=device).masked_fill_(~seen, _NEG_INF)
        _PATTERNS[key] = pattern
    return pattern


def _combine(
    plan: Plan,
    hg: HeadGroup,
    rows: torch.Tensor,
    lin: torch.Tensor,
    r0: int,
    *,
    window: int,
    sinks: int,
    log_g,
    log_1g,
) -> torch.Tensor:
    """Unnormalised ``[Σ w v, Σ w]`` ``[R, L, Dv+1]`` of query rows ``r0 .. r0 + L``
    (``rows [R, L, D]``) from their linear part ``lin [R, L, Dv+1]`` and their window
    and sink keys, every weight ``w <= 1`` (the row's stabiliser subtracted)."""
    C, R, D, Dv1, ct = plan.chunk, rows.shape[0], plan.D, plan.Dv + 1, plan.ct
    L = rows.shape[1]
    g = L // C
    Lb = C + window - 1
    dev = rows.device
    # Chunk c's queries sit at positions p0 + cC + window + r; their band starts at
    # key p0 + cC + 1 (p0: position of the group's first row, moved back by window).
    p0 = r0 + plan.off - window
    lo, hi = p0 + 1, p0 + L + window
    kw = take_rows(hg.k, lo, hi).to(ct).unfold(0, Lb, C)  # [g, D, Lb]
    vb = take_rows(hg.v, lo, hi).to(ct)
    vb = torch.cat([vb, vb.new_ones(vb.shape[0], 1)], dim=-1)  # [v, 1]: sums ride along
    vw = vb.unfold(0, Lb, C).transpose(1, 2)  # [g, Lb, Dv+1]
    qs = (rows * plan.scale).reshape(R, g, C, D)
    # In-place updates below touch only matmul outputs and their successors, which
    # autograd tracks (exp_ saves its own result), so the same code differentiates.
    scores = qs @ kw  # [R, g, C, Lb]
    bias = _band_pattern(C, window, ct, dev)  # [C, Lb]
    if hg.key_mask is not None or lo < sinks or lo < 0 or hi > plan.M:
        pos = torch.arange(lo, hi, device=dev)
        valid = ((pos >= max(sinks, 0)) & (pos < plan.M))[None, :]  # sinks are scored apart
        if hg.key_mask is not None:
            valid = valid & take_rows(hg.key_mask.unsqueeze(-1), lo, hi).squeeze(-1)
        key_bias = torch.zeros(valid.shape, dtype=ct, device=dev).masked_fill_(~valid, _NEG_INF)
        bias = key_bias.unfold(-1, Lb, C).unsqueeze(-2) + bias  # [R|1, g, C, Lb]
    scores = (
        scores.add_(bias)
        if scores.shape == torch.broadcast_shapes(scores.shape, bias.shape)
        else scores + bias
    )
    if isinstance(log_g, torch.Tensor):
        scores = scores + log_g.view(R, 1, 1, 1)
    m = scores.amax(-1)  # [R, g, C]

    sink_scores = None
    if sinks > 0:
        sk, sv = hg.k[:sinks].to(ct), hg.v[:sinks].to(ct)
        sv = torch.cat([sv, sv.new_ones(sinks, 1)], dim=-1)  # [S, Dv+1]
        sink_scores = qs @ sk.t()  # [R, g, C, S]
        qpos = torch.arange(r0, r0 + L, device=dev) + plan.off
        seen = (torch.arange(sinks, device=dev)[None, :] <= qpos[:, None]).view(1, g, C, sinks)
        if hg.key_mask is not None:
            seen = seen & hg.key_mask[:, :sinks].reshape(-1, 1, 1, sinks)
        sink_bias = torch.zeros(seen.shape, dtype=ct, device=dev).masked_fill_(~seen, _NEG_INF)
        sink_scores = sink_scores + sink_bias
        if isinstance(log_g, torch.Tensor):
            sink_scores = sink_scores + log_g.view(R, 1, 1, 1)
        m = torch.maximum(m, sink_scores.amax(-1))

    lin = lin.reshape(R, g, C, Dv1)
    den_lin = lin[..., -1]
    has_lin = den_lin > 0
    ell = torch.where(has_lin, torch.log(torch.where(has_lin, den_lin, 1.0)), _NEG_INF)
    if isinstance(log_1g, torch.Tensor):
        ell = ell + log_1g.view(R, 1, 1)
    m = torch.maximum(m, ell)
    m = torch.where(torch.isfinite(m), m, 0.0).detach().unsqueeze(-1)  # none seen: weights 0

    out = scores.sub_(m).exp_() @ vw  # [R, g, C, Dv+1]
    if sink_scores is not None:
        out = out + sink_scores.sub_(m).exp_() @ sv
    # The linear block is one term: weight exp(ell - m), value num_lin / den_lin.
    w_lin = torch.exp(ell - m.squeeze(-1)) / torch.where(has_lin, den_lin, 1.0)
    out = out + w_lin.unsqueeze(-1) * lin
    return out.reshape(R, L, Dv1)


def hybrid_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None,
    *,
    window: int,
    sinks: int,
    scale: float | None,
    feature_map: str,
    chunk: int,
    tensors: tuple = (None, None, None, None),
    mix_logit: torch.Tensor | None = None,
    max_elements: int | None = None,
    differentiable: bool = False,
    fused: bool = True,
) -> torch.Tensor:
    """The blockwise kernel on checked inputs (no argument checks).

    ``fused``: inference on CPU may take the C++ kernel
    (:mod:`~attnopt.kernels.hybrid.fused`), which computes the same result faster;
    False keeps this path (the tests compare the two)."""
    B, H, N, D = q.shape
    M, Dv = k.shape[2], v.shape[-1]
    if N == 0 or M == 0:
        return q.new_zeros(B, H, N, Dv)
    # A window longer than every key row changes nothing: clamp it so bands stay short.
    window = min(window, M)
    sinks = min(sinks, M)
    C = max(1, min(chunk, N))
    if fused:
        from attnopt.kernels.hybrid.fused import fused_hybrid

        out = fused_hybrid(
            q, k, v, kv_mask, window=window, sinks=sinks,
            scale=1.0 / math.sqrt(D) if scale is None else float(scale),
            feature_map=feature_map, chunk=C, mix_logit=mix_logit, differentiable=differentiable,
            tensors=tensors,
        )  # fmt: skip
        if out is not None:
            return out.to(q.dtype)
    plan = make_plan(
        q,
        k,
        v,
        kv_mask,
        scale=scale,
        feature_map=feature_map,
        chunk=C,
        decay=None,
        tensors=tensors,
        max_elements=max_elements,
        differentiable=differentiable,
        band=C + window - 1,
    )
    sink = OutputRows(plan, q)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        log_g_all, log_1g_all = mix_logs(mix_logit, plan.ct)
        for hg in head_groups(plan, q, k, v):
            log_g, log_1g = log_g_all, log_1g_all
            if isinstance(log_g, torch.Tensor):
                log_g, log_1g = log_g[hg.heads], log_1g[hg.heads]
            for r0, i0, i1, rows, lin in causal_groups(plan, hg, shift=window, first_key=sinks):
                out = _combine(
                    plan, hg, rows, lin, r0, window=window, sinks=sinks, log_g=log_g, log_1g=log_1g
                )
                sink.put_normalised(hg, i0, out[:, i0 - r0 : i1 - r0], 0.0)
    return sink.result(q.dtype)
