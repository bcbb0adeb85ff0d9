"""Attention variants: one folder each, registered here by config type.

Every variant folder holds ``reference.py`` (plain PyTorch, the truth), an efficient
CPU path, ``op.py`` (the ``attnopt::`` custom op with its fake and autograd) and, in
``__init__.py``, its config and a :class:`Variant` registered with
:func:`register_variant`. The rewrite pass looks handlers up by config type, so a
new variant needs no change to the passes.

The op boundary uses the SDPA layout, stated once here for every variant:

* ``q``: ``[B, H, N, D]``; ``k``: ``[B, Hkv, M, D]``; ``v``: ``[B, Hkv, M, Dv]``;
  ``H % Hkv == 0`` (grouped-query attention without repeating K/V).
* ``kv_mask``: optional bool, broadcastable to ``[B, H, M]``; ``False`` keys are
  never attended (padding).
* ``bias``: optional float, broadcastable to ``[B, H, N, M]``, added to the scaled
  scores (only variants that accept arbitrary biases take it).
* ``causal``: query ``i`` sits at key position ``i + M - N`` (bottom-right aligned)
  and sees keys at or before it.
* A query row with no visible key returns zeros (SDPA would return NaN).
* Output: ``[B, H, N, Dv]`` in the dtype of ``q``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attnopt.kernels._cpp import cpp_kernels_disabled, cpp_kernels_enabled

if TYPE_CHECKING:
    from attnopt._compat import OpOverload
    from attnopt.config import AttentionConfig
    from attnopt.site import AttentionSite

__all__ = [
    "OpCall",
    "ParamRef",
    "Variant",
    "cpp_kernels_disabled",
    "cpp_kernels_enabled",
    "get_variant",
    "register_variant",
    "registered_variants",
]


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """Stands in :attr:`OpCall.extra_args` for a tensor of the site's parameter module
    (``name`` as in ``module.named_parameters()`` / ``named_buffers()``)."""

    name: str


@dataclasses.dataclass(frozen=True)
class OpCall:
    """What a variant asks the rewrite to insert in place of one attention site.

    ``op`` is called as ``op(q, k, v, kv_mask, bias, *extra_args)``; the rewrite
    supplies the first five from the site, the variant the rest (scale, causal,
    its own settings, in the op's order). A :class:`ParamRef` in ``extra_args``
    becomes the named tensor of the site's parameter module.
    """

    op: OpOverload
    extra_args: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one config type is applied to a site.

    ``supports(config, site)`` returns ``None`` when the variant can honour the
    site exactly as the config asks, or a one-line reason it cannot (the site is
    then left as it was and the reason is reported). ``build(config, site)``
    returns the :class:`OpCall` to insert; ``site.scale`` is already a float
    (any dynamic scale has been folded into ``q`` by the rewrite).
    Sites whose mask is structured (``site.mask.structured``) reach the op as a
    causal flag plus ``kv_mask`` with ``bias=None``; other sites reach it with the
    whole additive ``bias`` and ``kv_mask=None``, which only variants with
    ``accepts_bias=True`` may take (``supports`` must refuse the rest).

    Sites of sliding-window layers (``site.window`` set) reach only variants with
    ``accepts_window=True``, whose ``supports`` and ``build`` must honour the window;
    for the others the site is left as it was, with the reason.

    ``parameters(config, site)``, when given, returns a new ``nn.Module`` holding
    the site's trainable tensors (feature maps, gates); the optimized model owns it
    (so it trains, moves and saves with the model) and ``build`` refers to its
    tensors with :class:`ParamRef`.
    """

    config_type: type
    supports: Callable[[AttentionConfig, AttentionSite], str | None]
    build: Callable[[AttentionConfig, AttentionSite], OpCall]
    accepts_bias: bool = False
    accepts_window: bool = False
    parameters: Callable[[AttentionConfig, AttentionSite], Any] | None = None


_VARIANTS: dict[type, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    if variant.config_type in _VARIANTS:
        raise ValueError(f"a variant for {variant.config_type.__name__} is already registered")
    _VARIANTS[variant.config_type] = variant
    return variant


def get_variant(config: AttentionConfig) -> Variant:
    try:
        return _VARIANTS[type(config)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in _VARIANTS))
        raise TypeError(
            f"no rewrite is registered for {type(config).__name__}; known variants: {known}"
        ) from None


def registered_variants() -> dict[type, Variant]:
    return dict(_VARIANTS)
