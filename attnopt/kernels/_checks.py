"""Input checks shared by the attention ops, their references and launchers.

Every variant takes the same tensors in the same layout (see :mod:`attnopt.kernels`),
so the checks live here once and name the caller in each message: an error raised
from deep inside a rewritten model should say which op rejected which argument.
The checks only compare sizes, so they also run on fake tensors with symbolic
sequence lengths (inside ``torch.export``).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["AttentionShapes", "check_attention_inputs", "check_window_args"]


@dataclasses.dataclass(frozen=True)
class AttentionShapes:
    """Sizes of one validated call.

    ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``, ``v [B, Hkv, M, Dv]``.
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (``H // Hkv``)."""
        return self.heads // self.kv_heads


def _broadcastable(shape: torch.Size, target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target), strict=False))


def check_attention_inputs(
    caller: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> AttentionShapes:
    """Check ranks, sizes, dtypes and devices of an attention call; return its sizes.

    Raises ``ValueError`` naming ``caller``, the argument, its value and what is valid.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = {"q": "[B, H, N, D]", "k": "[B, Hkv, M, D]", "v": "[B, Hkv, M, Dv]"}[name]
            raise ValueError(f"{caller}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(
                f"{caller}: {name} must be a floating-point tensor, got dtype {t.dtype}"
            )
    B, H, N, D = q.shape
    _, Hkv, M, _ = k.shape
    Dv = v.shape[-1]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"{caller}: q, k and v must have the same batch size, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != D:
        raise ValueError(
            f"{caller}: k head dim must equal q head dim {D}, got k shape {tuple(k.shape)}"
        )
    if v.shape[1] != Hkv or v.shape[2] != M:
        raise ValueError(
            f"{caller}: v must be [B, Hkv, M, Dv] with Hkv and M of k {tuple(k.shape)}, "
            f"got v shape {tuple(v.shape)}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"{caller}: q heads ({H}) must be a multiple of k/v heads ({Hkv}) "
            f"(grouped-query attention); got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{caller}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"{caller}: q, k and v must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}"
        )
    if kv_mask is not None:
        if not isinstance(kv_mask, torch.Tensor) or kv_mask.dtype != torch.bool:
            got = kv_mask.dtype if isinstance(kv_mask, torch.Tensor) else type(kv_mask).__name__
            raise ValueError(
                f"{caller}: kv_mask must be a bool tensor (True = key visible), got {got}"
            )
        if not _broadcastable(kv_mask.shape, (B, H, M)):
            raise ValueError(
                f"{caller}: kv_mask must be broadcastable to [B, H, M] = [{B}, {H}, {M}], "
                f"got shape {tuple(kv_mask.shape)}"
            )
        if kv_mask.device != q.device:
            raise ValueError(
                f"{caller}: kv_mask must be on q's device {q.device}, got {kv_mask.device}"
            )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"{caller}: bias must be a floating-point tensor added to the scores, got {got}"
            )
        if not _broadcastable(bias.shape, (B, H, N, M)):
            raise ValueError(
                f"{caller}: bias must be broadcastable to [B, H, N, M] = [{B}, {H}, {N}, {M}], "
                f"got shape {tuple(bias.shape)}"
            )
        if bias.device != q.device:
            raise ValueError(f"{caller}: bias must be on q's device {q.device}, got {bias.device}")
    return AttentionShapes(B, H, Hkv, N, M, D, Dv)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_window_args(caller: str, window: object, sinks: object, dilation: object) -> None:
    """Check the sliding-window parameters (shared by the config, the op and the kernels)."""
    if not _is_int(window) or window < 1:
        raise ValueError(
            f"{caller}: window must be a positive int (number of keys each query sees), "
            f"got {window!r}"
        )
    if not _is_int(sinks) or sinks < 0:
        raise ValueError(
            f"{caller}: sinks must be a non-negative int (number of leading keys every query "
            f"sees), got {sinks!r}"
        )
    if not _is_int(dilation) or dilation < 1:
        raise ValueError(
            f"{caller}: dilation must be a positive int (step between attended keys), "
            f"got {dilation!r}"
        )
