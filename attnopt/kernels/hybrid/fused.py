"""Hybrid attention forward through the fused C++ CPU kernel (``hybrid_cpu.cpp``).

The blockwise path (:mod:`~attnopt.kernels.hybrid.blockwise`) runs the linear part
through the chunked linear kernel's Python loop and the window part as separate
tensor operations per group. The C++ kernel does both per chunk of query rows, one
(batch, head) per work item in parallel: the linear state and the chunk's band of
newly old keys on brgemm, the window and sink keys of the chunk scored in one
cache-resident tile, and the two parts combined in log space exactly as the
reference does. Tests compare it and the blockwise path with the naive reference.

It serves inference on CPU with fp32 q, k, v whose rows are contiguous and the elu or
relu feature map; learnt and random maps, autograd, other dtypes and devices, windows
longer than ``MAX_WINDOW`` (whose tile would outgrow the cache) and every call where
the kernel cannot be built (see :mod:`attnopt.kernels._cpp`) take the blockwise path.

Memory: besides the output, the ``[B·H, F·(Dv+1)]`` states and per thread a few
``[chunk, window + chunk + sinks]`` tiles.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnopt.kernels._cpp import load_extension

__all__ = ["MAX_WINDOW", "fused_hybrid"]

_SOURCE = Path(__file__).with_name("hybrid_cpu.cpp")
_PHI_MODE = {"elu": 1, "relu": 2}
MAX_WINDOW = 2048


def _takes(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1


def fused_hybrid(
    q, k, v, kv_mask, *, window: int, sinks: int, scale: float, feature_map: str,
    chunk: int, mix_logit: torch.Tensor | None, differentiable: bool,
) -> torch.Tensor | None:  # fmt: skip
    """The forward of checked inputs (window and sinks already clamped to ``M``), or
    None where the fused kernel does not apply or cannot be built."""
    mode = _PHI_MODE.get(feature_map)
    grad = differentiable or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, mix_logit))
    )
    if mode is None or grad or window > MAX_WINDOW or not all(_takes(t) for t in (q, k, v)):
        return None
    ext = load_extension(_SOURCE)
    if ext is None:
        return None
    from attnopt.kernels.hybrid.reference import mix_logs

    B, H, N, _ = q.shape
    M = k.shape[2]
    valid = None
    if kv_mask is not None:
        km = kv_mask.reshape((1,) * (3 - kv_mask.dim()) + tuple(kv_mask.shape))
        valid = km.expand(km.shape[0], km.shape[1], M).to(torch.float32).contiguous()
    log_g = log_1g = None
    if mix_logit is not None:
        log_g, log_1g = (
            t.detach().float().contiguous() for t in mix_logs(mix_logit, torch.float32)
        )
    out = torch.empty(B, H, N, v.shape[-1], dtype=torch.float32)
    ext.hybrid_fwd(
        q, k, v, valid, log_g, log_1g, out, M - N, window, sinks, max(1, min(chunk, N)), mode,
        scale,
    )  # fmt: skip
    return out
