"""Key/value caches for token generation that are only as large as each variant needs.

One cache layer per decoder layer, chosen by the variant of that layer's attention
site (:func:`make_layer`):

* :class:`WindowLayer` (``SlidingWindow``): at most ``sinks + (window − 1)·dilation + 1``
  keys and values (``sinks + window`` without dilation), in preallocated buffers that
  new keys overwrite in place (a ring buffer after the sinks). Keys are cached after
  RoPE, so evicting one never touches the others; each slot records its absolute
  position, from which the window rule is applied
  (:mod:`attnopt.kernels.sliding_window.decode`).
* :class:`LinearLayer` (``Linear``): the running state ``S [F, Dv]`` and normaliser
  ``z [F]`` per head, O(1) per token (:mod:`attnopt.kernels.linear.decode`).
* :class:`HybridLayer` (``Hybrid``): a window ring buffer plus sinks, and the linear
  state of every key that has left the window (:mod:`attnopt.kernels.hybrid.decode`).
* :class:`FullLayer` (``BlockSparse``, ``Dense``, sites left as they were): every key,
  in buffers that grow by doubling; block-sparse decoding selects blocks over it
  (:mod:`attnopt.kernels.block_sparse.decode`).

The first call on an empty layer (the prompt) runs the variant's own op, built by the
variant's rewrite handler from the same per-site config and parameters as the graph
rewrite (:class:`SitePlan`), so a prompt is processed exactly as the optimized forward
processes it. Positions are sequence slots (left padding included), as in the graph.

:class:`AttnoptCache` is a ``transformers.Cache`` over these layers, so
``generate()`` uses it like its own caches (beam reordering included). Which keys are
padding comes from the 2-D attention mask of each forward call, handed to the cache by
:mod:`attnopt.generation` before the layers run (:meth:`AttnoptCache.set_padding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from attnopt.config import AttentionConfig
from attnopt.kernels import ParamRef, get_variant
from attnopt.kernels.block_sparse import BlockSparse
from attnopt.kernels.block_sparse.decode import block_sparse_decode_attention
from attnopt.kernels.dense.reference import compute_dtype
from attnopt.kernels.hybrid import Hybrid
from attnopt.kernels.hybrid.decode import hybrid_decode_attention
from attnopt.kernels.linear import Linear
from attnopt.kernels.linear.decode import linear_decode_step, linear_state
from attnopt.kernels.linear.feature_maps import apply_feature_map, feature_map_refs
from attnopt.kernels.linear.reference import decay_per_head
from attnopt.kernels.sliding_window import SlidingWindow
from attnopt.kernels.sliding_window.decode import (
    window_decode_attention,
    window_span,
    window_visible_positions,
)
from attnopt.site import AttentionSite

__all__ = [
    "AttnoptCache",
    "FullLayer",
    "HybridLayer",
    "LinearLayer",
    "SitePlan",
    "WindowLayer",
    "make_layer",
]


@dataclasses.dataclass
class SitePlan:
    """How one attention site runs while generating.

    ``config`` is the variant applied to the site (``None``: the site was left as it
    was and runs as exact causal attention); ``params`` the site's parameter module
    on the optimized model (feature maps, mixing gate), when the variant has one.
    """

    name: str
    site: AttentionSite
    config: AttentionConfig | None
    params: nn.Module | None = None

    @property
    def scale(self) -> float | None:
        return self.site.scale

    def tensor(self, ref: Any) -> torch.Tensor | None:
        """The site tensor a :class:`ParamRef` names (None stays None)."""
        if ref is None:
            return None
        tensors = dict(self.params.named_parameters()) | dict(self.params.named_buffers())
        return tensors[ref.name]

    def feature_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """``(q_weight, q_bias, k_weight, k_bias)`` of the site's feature map."""
        refs = feature_map_refs(self.config.feature_map, ParamRef)
        return tuple(self.tensor(r) for r in refs)

    def mix_logit(self) -> torch.Tensor | None:
        if isinstance(self.config, Hybrid) and self.config.mixing:
            return self.tensor(ParamRef("mix_logit"))
        return None

    def prefill(self, q, k, v, kv_mask, scale: float) -> torch.Tensor:
        """The site's attention over a whole prefix, through the op the graph rewrite
        inserted for it (built by the variant's own handler)."""
        if self.config is None:
            return torch.ops.attnopt.dense_attention(q, k, v, kv_mask, None, scale, True)
        calls = self.__dict__.setdefault("_calls", {})
        if scale not in calls:
            site = dataclasses.replace(self.site, scale=scale)
            calls[scale] = get_variant(self.config).build(self.config, site)
        call = calls[scale]
        extra = tuple(self.tensor(a) if isinstance(a, ParamRef) else a for a in call.extra_args)
        return call.op(q, k, v, kv_mask, None, *extra)


