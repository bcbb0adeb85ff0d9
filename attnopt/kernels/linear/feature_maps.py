"""Feature maps φ of linear attention, their checks and their per-site tensors.

Linear attention replaces ``exp(q·k·scale)`` by ``φ(q)·φ(k)`` for a non-negative
feature map φ, so that ``Σ_j φ(q)·φ(k_j) v_j = φ(q)·(Σ_j φ(k_j) v_jᵀ)`` can be
computed once for all queries. Every implementation (reference, chunked kernel,
hybrid) applies φ through :func:`apply_feature_map`, so they agree by construction
and the tests check φ itself against its definition.

The maps, for ``x [.., L, D]`` (queries or keys of one head):

* ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020); ``F = D`` features.
* ``relu``: ``relu(x)``; ``F = D``. A query orthogonal to every key gets a zero
  normaliser; the ``eps`` of the ops then gives it a zero output.
* ``softmax_rf``: Performer's positive random features (FAVOR+, Choromanski et al.
  2021): with ``x' = x·scale^½`` and a fixed projection ``W [D, m]`` whose columns
  are Gaussian (drawn orthogonal in blocks of ``D``),
  ``φ(x) = exp(x'W − |x'|²/2 − c) / √m``, so that ``E[φ(q)·φ(k)] ∝ exp(q·k·scale)``.
  ``c`` is 0 for keys and, for queries, the row's largest exponent (a per-query
  factor that cancels in the normalised output and keeps every feature ≤ 1/√m).
  ``F = m`` (default ``2·D``).
* ``hedgehog``: a learnable map per head (Zhang et al. 2024, "The Hedgehog & the
  Porcupine", as used by LoLCATs): ``z = x W_h + b_h`` with ``W_h [D, F]``, then
  ``φ(x) = [softmax(z), softmax(−z)]`` (each softmax over the ``F`` features),
  ``2F`` features. Queries and keys have their own maps (``q_weight [H, D, F]``,
  ``q_bias [H, F]``, ``k_weight [Hkv, D, F]``, ``k_bias [Hkv, F]``), initialised to
  ``W = I`` (``F = D`` by default), ``b = 0``; they are trained by distillation.
  The raw (unscaled) q and k go in, as in LoLCATs.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

__all__ = [
    "FEATURE_MAPS",
    "FeatureMapParameters",
    "apply_feature_map",
    "check_feature_map_args",
    "check_feature_tensors",
    "feature_dim",
    "feature_map_refs",
    "orthogonal_gaussian",
    "site_seed",
]

FEATURE_MAPS = ("elu", "relu", "softmax_rf", "hedgehog")

# Which of (q_weight, q_bias, k_weight, k_bias) each map takes.
_TENSORS = {
    "elu": (False, False, False, False),
    "relu": (False, False, False, False),
    "softmax_rf": (True, False, True, False),
    "hedgehog": (True, True, True, True),
}
_TENSOR_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


def check_feature_map_args(caller: str, feature_map: object, num_features: object) -> None:
    """Check a feature-map name and its ``num_features`` (shared by configs and ops)."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"{caller}: feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}"
        )
    if num_features is None:
        return
    if feature_map in ("elu", "relu"):
        raise ValueError(
            f"{caller}: num_features must be None for feature_map {feature_map!r} (its "
            f"features are the head dim), got {num_features!r}"
        )
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(
            f"{caller}: num_features must be a positive int or None, got {num_features!r}"
        )


def feature_dim(feature_map: str, head_dim: int, num_features: int | None = None) -> int:
    """Number of features ``φ`` produces for ``head_dim``-sized inputs."""
    if feature_map in ("elu", "relu"):
        return head_dim
    if feature_map == "softmax_rf":
        return num_features or 2 * head_dim
    return 2 * (num_features or head_dim)


