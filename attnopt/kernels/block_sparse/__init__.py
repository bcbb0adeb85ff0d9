"""The ``block_sparse`` variant: each query block attends only a few key blocks.

Training-free sparsity for long sequences. Attention of pretrained models is
concentrated: on the diagonal, on the first positions (sinks) and on a few
content-dependent blocks. Keeping only those blocks cuts the cost from ``O(N·M)`` to
``O(N·kept·block)``. The kept blocks come either from a static pattern (A-shape:
sinks plus a local band; Radial Attention's energy-decay mask) or, dynamically per
input, from a cheap pooled estimate of the attention map (DraftAttention, MoBA /
VMoBA, MInference): mean-pool Q and K per block, score the blocks, keep the top-k or
the smallest set holding a given share of the estimated mass.
"""

from __future__ import annotations

import dataclasses

import torch

from attnopt.config import AttentionConfig, register_config
from attnopt.kernels import OpCall, Variant, register_variant
from attnopt.kernels.block_sparse import op as _op  # noqa: F401  (registers the op)
from attnopt.kernels.block_sparse.gather import block_sparse_attention_gather
from attnopt.kernels.block_sparse.reference import block_sparse_attention_reference
from attnopt.kernels.block_sparse.selection import (
    BlockLayout,
    BlockSelection,
    block_layout,
    check_block_sparse_args,
    select_blocks,
)
from attnopt.site import AttentionSite, MaskKind

__all__ = [
    "BlockLayout",
    "BlockSelection",
    "BlockSparse",
    "block_layout",
    "block_sparse_attention_gather",
    "block_sparse_attention_reference",
    "select_blocks",
]


@register_config
@dataclasses.dataclass(frozen=True)
class BlockSparse(AttentionConfig):
    """Block-sparse attention over key blocks chosen per query block.

    Positions are cut into blocks of ``block``; in causal attention query ``i`` of
    ``N`` sits at key position ``i + M - N`` and query blocks line up with key blocks.
    Every query block keeps:

    * its *local* band: the diagonal key block and ``local_blocks - 1`` blocks back
      (bidirectional sites: also as many forward), and the first ``sink_blocks``
      key blocks;
    * ``pattern="a-shape"``: nothing more;
    * ``pattern="radial"``: beyond the local band, distance band ``k >= 1``
      (``local_blocks·2**(k-1) <= distance < local_blocks·2**k`` blocks) keeps every
      ``2**k``-th block from its start: density halves as the distance doubles,
      ``O(log n)`` blocks per row;
    * ``pattern="dynamic"``: from Q and K mean-pooled per block (padding keys left
      out), the block logit ``pooled_q·pooled_k·scale + log(visible keys)``; then
      ``topk``: ``max(topk, #local+sink)`` blocks in all, the best-scoring added to the
      local and sink ones; or ``threshold``: the smallest set, local and sink blocks
      first, then by logit, whose estimated softmax mass reaches ``threshold``.

    Causal sites never keep a future block, and the diagonal block is masked
    token by token; padding keys are never seen; blocks of only padding are never
    picked dynamically. Exactly one of ``topk`` / ``threshold`` must be given for
    ``"dynamic"`` (there is no default budget: it sets the speed/accuracy trade-off
    and depends on the sequence length), and neither for the static patterns.
    ``topk >= ceil(M / block)`` or ``threshold=1.0`` is exactly dense attention.

    Args:
        block: positions per block (default 64).
        topk: key blocks kept per query block (``>= 1``), local and sink included.
        threshold: estimated attention mass to keep, in ``(0, 1]``.
        local_blocks: blocks of the local band, the diagonal included (``>= 1``).
        sink_blocks: leading key blocks always kept (``>= 0``, default 1).
        pattern: ``"dynamic"`` (default), ``"a-shape"`` or ``"radial"``.

    Example:
        >>> BlockSparse(topk=8).describe()
        'BlockSparse(topk=8)'
    """

    variant = "block_sparse"

    block: int = 64
    topk: int | None = None
    threshold: float | None = None
    local_blocks: int = 1
    sink_blocks: int = 1
    pattern: str = "dynamic"

    def validate(self) -> None:
        check_block_sparse_args(
            "BlockSparse",
            self.block,
            self.topk,
            self.threshold,
            self.local_blocks,
            self.sink_blocks,
            self.pattern,
        )


def _supports(config: AttentionConfig, site: AttentionSite) -> str | None:
    if site.mask in (MaskKind.BIAS, MaskKind.OTHER):
        return (
            f"block-sparse attention cannot honour an additive bias or arbitrary mask "
            f"(mask kind '{site.mask}'); site left as dense attention"
        )
    if site.cross and site.causal:
        return (
            "block-sparse attention aligns query and key blocks by position, which causal "
            "cross-attention does not define; site left as dense attention"
        )
    return None


def _build(config: AttentionConfig, site: AttentionSite) -> OpCall:
    assert isinstance(config, BlockSparse)
    return OpCall(
        torch.ops.attnopt.block_sparse_attention.default,
        (
            float(site.scale),
            site.causal,
            config.block,
            config.topk,
            None if config.threshold is None else float(config.threshold),
            config.local_blocks,
            config.sink_blocks,
            config.pattern,
        ),
    )


register_variant(Variant(BlockSparse, supports=_supports, build=_build, accepts_bias=False))