def _ones(batch: int, n: int, device) -> torch.Tensor:
    return torch.ones(batch, n, dtype=torch.bool, device=device)


class _Layer(CacheLayerMixin):
    """What every attnopt cache layer shares: position count, batch maps, byte count.

    ``update`` stores the new keys and returns what the attention function receives;
    ``attend`` (called right after by :func:`attnopt.generation.attnopt_attention`) runs
    the variant for the new queries.
    """

    is_sliding = False  # transformers' sliding layers imply its own mask sizes; ours are exact
    is_compileable = False
    is_croppable = False
    _batched: tuple[str, ...] = ()

    def __init__(self, plan: SitePlan) -> None:
        super().__init__()
        self.plan = plan
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size = key_states.shape[0]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        n = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.seen + n, 0

    def get_max_length(self) -> int:
        return -1

    def _map_batch(self, fn) -> None:
        for name in self._batched:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                setattr(self, name, fn(t))
        if self.is_initialized:
            self.batch_size = self.keys.shape[0] if self.keys is not None else self.state.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"attnopt cache layer for site {self.plan.name!r} cannot be cropped (it keeps only "
            f"what {self._what()} needs, so earlier states are gone); assisted decoding and "
            f"prompt lookup are not supported with attnopt caches"
        )

    def offload(self) -> None:  # the layers are small or bounded: nothing to move
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        for name in self._batched:
            setattr(self, name, None)
        self.keys = self.values = None
        self.seen = 0
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds (storage, not just the visible view)."""
        seen: set[int] = set()
        total = 0
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def _what(self) -> str:
        return self.plan.config.describe() if self.plan.config is not None else "dense attention"

    def attend(self, q, k, v, scale: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _Slots(_Layer):
    """Keys in fixed slots: ``sinks`` first positions, then a ring of ``ring`` positions."""

    _batched = ("keys", "values", "valid")

    def __init__(self, plan: SitePlan, sinks: int, ring: int) -> None:
        super().__init__(plan)
        self.sinks, self.ring = sinks, ring
        self.capacity = sinks + ring

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.lazy_initialization(k, v)
        B, Hkv, _, D = k.shape
        self.keys = k.new_zeros(B, Hkv, self.capacity, D)
        self.values = v.new_zeros(B, Hkv, self.capacity, v.shape[-1])
        self.pos = torch.full((self.capacity,), -1, dtype=torch.long, device=k.device)
        self.valid = torch.zeros(B, self.capacity, dtype=torch.bool, device=k.device)

    def _slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, slots)``: which of the new positions stay cached, and where."""
        end = int(positions[-1]) + 1
        kept = (positions < self.sinks) | (positions >= max(self.sinks, end - self.ring))
        slots = torch.where(
            positions < self.sinks, positions, self.sinks + (positions - self.sinks) % self.ring
        )
        return kept.nonzero().squeeze(-1), slots[kept]

    def _slot(self, t: int) -> int:
        return t if t < self.sinks else self.sinks + (t - self.sinks) % self.ring

    def _write_one(self, k, v, t: int, valid) -> None:
        """One new key at position ``t`` (the decode step: no index tensors)."""
        slot = self._slot(t)
        self.keys[:, :, slot] = k[:, :, 0]
        self.values[:, :, slot] = v[:, :, 0]
        self.pos[slot] = t
        self.valid[:, slot] = valid[:, 0]

    def _write(self, k, v, positions, valid) -> None:
        index, slots = self._slots(positions)
        self.keys.index_copy_(2, slots, k.index_select(2, index))
        self.values.index_copy_(2, slots, v.index_select(2, index))
        self.pos.index_copy_(0, slots, positions.index_select(0, index))
        self.valid.index_copy_(1, slots, valid.index_select(1, index))