def check_feature_tensors(
    caller: str,
    feature_map: str,
    tensors: tuple[torch.Tensor | None, ...],
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    """Check that ``(q_weight, q_bias, k_weight, k_bias)`` are what ``feature_map`` takes."""
    wanted = _TENSORS[feature_map]
    for name, t, want in zip(_TENSOR_NAMES, tensors, wanted, strict=True):
        if want and not isinstance(t, torch.Tensor):
            raise ValueError(
                f"{caller}: feature_map {feature_map!r} needs {name} (a tensor), got {t!r}"
            )
        if not want and t is not None:
            raise ValueError(
                f"{caller}: {name} must be None for feature_map {feature_map!r}, got a tensor "
                f"of shape {tuple(t.shape)}"
            )
        if want and not t.dtype.is_floating_point:
            raise ValueError(f"{caller}: {name} must be floating-point, got dtype {t.dtype}")
    if feature_map == "softmax_rf":
        qw, _, kw, _ = tensors
        for name, t in (("q_weight", qw), ("k_weight", kw)):
            if t.dim() != 2 or t.shape[0] != head_dim:
                raise ValueError(
                    f"{caller}: {name} of softmax_rf is the projection [D, m] with D = "
                    f"{head_dim}, got shape {tuple(t.shape)}"
                )
        if qw.shape != kw.shape:
            raise ValueError(
                f"{caller}: q_weight and k_weight of softmax_rf must have one shape (the same "
                f"projection), got {tuple(qw.shape)} and {tuple(kw.shape)}"
            )
    elif feature_map == "hedgehog":
        qw, qb, kw, kb = tensors
        f = qw.shape[-1] if qw.dim() == 3 else -1
        want_shapes = {
            "q_weight": (qw, (heads, head_dim, f)),
            "q_bias": (qb, (heads, f)),
            "k_weight": (kw, (kv_heads, head_dim, f)),
            "k_bias": (kb, (kv_heads, f)),
        }
        for name, (t, shape) in want_shapes.items():
            if tuple(t.shape) != shape or f < 1:
                layout = {
                    "q_weight": "[H, D, F]",
                    "q_bias": "[H, F]",
                    "k_weight": "[Hkv, D, F]",
                    "k_bias": "[Hkv, F]",
                }[name]
                raise ValueError(
                    f"{caller}: hedgehog {name} must be {layout} with H = {heads}, Hkv = "
                    f"{kv_heads}, D = {head_dim} and one F, got shape {tuple(t.shape)}"
                )


def apply_feature_map(
    x: torch.Tensor,
    feature_map: str,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    query: bool = False,
) -> torch.Tensor:
    """``φ(x)`` for ``x [.., L, D]`` in the compute dtype; returns ``[.., L, F]``.

    ``weight``/``bias`` are the map's tensors for the heads of ``x``, broadcast
    against its leading dims: hedgehog ``[.., D, F]``/``[.., F]``, softmax_rf the
    projection ``[D, m]``. ``scale`` is the attention scale (softmax_rf folds
    ``scale^½`` into x); ``query`` selects the query form of softmax_rf.

    Example:
        >>> apply_feature_map(torch.zeros(2, 3, 4), "elu").shape
        torch.Size([2, 3, 4])
    """
    if feature_map == "elu":
        # elu(x) + 1 == exp(min(x, 0)) + max(x, 0): exp and clamp are vectorised on CPU,
        # elu's expm1 is not (about 3x slower per element with one thread).
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.exp(torch.clamp_max(x, 0.0)) + torch.clamp_min(x, 0.0)
        return torch.clamp_max(x, 0.0).exp_().add_(torch.clamp_min(x, 0.0))
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "softmax_rf":
        x = x * math.sqrt(scale)
        w = weight.to(x.dtype)
        z = (x @ w) - x.square().sum(-1, keepdim=True) * 0.5  # [.., L, m]
        if query:
            z = z - z.amax(-1, keepdim=True)
        return torch.exp(z) * (1.0 / math.sqrt(w.shape[-1]))
    if feature_map == "hedgehog":
        z = x @ weight.to(x.dtype) + bias.to(x.dtype).unsqueeze(-2)  # [.., L, F]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


def site_seed(name: str) -> int:
    """A stable seed per site name, so each site draws its own fixed projection."""
    return zlib.crc32(name.encode())


def orthogonal_gaussian(head_dim: int, num_features: int, seed: int) -> torch.Tensor:
    """``[D, m]`` projection for softmax_rf: blocks of ``D`` orthogonal directions, each
    column scaled by the norm of an independent ``D``-dim Gaussian (so every column is
    marginally Gaussian, as FAVOR+ requires), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        qmat, _ = torch.linalg.qr(g)  # orthonormal columns
        blocks.append(qmat)
    directions = torch.cat(blocks, dim=1)[:, :num_features]
    norms = torch.randn(head_dim, num_features, generator=gen, dtype=torch.float64).norm(dim=0)
    return (directions * norms).to(torch.float32)


class FeatureMapParameters(nn.Module):
    """Per-site tensors of a linearised attention, owned by the optimized model.

    * softmax_rf: buffer ``projection [D, m]`` (fixed; saved and moved with the model).
    * hedgehog: parameters ``q_weight [H, D, F]``, ``q_bias [H, F]``,
      ``k_weight [Hkv, D, F]``, ``k_bias [Hkv, F]``, initialised to the identity.
    * ``mixing``: parameter ``mix_logit [H]`` (hybrid attention's per-head gate),
      initialised to 0.

    Example:
        >>> p = FeatureMapParameters("hedgehog", heads=4, kv_heads=2, head_dim=8)
        >>> sorted(n for n, _ in p.named_parameters())
        ['k_bias', 'k_weight', 'q_bias', 'q_weight']
    """

    def __init__(
        self,
        feature_map: str,
        *,
        heads: int | None,
        kv_heads: int | None,
        head_dim: int,
        num_features: int | None = None,
        seed: int = 0,
        mixing: bool = False,
    ) -> None:
        super().__init__()
        self.feature_map = feature_map
        if feature_map == "softmax_rf":
            m = num_features or 2 * head_dim
            self.register_buffer("projection", orthogonal_gaussian(head_dim, m, seed))
        elif feature_map == "hedgehog":
            f = num_features or head_dim
            eye = torch.eye(head_dim, f)
            self.q_weight = nn.Parameter(eye.repeat(heads, 1, 1))
            self.q_bias = nn.Parameter(torch.zeros(heads, f))
            self.k_weight = nn.Parameter(eye.repeat(kv_heads, 1, 1))
            self.k_bias = nn.Parameter(torch.zeros(kv_heads, f))
        if mixing:
            self.mix_logit = nn.Parameter(torch.zeros(heads))

    def extra_repr(self) -> str:
        return f"feature_map={self.feature_map!r}"


def feature_map_refs(feature_map: str, ref: type) -> tuple:
    """``(q_weight, q_bias, k_weight, k_bias)`` op arguments as ``ref(name)`` or None."""
    if feature_map == "softmax_rf":
        return ref("projection"), None, ref("projection"), None
    if feature_map == "hedgehog":
        return tuple(ref(n) for n in _TENSOR_NAMES)
    return None, None, None, None
