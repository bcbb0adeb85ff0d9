"""What discovery knows about one attention site."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class MaskKind(str, enum.Enum):
    """How the scores of a site are masked, established from the graph and probing.

    ``none``: every query sees every key. ``causal``: query ``i`` sees keys up to its
    own position. ``padding``: some keys (padding) are hidden from every query.
    ``causal+padding``: both. ``bias``: a finite additive bias (relative position
    bias, ALiBi, ...), possibly with masking. ``other``: any other pattern.
    """

    NONE = "none"
    CAUSAL = "causal"
    PADDING = "padding"
    CAUSAL_PADDING = "causal+padding"
    BIAS = "bias"
    OTHER = "other"

    @property
    def causal(self) -> bool:
        return self in (MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING)

    @property
    def padding(self) -> bool:
        return self in (MaskKind.PADDING, MaskKind.CAUSAL_PADDING)

    @property
    def structured(self) -> bool:
        """True when causal flag plus a per-key mask describe the mask exactly."""
        return self not in (MaskKind.BIAS, MaskKind.OTHER)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class AttentionSite:
    """One attention found in a graph.

    Attributes:
        name: owning module's path (``model.layers.0.self_attn``), with ``#k`` added
            when one module holds several attentions.
        module_type: qualified class name of the owning module.
        spelling: ``"sdpa"`` or ``"softmax"`` (hand-written ``softmax(q·kᵀ)·v``).
        num_heads / num_kv_heads: heads of queries and of keys/values (grouped-query
            attention reports fewer kv heads); ``None`` when heads were flattened into
            the batch and could not be recovered.
        head_dim / value_dim: per-head sizes of q·k and v.
        scale: multiplier of q·kᵀ; ``None`` when it is computed at run time.
        mask: :class:`MaskKind`.
        cross: queries and keys come from different sequences.
        dropout: attention dropout probability in effect in the captured (eval) graph.
        grid: token grid ``(H, W)`` or ``(T, H, W)`` the sequence lays out, when known
            (from the model config, e.g. image and patch size); tokens beyond the grid
            (CLS, registers) come first in the sequence.
        window: for causal sites of sliding-window layers (Mistral, Gemma, Qwen2 with
            ``use_sliding_window``, ...): query ``i`` sees only the ``window`` keys
            ``i − window < j <= i`` (transformers' definition). Found in the mask when
            the example is longer than the window, else from the layer (its
            ``sliding_window`` attribute, or its config's ``sliding_window`` and
            ``layer_types``). ``None``: no window.
    """

    name: str
    module_type: str
    spelling: str
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int
    value_dim: int
    scale: float | None
    mask: MaskKind
    cross: bool = False
    dropout: float = 0.0
    grid: tuple[int, ...] | None = None
    window: int | None = None
    # How to rewrite the site in the graph it was found in (attnopt.passes.find_attention.SitePlan).
    plan: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def causal(self) -> bool:
        return self.mask.causal

    @property
    def mask_description(self) -> str:
        """The mask kind, with the sliding window if any: ``"causal+padding, window 4096"``."""
        if self.window is None:
            return self.mask.value
        return f"{self.mask.value}, window {self.window}"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}
        out["mask"] = self.mask.value
        return out