class WindowLayer(_Slots):
    """Cache of a sliding-window site: the sinks and the last ``(window − 1)·dilation + 1``
    positions, overwritten in place."""

    def __init__(self, plan: SitePlan) -> None:
        cfg = plan.config
        assert isinstance(cfg, SlidingWindow)
        super().__init__(plan, cfg.sinks, window_span(cfg.window, cfg.dilation))
        self._pending: Any = None

    def _visible(self, q_pos, k_pos, valid) -> torch.Tensor:
        cfg = self.plan.config
        rule = window_visible_positions(
            q_pos, k_pos, window=cfg.window, sinks=cfg.sinks, dilation=cfg.dilation
        )
        return rule[None] & valid[:, None, :]  # [B, N, L]

    def update(self, key_states, value_states, valid=None, *args, **kwargs):
        k, v = key_states, value_states
        B, n = k.shape[0], k.shape[-2]
        if not self.is_initialized:
            self._allocate(k, v)
        valid = _ones(B, n, k.device) if valid is None else valid
        positions = torch.arange(self.seen, self.seen + n, device=k.device)
        if self.seen == 0:
            self._pending = ("prefill", valid)
            out = (k, v)
            self._write(k, v, positions, valid)
        elif n == 1:
            # The slot the new key takes held a key `span` back: invisible to it already.
            self._write_one(k, v, self.seen, valid)
            if self.plan.config.dilation == 1:  # every cached key is in the window or a sink
                vis = (self.pos >= 0)[None, None, :] & self.valid[:, None, :]
            else:
                vis = self._visible(positions, self.pos, self.valid)
            self._pending = ("decode", vis)
            out = (self.keys, self.values)
        else:
            kk = torch.cat([self.keys, k], dim=2)
            vv = torch.cat([self.values, v], dim=2)
            k_pos = torch.cat([self.pos, positions])
            self._pending = (
                "decode",
                self._visible(positions, k_pos, torch.cat([self.valid, valid], 1)),
            )
            out = (kk, vv)
            self._write(k, v, positions, valid)
        self.seen += n
        return out

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        mode, info = self._pending
        self._pending = None
        if mode == "prefill":
            return self.plan.prefill(q, k, v, info[:, None, :], scale)
        return window_decode_attention(q, k, v, info, scale=scale)


class FullLayer(_Layer):
    """Every key (block-sparse, dense, and sites left as they were), growing by doubling."""

    _batched = ("_k", "_v", "_valid")

    def __init__(self, plan: SitePlan) -> None:
        super().__init__(plan)
        self._pending_prefill = False

    def _grow(self, k, v, needed: int) -> None:
        cap = 0 if not self.is_initialized else self._k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 64)
        B, Hkv, _, D = k.shape
        nk = k.new_zeros(B, Hkv, new_cap, D)
        nv = v.new_zeros(B, Hkv, new_cap, v.shape[-1])
        nm = torch.zeros(B, new_cap, dtype=torch.bool, device=k.device)
        if self.is_initialized:
            nk[:, :, : self.seen] = self._k[:, :, : self.seen]
            nv[:, :, : self.seen] = self._v[:, :, : self.seen]
            nm[:, : self.seen] = self._valid[:, : self.seen]
        else:
            self.lazy_initialization(k, v)
        self._k, self._v, self._valid = nk, nv, nm

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        self._views()

    def _views(self) -> None:
        if self.is_initialized:
            self.keys = self._k[:, :, : self.seen]
            self.values = self._v[:, :, : self.seen]
            self.batch_size = self._k.shape[0]

    def update(self, key_states, value_states, valid=None, *args, **kwargs):
        k, v = key_states, value_states
        B, n = k.shape[0], k.shape[-2]
        self._pending_prefill = self.seen == 0
        self._grow(k, v, self.seen + n)
        end = self.seen + n
        self._k[:, :, self.seen : end] = k
        self._v[:, :, self.seen : end] = v
        self._valid[:, self.seen : end] = _ones(B, n, k.device) if valid is None else valid
        self.seen = end
        self._views()
        if self._pending_prefill:
            return k, v
        return self.keys, self.values

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        kv_mask = self._valid[:, None, : self.seen]
        cfg = self.plan.config
        if isinstance(cfg, BlockSparse) and q.shape[2] == 1 and not self._pending_prefill:
            return block_sparse_decode_attention(
                q,
                k,
                v,
                kv_mask,
                block=cfg.block,
                topk=cfg.topk,
                threshold=cfg.threshold,
                local_blocks=cfg.local_blocks,
                sink_blocks=cfg.sink_blocks,
                pattern=cfg.pattern,
                scale=scale,
            )
        if q.shape[2] == 1 and not self._pending_prefill and not isinstance(cfg, BlockSparse):
            # Exact attention of one query over all cached keys (all at or before it).
            return window_decode_attention(q, k, v, kv_mask, scale=scale)
        return self.plan.prefill(q, k, v, kv_mask, scale)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = self._valid = None


