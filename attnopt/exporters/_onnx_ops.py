"""ONNX translations of the ``attnopt::`` attention ops that keep each variant's cost.

``torch.onnx.export(dynamo=True)`` calls each function here once per op node, with
the node's tensors as symbolic ONNX values and its other arguments (scale, causal,
window, ...) as plain Python values, so the graph each one builds is specialised to
the site's settings while every batch and sequence size stays dynamic.

Layout (as everywhere in attnopt): ``q [B, H, N, D]``, ``k [B, Hkv, M, D]``,
``v [B, Hkv, M, Dv]``, ``kv_mask`` bool broadcastable to ``[B, H, M]``; queries are
the last ``N`` of the ``M`` positions (bottom-right causal alignment); a query that
sees no key outputs zeros. Everything is computed in fp32.

How each variant keeps its complexity (no ``[N, M]`` tensor except in ``dense``):

* ``sliding_window``: positions are padded to whole blocks of ``window`` (per
  dilation residue class: a dilated window is ``dilation`` interleaved undilated
  ones) and each query block attends to its own key block and the previous one (and
  the next one, bidirectional), plus the sink keys: scores are
  ``[.., N/window, window, 2·window + sinks]``.
* ``linear``: non-causal is two matmuls through the ``[F, Dv + 1]`` state; causal is
  chunked: ``[C, C]`` blocks inside each chunk plus the exclusive ``CumSum`` of the
  chunk states (with decay: a ``[N/C, N/C]`` matrix of decay powers instead, which
  never overflows; ``N/C`` is small).
* ``hybrid``: the sliding-window blocks for the window and sinks, the causal linear
  scan over keys shifted by ``window`` positions for the older keys, combined under
  one normaliser in log space as in :mod:`attnopt.kernels.hybrid.reference`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

__all__ = [
    "dense_attention",
    "dense_attention_opset23",
    "hybrid_attention",
    "linear_attention",
    "sliding_window_attention",
]

_FLOAT = onnx.TensorProto.FLOAT
_INF = float("inf")


# -- small builders ------------------------------------------------------------------------------


def _ints(*values: int):
    return op.Constant(value_ints=[int(x) for x in values])


def _int(value: int):
    return op.Constant(value_int=int(value))


def _f(value: float):
    return op.Constant(value_float=float(value))


def _const(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(np.ascontiguousarray(array)))


def _dim(x, axis: int):
    """``x.shape[axis]`` as an int64 tensor ``[1]`` (a non-negative ``axis``)."""
    return op.Shape(x, start=axis, end=axis + 1)


def _rank(x) -> int:
    """Rank of a graph input (values made by ops here may carry no shape)."""
    return len(x.shape)


def _dtype(x):
    return getattr(x, "dtype", None)


def _to_float(x):
    import onnx_ir as ir

    return x if _dtype(x) == ir.DataType.FLOAT else op.Cast(x, to=_FLOAT)


def _restore(out, like):
    import onnx_ir as ir

    dt = _dtype(like)
    if dt is None or dt == ir.DataType.FLOAT:
        return out
    return op.Cast(out, to=int(dt))


def _shape(*parts):
    return op.Concat(*parts, axis=0)


def _slice(x, start, end, axis: int):
    """``x[start:end]`` along ``axis``; ``start``/``end`` are ints or int64 ``[1]`` tensors."""
    s = _ints(start) if isinstance(start, int) else start
    e = _ints(end) if isinstance(end, int) else end
    return op.Slice(x, s, e, _ints(axis))


def _pad_seq(x, front, back, axis: int = 2, value=None):
    """Pad ``x`` along ``axis`` by ``front``/``back`` positions (int64 ``[1]`` tensors)."""
    if value is None:
        return op.Pad(x, _shape(front, back), None, _ints(axis))
    return op.Pad(x, _shape(front, back), value, _ints(axis))


def _ceil_to(n, multiple: int):
    """``ceil(n / multiple) * multiple`` for an int64 ``[1]`` tensor ``n >= 0``."""
    m = _ints(multiple)
    return op.Mul(op.Div(op.Add(n, _ints(multiple - 1)), m), m)


def _repeat_kv(x, heads, kv_heads):
    """``[B, Hkv, M, E]`` to ``[B, H, M, E]`` (grouped-query attention); ``heads`` and
    ``kv_heads`` are ints when static, else the query's head count as a ``[1]`` tensor
    and None. A no-op when the head counts are known to match."""
    hq = heads if isinstance(heads, int) else None
    hk = kv_heads if isinstance(kv_heads, int) else None
    if hq is not None and hk is not None and hq == hk:
        return x
    hq_t = _ints(hq) if hq is not None else heads
    rep = op.Div(hq_t, _dim(x, 1))
    x5 = op.Unsqueeze(x, _ints(2))  # [B, Hkv, 1, M, E]
    ones = _ints(1)
    x5 = op.Expand(x5, _shape(ones, ones, rep, ones, ones))
    return op.Reshape(x5, _shape(_dim(x, 0), hq_t, _dim(x, 2), _dim(x, 3)))


def _heads(q):
    return q.shape[1] if isinstance(q.shape[1], int) else _dim(q, 1)


def _kv_heads(k):
    return k.shape[1] if isinstance(k.shape[1], int) else None


def _key_keep(kv_mask, q, k):
    """``kv_mask`` as bool ``[B, H, M]`` (or None)."""
    if kv_mask is None:
        return None
    m = kv_mask
    if _dtype(m) is not None and str(_dtype(m)) != "BOOL":
        m = op.Cast(m, to=onnx.TensorProto.BOOL)
    for _ in range(3 - _rank(kv_mask)):
        m = op.Unsqueeze(m, _ints(0))
    return op.Expand(m, _shape(_dim(q, 0), _dim(q, 1), _dim(k, 2)))


def _masked(scores, visible):
    return op.Where(visible, scores, _f(-_INF))


def _softmax_parts(scores):
    """Stabilised ``(m, exp(scores - m))`` over the last axis; rows that are all
    ``-inf`` get ``m = 0`` and weights 0 (so they output zeros, not NaN)."""
    m = op.ReduceMax(scores, _ints(-1), keepdims=1)
    m = op.Where(op.IsInf(m), _f(0.0), m)
    return m, op.Exp(op.Sub(scores, m))


def _divide_rows(num, den):
    """``num / den`` with rows whose ``den`` is 0 set to 0."""
    safe = op.Where(op.Greater(den, _f(0.0)), den, _f(1.0))
    return op.Div(num, safe)


def _tr(x, r: int):
    """Swap the last two axes of a rank-``r`` value."""
    perm = list(range(r - 2)) + [r - 1, r - 2]
    return op.Transpose(x, perm=perm)


# -- dense ----------------------------------------------------------------------------------------


def _dense_visible(q, k, kv_mask, causal):
    """Bool ``[B|1, H|1, N, M]`` visibility (causal bottom-right, padding) or None."""
    visible = None
    if causal:
        n, m = op.Squeeze(_dim(q, 2)), op.Squeeze(_dim(k, 2))
        pos = op.Add(op.Range(_int(0), n, _int(1)), op.Sub(m, n))  # [N]
        keys = op.Range(_int(0), m, _int(1))  # [M]
        visible = op.LessOrEqual(op.Unsqueeze(keys, _ints(0)), op.Unsqueeze(pos, _ints(1)))
    keep = _key_keep(kv_mask, q, k)
    if keep is not None:
        keep = op.Unsqueeze(keep, _ints(2))  # [B, H, 1, M]
        visible = keep if visible is None else op.And(visible, keep)
    return visible


def _bias4(bias):
    b = _to_float(bias)
    for _ in range(4 - _rank(bias)):
        b = op.Unsqueeze(b, _ints(0))
    return b


def dense_attention(q, k, v, kv_mask, bias, scale: float, causal: bool):
    """``attnopt::dense_attention`` as MatMul / Softmax (exact; ``[N, M]`` scores)."""
    qf, kf, vf = _to_float(q), _to_float(k), _to_float(v)
    heads = _heads(q)
    kf, vf = _repeat_kv(kf, heads, _kv_heads(k)), _repeat_kv(vf, heads, _kv_heads(k))
    scores = op.Mul(op.MatMul(qf, _tr(kf, 4)), _f(scale))  # [B, H, N, M]
    if bias is not None:
        scores = op.Add(scores, _bias4(bias))
    visible = _dense_visible(q, k, kv_mask, causal)
    if visible is not None:
        scores = _masked(scores, visible)
    out = op.MatMul(op.Softmax(scores, axis=-1), vf)
    if visible is not None or bias is not None:
        # Softmax of a row that is all -inf is NaN; attnopt's contract is zeros.
        row_max = op.ReduceMax(scores, _ints(-1), keepdims=1)
        out = op.Where(op.Greater(row_max, _f(-_INF)), out, _f(0.0))
    return _restore(out, q)


def _first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def dense_attention_opset23(q, k, v, kv_mask, bias, scale: float, causal: bool):
    """``attnopt::dense_attention`` through the ONNX ``Attention`` operator (opset 23+).

    The mask is built here (bottom-right causal alignment, padding, bias) rather
    than with ``is_causal``, whose alignment differs between runtimes when ``N != M``.
    """
    qf, kf, vf = _to_float(q), _to_float(k), _to_float(v)
    visible = _dense_visible(q, k, kv_mask, causal)
    mask = None
    if bias is not None:
        mask = _bias4(bias)
        if visible is not None:
            mask = _masked(mask, visible)
    elif visible is not None:
        mask = visible
        if kv_mask is None:  # causal only: [N, M]
            mask = op.Unsqueeze(mask, _ints(0, 1))
    # Attention has four outputs (Y, present K/V, scores); only Y is used.
    if mask is None:
        out = _first(op23.Attention(qf, kf, vf, scale=float(scale)))
    else:
        out = _first(op23.Attention(qf, kf, vf, mask, scale=float(scale)))
        if bias is not None:
            valid = op.Greater(op.ReduceMax(mask, _ints(-1), keepdims=1), _f(-_INF))
        else:
            valid = op.Cast(op.ReduceMax(op.Cast(mask, to=_FLOAT), _ints(-1), keepdims=1), to=9)
        out = op.Where(valid, out, _f(0.0))
    return _restore(out, q)


# -- blocked window attention (sliding window and hybrid's window part) -------------------------


class _Blocks:
    """Positions ``0..P-1`` (``P`` a multiple of ``window·dilation``) in the blocked
    layout ``[.., d, nb, W, E]``: position ``(b·W + r)·d + ρ`` sits at residue ``ρ``,
    block ``b``, row ``r`` (``W = window``, ``d = dilation``; ``d == 1`` drops the
    residue axis)."""

    def __init__(self, window: int, dilation: int, length):
        self.W, self.d = window, dilation
        self.G = window * dilation
        self.P = _ceil_to(length, self.G)
        self.nb = op.Div(self.P, _ints(self.G))

    def to_blocks(self, x, extra_blocks: int = 0):
        """``x [B, H, P + extra·G, E]`` → ``[B, H, (d,) nb + extra, W, E]``."""
        b, h, e = _dim(x, 0), _dim(x, 1), _dim(x, 3)
        nb = op.Add(self.nb, _ints(extra_blocks)) if extra_blocks else self.nb
        W, d = _ints(self.W), _ints(self.d)
        if self.d == 1:
            return op.Reshape(x, _shape(b, h, nb, W, e))
        x = op.Reshape(x, _shape(b, h, op.Mul(nb, W), d, e))
        x = op.Transpose(x, perm=[0, 1, 3, 2, 4])  # [B, H, d, P/d, E]
        return op.Reshape(x, _shape(b, h, d, nb, W, e))

    def from_blocks(self, x):
        """``[B, H, (d,) nb, W, E]`` → ``[B, H, P, E]``."""
        b, h, e = _dim(x, 0), _dim(x, 1), _dim(x, _rank_of_blocks(self) - 1)
        if self.d == 1:
            return op.Reshape(x, _shape(b, h, self.P, e))
        d = _ints(self.d)
        x = op.Reshape(x, _shape(b, h, d, op.Div(self.P, d), e))
        x = op.Transpose(x, perm=[0, 1, 3, 2, 4])
        return op.Reshape(x, _shape(b, h, self.P, e))

    @property
    def block_axis(self) -> int:
        return 2 if self.d == 1 else 3

    def band(self, x, length, bidirectional: bool, value=None):
        """Keys (or a key mask) ``x [B, H, M, E]`` as the band each query block sees:
        ``[B, H, (d,) nb, 2W (3W bidirectional), E]`` (previous, own, next block)."""
        back = op.Sub(self.P, length)
        if bidirectional:
            back = op.Add(back, _ints(self.G))
        x = _pad_seq(x, _ints(self.G), back, value=value)
        blocks = self.to_blocks(x, extra_blocks=2 if bidirectional else 1)
        ax = self.block_axis
        parts = [
            _slice(blocks, 0, self.nb, ax),
            _slice(blocks, _ints(1), op.Add(self.nb, _ints(1)), ax),
        ]
        if bidirectional:
            parts.append(_slice(blocks, _ints(2), op.Add(self.nb, _ints(2)), ax))
        return op.Concat(*parts, axis=ax + 1)

    def positions(self):
        """Position of each blocked row: int64 ``[(d,) nb, W]``."""
        pos = op.Range(_int(0), op.Squeeze(self.P), _int(1))
        pos = op.Reshape(pos, _shape(_ints(1, 1), self.P, _ints(1)))
        blocks = self.to_blocks(pos)
        return op.Squeeze(blocks, _ints(0, 1, _rank_of_blocks(self) - 1))


def _rank_of_blocks(blocks: _Blocks) -> int:
    return 5 if blocks.d == 1 else 6


def _window_pattern(window: int, bidirectional: bool) -> np.ndarray:
    """Bool ``[W, 2W]`` (``[W, 3W]``): row ``r`` sees band key ``c`` iff the distance in
    window steps ``δ = r + W − c`` is in the window."""
    W = window
    r = np.arange(W)[:, None]
    c = np.arange(3 * W if bidirectional else 2 * W)[None, :]
    delta = r + W - c
    if bidirectional:
        return np.abs(delta) < W
    return (delta >= 0) & (delta < W)


def _window_terms(
    qf, kf, vf, keep, *, scale, causal, window, sinks, dilation, log_g=None, normalized=False
):
    """Window + sink softmax terms per query, in sequence layout.

    ``qf [B, H, N, D]``, ``kf/vf [B, H, M, .]`` (heads already repeated), ``keep``
    bool ``[B, H, M]`` or None. Returns ``(m, den, num)``: ``[B, H, N, 1]``,
    ``[B, H, N, 1]``, ``[B, H, N, Dv]`` with ``den = Σ exp(s − m)``,
    ``num = Σ exp(s − m)·v`` over the keys each query sees (``m`` is 0 and ``den`` 0
    for a query that sees none); ``log_g`` (``[1, H, 1]``-broadcastable to the
    scores after unsqueezing) is added to every score when given. With
    ``normalized=True`` it returns the attention output ``[B, H, N, Dv]`` instead,
    through the fused ``Softmax`` (faster than the separate max/exp/sum).
    """
    n, m_len = _dim(qf, 2), _dim(kf, 2)
    shift = op.Max(op.Sub(m_len, n), _ints(0))  # queries are the last N positions
    blk = _Blocks(window, dilation, m_len)
    bidirectional = not causal

    q_al = _pad_seq(qf, shift, op.Sub(blk.P, m_len))  # [B, H, P, D]
    qb = op.Mul(blk.to_blocks(q_al), _f(scale))  # [B, H, (d,) nb, W, D]
    kb = blk.band(kf, m_len, bidirectional)  # [B, H, (d,) nb, 2W, D]
    vb = blk.band(vf, m_len, bidirectional)

    # Which band keys exist: inside [0, M), not padding, not a sink (sinks come apart).
    # Carried as 0/1 floats [B|1, H|1, M, 1], so the zero padding of the band marks
    # positions outside [0, M) as absent.
    rank = _rank_of_blocks(blk)
    valid = op.Expand(_f(1.0), m_len)  # [M]
    if sinks:
        pos_k = op.Range(_int(0), op.Squeeze(m_len), _int(1))
        valid = op.Cast(op.GreaterOrEqual(pos_k, _int(sinks)), to=_FLOAT)
    if keep is not None:
        valid = op.Mul(valid, op.Cast(keep, to=_FLOAT))  # [B, H, M]
    else:
        valid = op.Unsqueeze(valid, _ints(0, 1))  # [1, 1, M]
    vband = blk.band(op.Unsqueeze(valid, _ints(-1)), m_len, bidirectional)
    vband = op.Greater(op.Squeeze(vband, _ints(rank - 1)), _f(0.5))  # [B|1, H|1, .., nb, 2W]
    vband = op.Unsqueeze(vband, _ints(rank - 2))  # [.., nb, 1, 2W]
    pattern = _const(_window_pattern(window, bidirectional))  # [W, 2W]
    visible = op.And(vband, pattern)

    scores = _masked(op.MatMul(qb, _tr(kb, rank)), visible)  # [B, H, (d,) nb, W, 2W]
    parts, values = [scores], [vb]
    if sinks:
        s_len = op.Min(m_len, _ints(sinks))
        ks = _slice(kf, _ints(0), s_len, 2)  # [B, H, S, D]
        vs = _slice(vf, _ints(0), s_len, 2)
        for _ in range(rank - 4):
            ks, vs = op.Unsqueeze(ks, _ints(2)), op.Unsqueeze(vs, _ints(2))
        s_scores = op.MatMul(qb, _tr(ks, rank))  # [B, H, (d,) nb, W, S]
        sink_pos = op.Range(_int(0), op.Squeeze(s_len), _int(1))  # [S]
        s_vis = None
        if causal:
            q_pos = op.Unsqueeze(blk.positions(), _ints(-1))  # [(d,) nb, W, 1]
            s_vis = op.LessOrEqual(sink_pos, q_pos)
        if keep is not None:
            ksink = _slice(keep, _ints(0), s_len, 2)  # [B, H, S]
            for _ in range(rank - 3):
                ksink = op.Unsqueeze(ksink, _ints(2))
            s_vis = ksink if s_vis is None else op.And(s_vis, ksink)
        if s_vis is not None:
            s_scores = _masked(s_scores, s_vis)
        parts.append(s_scores)
        values.append(vs)
    allsc = op.Concat(*parts, axis=-1) if len(parts) > 1 else parts[0]
    if log_g is not None:
        g = log_g
        for _ in range(rank - 3):
            g = op.Unsqueeze(g, _ints(-1))
        allsc = op.Add(allsc, g)

    def back(x):
        seq = blk.from_blocks(x)  # [B, H, P, E]
        return _slice(seq, shift, op.Add(shift, n), 2)

    if normalized:
        w = op.Softmax(allsc, axis=-1)
    else:
        m, w = _softmax_parts(allsc)
        den = op.ReduceSum(w, _ints(-1), keepdims=1)
    if len(values) == 1:
        num = op.MatMul(w, vb)
    else:
        band_len = 3 * window if bidirectional else 2 * window
        wb = _slice(w, 0, band_len, rank - 1)
        ws = _slice(w, band_len, 1 << 62, rank - 1)
        num = op.Add(op.MatMul(wb, vb), op.MatMul(ws, values[1]))
    if normalized:
        # Softmax of a row that sees no key is NaN; attnopt's contract is zeros.
        seen = op.Greater(op.ReduceMax(allsc, _ints(-1), keepdims=1), _f(-_INF))
        return back(op.Where(seen, num, _f(0.0)))
    return back(m), back(den), back(num)


def sliding_window_attention(
    q, k, v, kv_mask, bias, scale: float, causal: bool, window: int, sinks: int, dilation: int
):
    """``attnopt::sliding_window_attention`` as blocked attention (O(N·window))."""
    if bias is not None:
        raise ValueError("attnopt::sliding_window_attention: bias must be None")
    qf, kf, vf = _to_float(q), _to_float(k), _to_float(v)
    heads, kv_heads = _heads(q), _kv_heads(k)
    kf, vf = _repeat_kv(kf, heads, kv_heads), _repeat_kv(vf, heads, kv_heads)
    keep = _key_keep(kv_mask, q, k)
    out = _window_terms(
        qf,
        kf,
        vf,
        keep,
        scale=scale,
        causal=causal,
        window=window,
        sinks=sinks,
        dilation=dilation,
        normalized=True,
    )
    return _restore(out, q)


# -- feature maps and linear attention ----------------------------------------------------------


def _feature_map(x, feature_map: str, weight, bias, scale: float, query: bool):
    """``φ(x)`` for ``x [B, h, L, D]`` (as :func:`attnopt.kernels.linear.feature_maps.
    apply_feature_map`); the weights are graph initializers."""
    if feature_map == "elu":
        return op.Add(op.Elu(x), _f(1.0))
    if feature_map == "relu":
        return op.Relu(x)
    if feature_map == "softmax_rf":
        xs = op.Mul(x, _f(math.sqrt(scale)))
        w = _to_float(weight)
        sq = op.ReduceSum(op.Mul(xs, xs), _ints(-1), keepdims=1)
        z = op.Sub(op.MatMul(xs, w), op.Mul(sq, _f(0.5)))  # [.., L, m]
        if query:
            z = op.Sub(z, op.ReduceMax(z, _ints(-1), keepdims=1))
        m = op.Cast(_dim(w, 1), to=_FLOAT)
        return op.Div(op.Exp(z), op.Sqrt(m))
    if feature_map == "hedgehog":
        z = op.Add(op.MatMul(x, _to_float(weight)), op.Unsqueeze(_to_float(bias), _ints(-2)))
        return op.Concat(op.Softmax(z, axis=-1), op.Softmax(op.Neg(z), axis=-1), axis=-1)
    raise ValueError(f"unknown feature_map {feature_map!r}")


def _log_decay(decay, heads: int):
    """``log λ`` per head as a constant ``[H]`` (float64 log, then fp32), or None when
    there is no decay (or every ``λ`` is 1)."""
    if decay is None:
        return None
    values = list(decay)
    if all(float(x) == 1.0 for x in values):
        return None
    if len(values) == 1:
        values = values * heads
    return np.log(np.asarray(values, dtype=np.float64)).astype(np.float32)


def _causal_linear(qf, kf, vv, *, chunk: int, log_decay: np.ndarray | None):
    """Inclusive causal linear attention ``Σ_{j<=p} φq·φk λ^(p−j) [v, 1]`` per query.

    ``qf [B, H, N, F]`` (the last N positions), ``kf [B, H, M, F]`` (already masked),
    ``vv [B, H, M, E]``. Returns ``[B, H, N, E]``. Chunks of ``chunk`` positions:
    ``[C, C]`` blocks inside a chunk, chunk states from an exclusive ``CumSum``
    (with decay, a ``[nc, nc]`` matrix of decay powers).
    """
    C = chunk
    n, m_len = _dim(qf, 2), _dim(kf, 2)
    shift = op.Max(op.Sub(m_len, n), _ints(0))
    P = _ceil_to(m_len, C)
    nc = op.Div(P, _ints(C))
    tail = op.Sub(P, m_len)
    q_al = _pad_seq(qf, shift, tail)
    k_p, v_p = _pad_seq(kf, _ints(0), tail), _pad_seq(vv, _ints(0), tail)

    def chunks(x):
        return op.Reshape(x, _shape(_dim(x, 0), _dim(x, 1), nc, _ints(C), _dim(x, 3)))

    qc, kc, vc = chunks(q_al), chunks(k_p), chunks(v_p)  # [B, H, nc, C, .]
    r = np.arange(C)
    tri = r[:, None] >= r[None, :]  # [C, C] lower triangle
    a = op.MatMul(qc, _tr(kc, 5))  # [B, H, nc, C, C]
    if log_decay is None:
        a = op.Mul(a, _const(tri.astype(np.float32)))
        states = op.MatMul(_tr(kc, 5), vc)  # [B, H, nc, F, E]
        prefix = op.CumSum(states, _int(2), exclusive=1)
        q_in = qc
    else:
        ld = log_decay.astype(np.float64)[:, None, None]  # [H, 1, 1]
        dist = (r[:, None] - r[None, :]).astype(np.float64)
        dmat = np.where(tri, np.exp(np.where(tri, dist, 0.0) * ld), 0.0)  # [H, C, C]
        a = op.Mul(a, _const(dmat.astype(np.float32)[None, :, None]))
        k_w = np.exp((C - 1 - r).astype(np.float64) * ld).astype(np.float32)  # [H, 1, C]
        kdec = op.Mul(kc, _const(k_w[None, :, :, :, None]))  # λ^(C−1−s)
        states = op.MatMul(_tr(kdec, 5), vc)  # [B, H, nc, F, E]
        # prefix_c = Σ_{c'<c} λ^(C·(c−1−c')) K_c'; every power is of λ <= 1.
        ci = op.Range(_int(0), op.Squeeze(nc), _int(1))
        gap = op.Sub(op.Unsqueeze(ci, _ints(1)), op.Unsqueeze(ci, _ints(0)))  # c − c'
        expo = op.Mul(op.Cast(op.Sub(gap, _int(1)), to=_FLOAT), _f(float(C)))
        lam = _const(log_decay.astype(np.float32)[:, None, None])  # [H, 1, 1]
        wmat = op.Where(
            op.Greater(gap, _int(0)),
            op.Exp(op.Mul(op.Max(expo, _f(0.0)), lam)),
            _f(0.0),
        )  # [H, nc, nc]
        b, h, f, e = _dim(states, 0), _dim(states, 1), _dim(states, 3), _dim(states, 4)
        flat = op.Reshape(states, _shape(b, h, nc, op.Mul(f, e)))
        prefix = op.Reshape(op.MatMul(wmat, flat), _shape(b, h, nc, f, e))
        q_w = np.exp((r + 1).astype(np.float64) * ld).astype(np.float32)  # λ^(r+1)
        q_in = op.Mul(qc, _const(q_w[None, :, :, :, None]))
    out = op.Add(op.MatMul(a, vc), op.MatMul(q_in, prefix))  # [B, H, nc, C, E]
    seq = op.Reshape(out, _shape(_dim(out, 0), _dim(out, 1), P, _dim(out, 4)))
    return _slice(seq, shift, op.Add(shift, n), 2)


def _linear_inputs(q, k, v, kv_mask, scale, feature_map, tensors):
    qw, qb, kw, kb = tensors
    qf, kf, vf = _to_float(q), _to_float(k), _to_float(v)
    phi_q = _feature_map(qf, feature_map, qw, qb, scale, query=True)  # [B, H, N, F]
    phi_k = _feature_map(kf, feature_map, kw, kb, scale, query=False)  # [B, Hkv, M, F]
    heads, kv_heads = _heads(q), _kv_heads(k)
    phi_k, vf = _repeat_kv(phi_k, heads, kv_heads), _repeat_kv(vf, heads, kv_heads)
    return qf, kf, vf, phi_q, phi_k, _key_keep(kv_mask, q, k)


def _with_ones(vf):
    ones = op.Expand(_f(1.0), _shape(_dim(vf, 0), _dim(vf, 1), _dim(vf, 2), _ints(1)))
    return op.Concat(vf, ones, axis=-1)  # [B, H, M, Dv + 1]: the normaliser rides along


def _split_last(x, dv):
    return _slice(x, _ints(0), dv, 3), _slice(x, dv, op.Add(dv, _ints(1)), 3)


def linear_attention(
    q,
    k,
    v,
    kv_mask,
    bias,
    scale: float,
    causal: bool,
    feature_map: str,
    chunk: int,
    decay: Any,
    eps: float,
    q_weight,
    q_bias,
    k_weight,
    k_bias,
):
    """``attnopt::linear_attention``: two matmuls (bidirectional) or the chunked causal
    scan; O(N·(C + F)·F)."""
    if bias is not None:
        raise ValueError("attnopt::linear_attention: bias must be None")
    tensors = (q_weight, q_bias, k_weight, k_bias)
    _, _, vf, phi_q, phi_k, keep = _linear_inputs(q, k, v, kv_mask, scale, feature_map, tensors)
    if keep is not None:
        phi_k = op.Mul(phi_k, op.Unsqueeze(op.Cast(keep, to=_FLOAT), _ints(-1)))
    vv = _with_ones(vf)
    dv = _dim(vf, 3)
    if causal:
        heads = q.shape[1] if isinstance(q.shape[1], int) else None
        log_decay = _log_decay(decay, heads) if decay is not None else None
        if log_decay is not None and heads is None:
            raise ValueError("linear attention with decay needs a static head count to export")
        o = _causal_linear(phi_q, phi_k, vv, chunk=chunk, log_decay=log_decay)
    else:
        state = op.MatMul(_tr(phi_k, 4), vv)  # [B, H, F, Dv + 1]
        o = op.MatMul(phi_q, state)  # [B, H, N, Dv + 1]
    num, den = _split_last(o, dv)
    return _restore(op.Div(num, op.Add(den, _f(eps))), q)


# -- hybrid -------------------------------------------------------------------------------------


def hybrid_attention(
    q,
    k,
    v,
    kv_mask,
    bias,
    scale: float,
    causal: bool,
    window: int,
    sinks: int,
    feature_map: str,
    chunk: int,
    q_weight,
    q_bias,
    k_weight,
    k_bias,
    mix_logit,
):
    """``attnopt::hybrid_attention``: blocked window softmax + causal linear scan over the
    keys older than the window, one normaliser (log space)."""
    if bias is not None:
        raise ValueError("attnopt::hybrid_attention: bias must be None")
    if not causal:
        raise ValueError("attnopt::hybrid_attention: causal must be True")
    tensors = (q_weight, q_bias, k_weight, k_bias)
    qf, _, vf, phi_q, phi_k, keep = _linear_inputs(q, k, v, kv_mask, scale, feature_map, tensors)
    kf = _repeat_kv(_to_float(k), _heads(q), _kv_heads(k))
    log_g = log_1g = None
    if mix_logit is not None:
        t = _to_float(mix_logit)
        log_g = op.Reshape(op.Neg(op.Softplus(op.Neg(t))), _ints(1, -1, 1))  # [1, H, 1]
        log_1g = op.Reshape(op.Neg(op.Softplus(t)), _ints(1, -1, 1, 1))
    m_w, den_w, num_w = _window_terms(
        qf,
        kf,
        vf,
        keep,
        scale=scale,
        causal=True,
        window=window,
        sinks=sinks,
        dilation=1,
        log_g=log_g,
    )
    # Older keys sinks <= j <= p − window: key j moves to position j + window, and an
    # inclusive causal scan at p then sums exactly those keys.
    m_len = _dim(k, 2)
    pos_k = op.Range(_int(0), op.Squeeze(m_len), _int(1))
    old = op.GreaterOrEqual(pos_k, _int(sinks))  # [M]
    w_old = op.Cast(old, to=_FLOAT)
    if keep is not None:
        w_old = op.Mul(w_old, op.Cast(keep, to=_FLOAT))  # [B, H, M]
    else:
        w_old = op.Unsqueeze(w_old, _ints(0, 1))  # [1, 1, M]
    phi_k = op.Mul(phi_k, op.Unsqueeze(w_old, _ints(-1)))
    vv = _with_ones(vf)
    shifted_k = _slice(_pad_seq(phi_k, _ints(window), _ints(0)), _ints(0), m_len, 2)
    shifted_v = _slice(_pad_seq(vv, _ints(window), _ints(0)), _ints(0), m_len, 2)
    lin = _causal_linear(phi_q, shifted_k, shifted_v, chunk=chunk, log_decay=None)
    num_l, den_l = _split_last(lin, _dim(vf, 3))

    has_lin = op.Greater(den_l, _f(0.0))
    den_safe = op.Where(has_lin, den_l, _f(1.0))
    ell = op.Where(has_lin, op.Log(den_safe), _f(-_INF))
    if log_1g is not None:
        ell = op.Add(ell, log_1g)
    # The window part's stabiliser: m_w (0 where it saw nothing, den_w then 0).
    win_max = op.Where(op.Greater(den_w, _f(0.0)), m_w, _f(-_INF))
    m = op.Max(win_max, ell)
    m = op.Where(op.IsInf(m), _f(0.0), m)
    a_w = op.Exp(op.Sub(win_max, m))
    a_l = op.Exp(op.Sub(ell, m))
    num = op.Add(op.Mul(num_w, a_w), op.Mul(op.Div(a_l, den_safe), num_l))
    den = op.Add(op.Mul(den_w, a_w), a_l)
    return _restore(_divide_rows(num, den), q)
