"""Hybrid attention forward through the fused C++ CPU kernel (``hybrid_cpu.cpp``).

The blockwise path (:mod:`~attnopt.kernels.hybrid.blockwise`) runs the linear part
through the chunked linear kernel's Python loop and the window part as separate
tensor operations per group. The C++ kernel does both per chunk of query rows, one
(batch, head) per work item in parallel: the linear state and the chunk's band of
newly old keys on brgemm, the window and sink keys of the chunk scored in one
cache-resident tile, and the two parts combined in log space exactly as the
reference does. Tests compare it and the blockwise path with the naive reference.

It serves inference on CPU with fp32 q, k, v whose rows are contiguous. elu and relu
are applied inside the kernel; the learnt and random maps (hedgehog, softmax_rf) here,
through :func:`apply_feature_map`, a group of rows (and the keys that become old for
them) for every head at a time, the kernel carrying the linear state from one group
to the next. Autograd, other dtypes and devices, windows longer than ``MAX_WINDOW``
(whose tile would outgrow the cache) and every call where the kernel cannot be built
(see :mod:`attnopt.kernels._cpp`) take the blockwise path.

Memory: besides the output, the ``[B·H, F·(Dv+1)]`` states and per thread a few
``[chunk, window + chunk + sinks]`` tiles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnopt.kernels._cpp import PHI_MODES, fp32_cpu_rows, load_extension
from attnopt.kernels.linear.feature_maps import apply_feature_map

__all__ = ["GROUP_ELEMENTS", "MAX_WINDOW", "fused_hybrid"]

_SOURCE = Path(__file__).with_name("hybrid_cpu.cpp")
MAX_WINDOW = 2048
# Numbers per group of features of the learnt maps (all heads together).
GROUP_ELEMENTS = 1 << 16


def fused_hybrid(
    q, k, v, kv_mask, *, window: int, sinks: int, scale: float, feature_map: str,
    chunk: int, mix_logit: torch.Tensor | None, differentiable: bool,
    tensors: tuple = (None, None, None, None),
) -> torch.Tensor | None:  # fmt: skip
    """The forward of checked inputs (window and sinks already clamped to ``M``), or
    None where the fused kernel does not apply or cannot be built."""
    grad = differentiable or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, mix_logit, *tensors))
    )
    if grad or window > MAX_WINDOW or not all(fp32_cpu_rows(t) for t in (q, k, v)):
        return None
    ext = load_extension(_SOURCE)
    if ext is None:
        return None
    from attnopt.kernels.hybrid.reference import mix_logs

    B, H, N, _ = q.shape
    M, Dv = k.shape[2], v.shape[-1]
    off = M - N
    C = max(1, min(chunk, N))
    valid = None
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
        valid = km.expand(km.shape[0], km.shape[1], M).to(torch.float32).contiguous()
    log_g = log_1g = None
    if mix_logit is not None:
        log_g, log_1g = (
            t.detach().float().contiguous() for t in mix_logs(mix_logit, torch.float32)
        )
    out = torch.empty(B, H, N, Dv, dtype=torch.float32)
    # Old keys of the first query: sinks <= j <= off - window.
    init_end = max(sinks, min(M, off - window + 1))
    mode = PHI_MODES.get(feature_map)
    if mode is not None:
        F = q.shape[-1]
        states = torch.zeros(B * H, F * (Dv + 1))
        ext.hybrid_fwd(
            q, k, v, None, None, 0, valid, log_g, log_1g, out, states, off, window, sinks, C,
            mode, scale, 0, N, sinks, init_end,
        )  # fmt: skip
        return out
    # Learnt and random maps: applied here, a group of positions for every head at a time.
    qw, qb, kw, kb = tensors
    hedgehog = feature_map == "hedgehog"

    def phi(x, query):
        w, b = (qw, qb) if query else (kw, kb)
        f = apply_feature_map(
            x, feature_map, weight=w, bias=b if hedgehog else None, scale=scale, query=query
        )
        return f.contiguous()

    F = phi(q[:, :, :0], True).shape[-1]
    states = torch.zeros(B * H, F * (Dv + 1))
    rows = max(1, GROUP_ELEMENTS // (B * H * F * C)) * C
    no_rows = q.new_empty(B, H, 0, F)
    for a in range(sinks, init_end, rows):  # the old keys of the first query
        e = min(init_end, a + rows)
        ext.hybrid_fwd(
            q, k, v, no_rows, phi(k[:, :, a:e], False), a, valid, log_g, log_1g, out, states,
            off, window, sinks, C, 0, scale, 0, 0, a, e,
        )  # fmt: skip
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        # Keys that become old for these rows: positions r0 + off - window + 1 ..
        # r1 + off - window.
        ka = min(M, max(0, r0 + off - window + 1))
        kz = max(ka, min(M, r1 + off - window + 1))
        ext.hybrid_fwd(
            q, k, v, phi(q[:, :, r0:r1], True), phi(k[:, :, ka:kz], False), ka, valid, log_g,
            log_1g, out, states, off, window, sinks, C, 0, scale, r0, r1, 0, 0,
        )  # fmt: skip
    return out