def _features(plan: SitePlan, x: torch.Tensor, scale: float, *, query: bool) -> torch.Tensor:
    qw, qb, kw, kb = plan.feature_tensors()
    weight, bias = (qw, qb) if query else (kw, kb)
    return apply_feature_map(
        x.to(compute_dtype(x.dtype)),
        plan.config.feature_map,
        weight=weight,
        bias=bias,
        scale=scale,
        query=query,
    )


class LinearLayer(_Layer):
    """State of a linear-attention site: ``S [B, Hs, F, Dv]`` and ``z [B, Hs, F]``."""

    _batched = ("state", "norm")

    def __init__(self, plan: SitePlan) -> None:
        super().__init__(plan)
        assert isinstance(plan.config, Linear)
        self.state = self.norm = None
        self._pending: Any = None

    def update(self, key_states, value_states, valid=None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, n = key_states.shape[0], key_states.shape[-2]
        valid = _ones(B, n, key_states.device) if valid is None else valid
        self._pending = (valid, self.state is None)
        self.seen += n
        return key_states, value_states

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        valid, first = self._pending
        self._pending = None
        cfg = self.plan.config
        H, Hkv = q.shape[1], k.shape[1]
        kf = _features(self.plan, k, scale, query=False)
        vv = v.to(kf.dtype)
        per_head = isinstance(cfg.decay, tuple) and len(cfg.decay) > 1
        log_decay = decay_per_head(cfg.decay, H, kf.dtype, q.device)
        if per_head:  # one state per query head: its own decay
            kf, vv = kf.repeat_interleave(H // Hkv, 1), vv.repeat_interleave(H // Hkv, 1)
        elif log_decay is not None:
            log_decay = log_decay[:1].expand(Hkv)
        if first:
            out = self.plan.prefill(q, k, v, valid[:, None, :], scale)
            self.state, self.norm = linear_state(kf, vv, valid, log_decay)
            return out
        qf = _features(self.plan, q, scale, query=True)
        out, self.state, self.norm = linear_decode_step(
            qf, kf, vv, self.state, self.norm, valid=valid, log_decay=log_decay, eps=cfg.eps
        )
        return out.to(q.dtype)

    def _map_batch(self, fn) -> None:
        for name in self._batched:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                setattr(self, name, fn(t))
        if self.state is not None:
            self.batch_size = self.state.shape[0]


class HybridLayer(_Slots):
    """Cache of a hybrid site: sinks and the last ``window`` keys in slots, plus the
    linear state ``(S, z)`` of every key that has left the window."""

    _batched = ("keys", "values", "valid", "state", "norm")

    def __init__(self, plan: SitePlan) -> None:
        cfg = plan.config
        assert isinstance(cfg, Hybrid)
        super().__init__(plan, cfg.sinks, cfg.window)
        self.state = self.norm = None
        self._pending: Any = None

    def update(self, key_states, value_states, valid=None, *args, **kwargs):
        k = key_states
        B, n = k.shape[0], k.shape[-2]
        first = not self.is_initialized
        if first:
            self._allocate(k, value_states)
        valid = _ones(B, n, k.device) if valid is None else valid
        self._pending = (valid, first or self.seen == 0)
        return key_states, value_states

    def _fold(self, k, v, valid, scale: float) -> None:
        """Add keys leaving the window to the linear state."""
        kf = _features(self.plan, k, scale, query=False)
        s, z = linear_state(kf, v.to(kf.dtype), valid)
        self.state, self.norm = self.state + s, self.norm + z

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        valid, first = self._pending
        self._pending = None
        start, n = self.seen, k.shape[-2]
        positions = torch.arange(start, start + n, device=k.device)
        mix = self.plan.mix_logit()
        if first:
            out = self.plan.prefill(q, k, v, valid[:, None, :], scale)
            kf = _features(self.plan, k[:, :, :0], scale, query=False)
            B, Hkv, F, Dv = k.shape[0], k.shape[1], kf.shape[-1], v.shape[-1]
            self.state = kf.new_zeros(B, Hkv, F, Dv)
            self.norm = kf.new_zeros(B, Hkv, F)
            old = (positions >= self.sinks) & (positions < start + n - self.ring)
            idx = old.nonzero().squeeze(-1)
            if idx.numel():
                self._fold(k.index_select(2, idx), v.index_select(2, idx), valid[:, idx], scale)
            self._write(k, v, positions, valid)
            self.seen += n
            return out
        qf = _features(self.plan, q, scale, query=True)
        outs = []
        for i in range(n):
            t = start + i
            if t - self.ring >= self.sinks:  # the key a window back leaves: into the state
                slot = self._slot(t)
                sl = slice(slot, slot + 1)
                self._fold(self.keys[:, :, sl], self.values[:, :, sl], self.valid[:, sl], scale)
            self._write_one(k[:, :, i : i + 1], v[:, :, i : i + 1], t, valid[:, i : i + 1])
            # Every filled slot is now a sink or in the window of position t.
            vis = (self.pos >= 0)[None, None, :] & self.valid[:, None, :]
            outs.append(
                hybrid_decode_attention(
                    q[:, :, i : i + 1],
                    self.keys,
                    self.values,
                    vis,
                    qf[:, :, i : i + 1],
                    self.state,
                    self.norm,
                    scale=scale,
                    mix_logit=mix,
                )
            )
        self.seen += n
        return torch.cat(outs, dim=2)


def make_layer(plan: SitePlan) -> _Layer:
    """The cache layer for a site's variant (see the module docstring)."""
    cfg = plan.config
    if isinstance(cfg, SlidingWindow):
        return WindowLayer(plan)
    if isinstance(cfg, Linear):
        return LinearLayer(plan)
    if isinstance(cfg, Hybrid):
        return HybridLayer(plan)
    return FullLayer(plan)


class AttnoptCache(Cache):
    """A ``transformers.Cache`` whose layers are attnopt's (one per decoder layer).

    Built by :func:`attnopt.generation.generate`; ``nbytes()`` is what it holds.
    """

    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__(layers=layers)
        self._padding: torch.Tensor | None = None
        self._valid_memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """The 2-D attention mask ``[B, past + new]`` of the forward call about to run
        (1 for tokens, 0 for padding); ``None``: no padding."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attnopt generation needs a 2-D attention_mask [batch, past + new tokens] "
                f"(1 = token, 0 = padding), got shape {tuple(attention_mask.shape)}"
            )
        self._padding = attention_mask
        self._valid_memo = None

    def _valid(self, key_states: torch.Tensor) -> torch.Tensor | None:
        if self._padding is None:
            return None
        B, n = key_states.shape[0], key_states.shape[-2]
        memo = self._valid_memo
        if memo is not None and memo[0] is self._padding and memo[1].shape == (B, n):
            return memo[1]  # the same forward call, the next layer
        mask = self._padding
        if mask.shape[0] != B or mask.shape[1] < n:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, but this step has batch {B} "
                f"and {n} new tokens; it must be [batch, past + new tokens]"
            )
        valid = mask[:, -n:].to(device=key_states.device, dtype=torch.bool)
        self._valid_memo = (mask, valid)
        return valid

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, self._valid(key_states))

    def nbytes(self) -> int:
        """Bytes of every tensor held by every layer."""
        return sum(layer.nbytes() for layer in self.layers)
