"""Linear attention through the fused C++ CPU kernel (``causal_cpu.cpp``).

The PyTorch path (:mod:`~attnopt.kernels.linear.chunked`) spends most of its time
between small matmuls: in Python, in the dispatcher and in cold caches. The C++
kernel computes the same chunked sums in one pass per head: heads in parallel, each
with its running state ``S = Σ φ(k)[v, 1]ᵀ`` and a few chunks of features in cache,
the chunk matmuls on oneDNN's brgemm micro-kernel. The result equals the chunked
kernel's up to rounding (tests compare both with the naive reference).

It serves causal and bidirectional inference on CPU in fp32 compute (fp16/bf16
inputs are read as fp32): no autograd, no decay. elu and relu are applied inside the
kernel, a few chunks at a time; the learnt and random maps (hedgehog, softmax_rf) are
applied here through :func:`apply_feature_map`, a group of positions for every head
at a time, and the kernel continues the state from one group to the next (causal
only: bidirectional attention with those maps is no faster here than on the PyTorch
path). Everything
else, and every call where the kernel cannot be built (no compiler; see
:mod:`attnopt.kernels._cpp`), takes the PyTorch path.

Memory: besides the output, per thread about four ``[chunk·BLOCK_CHUNKS, F]`` buffers,
the ``[B, H, F, Dv+1]`` states and, for the learnt maps, one group of features.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnopt.kernels._cpp import PHI_MODES, load_extension
from attnopt.kernels.linear.feature_maps import apply_feature_map

__all__ = ["BLOCK_CHUNKS", "fused_linear"]

_SOURCE = Path(__file__).with_name("causal_cpu.cpp")
# Chunks whose features are loaded at once (elu/relu): fewer, larger elementwise calls.
BLOCK_CHUNKS = 4
# Numbers per group of features of the learnt maps (all heads together).
GROUP_ELEMENTS = 1 << 16


def _extension():
    return load_extension(_SOURCE)


def fused_linear(plan, q, k, v, eps: float, *, causal: bool) -> torch.Tensor | None:
    """Linear attention of checked inputs, or None where the fused kernel does not apply
    (CUDA tensors, decay, fp64, autograd) or cannot be built.

    ``plan`` is the chunked kernel's :class:`~attnopt.kernels.linear.chunked.Plan`.
    Bidirectional attention is the causal kernel with every query placed after every
    key (positions ``M ..``): the keys' chunks only add to the state, the queries'
    chunks only read it, which is the O(N·d²) computation itself."""
    if (
        q.device.type != "cpu"
        or plan.log_decay is not None
        or plan.ct != torch.float32
        or plan.differentiable
    ):
        return None
    ext = _extension()
    if ext is None:
        return None
    B, H, N, M, C = plan.B, plan.H, plan.N, plan.M, plan.chunk
    off = plan.off if causal else M  # query i sits at position i + off
    out = q.new_empty(B, H, N, plan.Dv)
    state = torch.zeros(B, H, plan.F, plan.Dv + 1, dtype=torch.float32)
    valid = None if plan.key_mask is None else plan.key_mask.to(torch.float32)
    p_begin, p_end = min(0, off), max(M, off + N)
    mode = PHI_MODES.get(plan.feature_map)
    if mode is not None:
        ext.causal_linear_chunks(
            q, off, k, 0, v, valid, out, 0, state, p_begin, p_end, C, BLOCK_CHUNKS, mode, eps
        )
        return out
    if not causal:
        # Bidirectional attention with a learnt or random map spends its time in the
        # maps themselves, computed group by group here: the PyTorch path, which maps
        # larger blocks at once, is as fast (measured: 148 vs 156 ms at 16k, hedgehog).
        return None
    qw, qb, kw, kb = plan.tensors
    hedgehog = plan.feature_map == "hedgehog"
    rows = max(1, GROUP_ELEMENTS // (B * H * plan.F * C)) * C  # whole chunks per group
    for p0 in range(p_begin, p_end, rows):
        p1 = min(p0 + rows, p_end)
        ka = max(p0, 0)
        kz = max(ka, min(p1, M))  # keys [ka, kz), maybe none
        qa = max(p0, off)
        qz = max(qa, min(p1, off + N))  # query positions [qa, qz), maybe none
        qf = apply_feature_map(
            q[:, :, qa - off : qz - off].to(plan.ct),
            plan.feature_map,
            weight=qw,
            bias=qb if hedgehog else None,
            scale=plan.scale,
            query=True,
        )
        kf = apply_feature_map(
            k[:, :, ka:kz].to(plan.ct),
            plan.feature_map,
            weight=kw,
            bias=kb if hedgehog else None,
            scale=plan.scale,
        )
        ext.causal_linear_chunks(
            qf,
            qa,
            kf,
            ka,
            v[:, :, ka:kz],
            None if valid is None else valid[..., ka:kz],
            out,
            qa - off,
            state,
            p0,
            p1,
            C,
            rows // C,
            0,
            eps,
        )
    return out
