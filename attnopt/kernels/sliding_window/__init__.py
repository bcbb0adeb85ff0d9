"""The ``sliding_window`` variant: each query sees a fixed window of nearby keys.

Attention cost drops from O(N²) to O(N·window) and, in causal models, the key/value
cache a query needs stops growing with the sequence. Optional sink keys (the first
few positions, which pretrained LLMs lean on heavily) keep a converted model stable
far past the window, and dilation spreads a window of the same size over a longer
range.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, Variant, register_variant
from attnopt.kernels._checks import check_window_args
from attnopt.kernels.sliding_window import op as _op  # noqa: F401  (registers the op)
from attnopt.kernels.sliding_window.blockwise import sliding_window_attention_blockwise
from attnopt.kernels.sliding_window.reference import sliding_window_attention_reference
from attnopt.site import AttentionSite, MaskKind

__all__ = [
    "SlidingWindow",
    "layer_window",
    "sliding_window_attention_blockwise",
    "sliding_window_attention_reference",
]


@register_config
@dataclasses.dataclass(frozen=True)
class SlidingWindow(AttentionConfig):
    """Sliding-window attention, optionally with attention sinks and dilation.

    Query ``i`` of ``N`` sits at key position ``p = i + M - N`` (``M`` keys; the
    queries are the last ``N`` positions, as with a key/value cache). With
    ``delta = p - j``:

    * causal sites: key ``j`` is seen iff ``0 <= delta < window * dilation`` and
      ``delta % dilation == 0``, i.e. ``window`` keys ending at the query itself;
    * bidirectional sites: iff ``|delta| < window * dilation`` and
      ``|delta| % dilation == 0`` (``window - 1`` keys on each side);
    * keys ``j < sinks`` are always seen as well (causal sites: only if ``j <= p``);
    * padding keys (``kv_mask`` False) are never seen; a query that sees no key
      outputs zeros.

    ``window >= M`` with ``dilation == 1`` is exactly dense attention.

    Args:
        window: keys in each query's window, its own position included (``>= 1``).
        sinks: leading keys every query also sees (``>= 0``, default 0).
        dilation: step between window keys (``>= 1``, default 1).

    Example:
        >>> SlidingWindow(256, sinks=4).describe()
        'SlidingWindow(window=256, sinks=4)'
    """

    variant = "sliding_window"

    window: int
    sinks: int = 0
    dilation: int = 1

    def validate(self) -> None:
        check_window_args("SlidingWindow", self.window, self.sinks, self.dilation)


def layer_window(config: SlidingWindow, site: AttentionSite) -> SlidingWindow:
    """``config`` on a site whose layer has its own sliding window (``site.window``):
    the keys both windows show, ``min(window, ceil(site.window / dilation))`` keys at
    the config's dilation (the model's window holds distances below ``site.window``).
    ``config`` itself when the site has no window. Sinks cannot be combined with a
    layer window (:func:`_supports` refuses them)."""
    if site.window is None:
        return config
    fit = -(-site.window // config.dilation)
    if config.window <= fit:
        return config
    return dataclasses.replace(config, window=fit)


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    if site.window is not None and config.sinks:
        return (
            f"this layer attends within its own sliding window of {site.window} keys, and "
            f"sinks would add keys outside it; site left as it was (use sinks=0 for "
            f"sliding-window layers, e.g. a policy entry for them)"
        )
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"sliding window cannot honour an additive bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if site.cross:
        return (
            "sliding window needs queries and keys from one sequence, but this is "
            "cross-attention; site left as dense attention"
        )
    return None


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, SlidingWindow)
    config = layer_window(config, site)
    return OpCall(
        torch.ops.attnopt.sliding_window_attention.default,
        (float(site.scale), site.causal, config.window, config.sinks, config.dilation),
    )


register_variant(
    Variant(
        SlidingWindow, supports=_supports, build=_build, accepts_bias=False, accepts_window=True
    )
)
