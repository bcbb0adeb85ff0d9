"""Discovery: ``find_attention`` finds attention however it is spelled, and nothing else.

Every positive case is a tiny module whose ``attn`` submodule computes attention in
one common spelling (SDPA, hand-written matmul/bmm/baddbmm/einsum, with its masks and
casts). The site it reports is checked field by field, then ``optimize(Dense())``
must reproduce the original model to fp32 precision through the ``attnopt`` op, at
the captured sequence length and at another one. Negative cases are softmaxes that
look like attention but are not (routers, softmax over the wrong axis, reused
intermediates): nothing may be found, and ``optimize`` must refuse them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import MaskKind
from attnopt.capture import capture
from attnopt.passes.canonicalize_attention import canonicalize_attention

B, N, N_RUN, C, H, D = 2, 16, 23, 32, 4, 8  # captured at N, run again at N_RUN
KV = 2  # key/value heads of the grouped-query cases
MAX_LEN = 64  # size of the position tables (causal buffer, relative bias)
SCALE = D**-0.5
TOL = {"atol": 1e-5, "rtol": 1e-5}

aten = torch.ops.aten
DENSE_OP = torch.ops.attnopt.dense_attention.default
GONE_OPS = {aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default}


class Attn(nn.Module):
    """Projections and position tables shared by every spelling; ``spell`` does the rest.

    ``spell(self, x, mask)`` gets the input ``[B, N, C]`` and the optional mask input
    and returns ``[B, N, C]`` before the output projection.
    """

    def __init__(self, spell: Callable, kv_heads: int = H) -> None:
        super().__init__()
        self.spell = spell
        self.kv_heads = kv_heads
        self.q_proj = nn.Linear(C, H * D)
        self.k_proj = nn.Linear(C, kv_heads * D)
        self.v_proj = nn.Linear(C, kv_heads * D)
        self.o_proj = nn.Linear(H * D, C)
        self.drop = nn.Dropout(0.1)
        self.rel_bias = nn.Embedding(2 * MAX_LEN - 1, H)  # relative position bias per head
        self.register_buffer("tril", torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool).tril())

    def split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, N, heads*D] -> [B, heads, N, D]"""
        b, n, _ = t.shape
        return t.view(b, n, heads, D).transpose(1, 2)

    def qkv(self, x):
        q = self.split(self.q_proj(x), H)  # [B, H, N, D]
        k = self.split(self.k_proj(x), self.kv_heads)  # [B, Hkv, N, D]
        v = self.split(self.v_proj(x), self.kv_heads)  # [B, Hkv, N, D]
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] -> [B, N, H*D]"""
        b, _, n, _ = o.shape
        return o.transpose(1, 2).reshape(b, n, H * D)

    def relative_bias(self, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=self.tril.device)
        rel = pos[None, :] - pos[:, None] + MAX_LEN - 1  # [N, N]
        return self.rel_bias(rel).permute(2, 0, 1)  # [H, N, N]

    def forward(self, x, mask=None):
        return self.o_proj(self.spell(self, x, mask))


class Net(nn.Module):
    def __init__(self, spell: Callable, kv_heads: int = H) -> None:
        super().__init__()
        self.attn = Attn(spell, kv_heads)

    def forward(self, x, mask=None):
        return self.attn(x, mask)


# -- positive spellings: spell(m, x, mask) -> [B, N, H*D] -----------------------------------


def matmul_mul(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v)


def matmul_div(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D), -1) @ v)


def prescaled_q(m, x, mask):
    q, k, v = m.qkv(x)
    q = q * SCALE
    return m.merge((q @ k.transpose(-1, -2)).softmax(-1) @ v)


def prescaled_qk(m, x, mask):
    # Both sides scaled by d^-1/4 (guided-diffusion, Whisper): the product carries d^-1/2.
    q, k, v = m.qkv(x)
    kt = k.transpose(-2, -1) * D**-0.25
    return m.merge(F.softmax(D**-0.25 * q @ kt, dim=-1) @ v)


def kt_permute(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.softmax(q @ k.permute(0, 1, 3, 2) * SCALE, dim=-1) @ v)


def kt_projected(m, x, mask):
    # Keys projected straight into [B, H, D, N] (no transpose of a [.., N, D] key).
    q, _, v = m.qkv(x)
    b, n, _ = x.shape
    kt = m.k_proj(x).view(b, n, H, D).permute(0, 2, 3, 1)
    return m.merge(F.softmax(q @ kt * SCALE, dim=-1) @ v)


def tensor_scale(m, x, mask):
    q, k, v = m.qkv(x)
    scale = torch.full([], math.sqrt(D))
    return m.merge(F.softmax(q @ k.transpose(-2, -1) / scale, dim=-1) @ v)


def bmm_flat_heads(m, x, mask):
    q, k, v = m.qkv(x)
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))  # [B*H, N, D]
    probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * SCALE, dim=-1)
    return m.merge(torch.bmm(probs, v).view(b, h, n, d))


def baddbmm_alibi(m, x, mask):
    # Bloom: the bias is baddbmm's input and the scale its alpha.
    q, k, v = m.qkv(x)
    b, h, n, d = q.shape
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1, dtype=x.dtype) / h)  # [H]
    alibi = slopes[:, None] * torch.arange(n, dtype=x.dtype)[None, :]  # [H, M]
    alibi = alibi[None, :, None, :].expand(b, h, 1, n).reshape(b * h, 1, n)
    q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
    scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=SCALE)
    return m.merge(torch.bmm(F.softmax(scores, dim=-1), v).view(b, h, n, d))


def baddbmm_padding(m, x, mask):
    # The padding mask, additive and repeated over heads, as baddbmm's input.
    q, k, v = m.qkv(x)
    b, h, n, d = q.shape
    add = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B,1,1,M]
    add = add.expand(b, h, 1, n).reshape(b * h, 1, n)
    q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
    scores = torch.baddbmm(add, q, k.transpose(1, 2), alpha=SCALE)
    return m.merge(torch.bmm(F.softmax(scores, dim=-1), v).view(b, h, n, d))


def einsum_bhnd(m, x, mask):
    q, k, v = m.qkv(x)
    probs = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(SCALE).softmax(-1)
    return m.merge(torch.einsum("bhnm,bhmd->bhnd", probs, v))


def einsum_bnhd(m, x, mask):
    b, n, _ = x.shape
    q, k, v = (p(x).view(b, n, H, D) for p in (m.q_proj, m.k_proj, m.v_proj))  # [B, N, H, D]
    probs = torch.einsum("bnhd,bmhd->bhnm", q * SCALE, k).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v).reshape(b, n, H * D)


def einsum_bqhd(m, x, mask):
    b, n, _ = x.shape
    q, k, v = (p(x).view(b, n, H, D) for p in (m.q_proj, m.k_proj, m.v_proj))  # [B, N, H, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, -1), v).reshape(b, n, H * D)


def upcast_float(m, x, mask):
    q, k, v = m.qkv(x)
    scores = q @ k.transpose(-2, -1) * SCALE
    return m.merge(F.softmax(scores.float(), dim=-1).to(q.dtype) @ v)


def softmax_dtype_type_as(m, x, mask):
    q, k, v = m.qkv(x)
    scores = q @ k.transpose(-2, -1) * SCALE
    return m.merge(F.softmax(scores, dim=-1, dtype=torch.float32).type_as(q) @ v)


def dropout_eval(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(m.drop(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1)) @ v)


def where_causal(m, x, mask):
    q, k, v = m.qkv(x)
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    scores = torch.where(causal, q @ k.transpose(-2, -1) * SCALE, float("-inf"))
    return m.merge(F.softmax(scores, dim=-1) @ v)


def tril_buffer(m, x, mask):
    q, k, v = m.qkv(x)
    n = x.shape[1]
    scores = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~m.tril[:n, :n], float("-inf"))
    return m.merge(F.softmax(scores, dim=-1) @ v)


def masked_fill_padding(m, x, mask):
    q, k, v = m.qkv(x)
    scores = q @ k.transpose(-2, -1) * SCALE
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return m.merge(F.softmax(scores, dim=-1) @ v)


def additive_padding(m, x, mask):
    q, k, v = m.qkv(x)
    add = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B,1,1,M]
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE + add, dim=-1) @ v)


def additive_causal_padding(m, x, mask):
    q, k, v = m.qkv(x)
    n = x.shape[1]
    keep = m.tril[:n, :n][None, None] & mask[:, None, None, :].bool()  # [B, 1, N, M]
    add = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, float("-inf"))
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE + add, dim=-1) @ v)


def relative_bias(m, x, mask):
    q, k, v = m.qkv(x)
    scores = q @ k.transpose(-2, -1) * SCALE + m.relative_bias(x.shape[1])
    return m.merge(F.softmax(scores, dim=-1) @ v)


def banded(m, x, mask):
    q, k, v = m.qkv(x)
    pos = torch.arange(x.shape[1], device=x.device)
    local = (pos[:, None] - pos[None, :]).abs() <= 2  # [N, M]
    scores = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~local, float("-inf"))
    return m.merge(F.softmax(scores, dim=-1) @ v)


def multi_query(m, x, mask):
    q, k, v = m.qkv(x)  # k, v: [B, 1, N, D], broadcast over the query heads
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v)


def repeat_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    """Llama's repeat_kv: [B, Hkv, N, D] -> [B, Hkv*rep, N, D] through expand + reshape."""
    b, hkv, n, d = t.shape
    return t[:, :, None, :, :].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)


def gqa_repeat_kv(m, x, mask):
    q, k, v = m.qkv(x)
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v)


def gqa_repeat_interleave(m, x, mask):
    q, k, v = m.qkv(x)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    return m.merge(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v)


def sdpa(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.scaled_dot_product_attention(q, k, v))


def sdpa_causal_scaled(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25))


def sdpa_bool_padding(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]))


def sdpa_gqa(m, x, mask):
    q, k, v = m.qkv(x)
    return m.merge(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@dataclasses.dataclass(frozen=True)
class Case:
    spell: Callable
    mask: MaskKind = MaskKind.NONE
    mask_input: str | None = None  # "bool" or "long": a [B, N] padding mask input
    kv_heads: int = H
    scale: float = SCALE
    spelling: str = "softmax"


POSITIVE = [
    Case(matmul_mul),
    Case(matmul_div),
    Case(prescaled_q),
    Case(prescaled_qk),
    Case(kt_permute),
    Case(kt_projected),
    Case(tensor_scale),
    Case(bmm_flat_heads),
    Case(baddbmm_alibi, mask=MaskKind.BIAS),
    Case(baddbmm_padding, mask=MaskKind.PADDING, mask_input="long"),
    Case(einsum_bhnd),
    Case(einsum_bnhd),
    Case(einsum_bqhd),
    Case(upcast_float),
    Case(softmax_dtype_type_as),
    Case(dropout_eval),
    Case(where_causal, mask=MaskKind.CAUSAL),
    Case(tril_buffer, mask=MaskKind.CAUSAL),
    Case(masked_fill_padding, mask=MaskKind.PADDING, mask_input="bool"),
    Case(additive_padding, mask=MaskKind.PADDING, mask_input="long"),
    Case(additive_causal_padding, mask=MaskKind.CAUSAL_PADDING, mask_input="long"),
    Case(relative_bias, mask=MaskKind.BIAS),
    Case(banded, mask=MaskKind.OTHER),
    Case(multi_query, kv_heads=1),
    Case(gqa_repeat_kv, kv_heads=KV),
    Case(gqa_repeat_interleave, kv_heads=KV),
    Case(sdpa, spelling="sdpa"),
    Case(sdpa_causal_scaled, mask=MaskKind.CAUSAL, scale=0.25, spelling="sdpa"),
    Case(sdpa_bool_padding, mask=MaskKind.PADDING, mask_input="bool", spelling="sdpa"),
    Case(sdpa_gqa, kv_heads=KV, spelling="sdpa"),
]


def _inputs(case: Case, n: int, *, padded: bool) -> tuple:
    """Fresh inputs; with ``padded`` the mask input hides the last keys of batch 1."""
    x = torch.randn(B, n, C)
    if case.mask_input is None:
        return (x,)
    keep = torch.ones(B, n, dtype=torch.bool)
    if padded:
        keep[1, n - n // 4 :] = False  # right padding: every query still sees a key
    return (x, keep if case.mask_input == "bool" else keep.long())


def _ops(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.spell.__name__) for c in POSITIVE])
def test_finds_spelling(case: Case):
    model = Net(case.spell, case.kv_heads).eval()
    example = _inputs(case, N, padded=False)  # no padding: discovery must probe for it

    sites = attnopt.find_attention(model, example)

    assert len(sites) == 1, sites
    site = sites[0]
    assert site.name == "attn"
    assert site.spelling == case.spelling
    assert site.num_heads == H
    assert site.num_kv_heads == case.kv_heads
    assert site.head_dim == D
    assert site.value_dim == D
    assert site.scale == pytest.approx(case.scale)
    assert site.mask == case.mask
    assert not site.cross

    opt = attnopt.optimize(model, attnopt.Dense(), example)
    ops = _ops(opt.graph_module)
    assert ops.count(DENSE_OP) == 1
    assert not set(ops) & GONE_OPS
    assert [r.applied for r in opt.report] == [True]
    with torch.no_grad():
        torch.testing.assert_close(opt(*example), model(*example), **TOL)
        # Another sequence length, now with padding: the dynamic graph serves it as is.
        other = _inputs(case, N_RUN, padded=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = opt(*other)
        assert not [w for w in caught if "capturing and rewriting again" in str(w.message)]
        torch.testing.assert_close(actual, model(*other), **TOL)


@pytest.mark.parametrize("spell", [upcast_float, softmax_dtype_type_as], ids=lambda f: f.__name__)
def test_finds_upcast_spelling_in_bfloat16(spell):
    # In bf16 the casts around the softmax are real nodes in the score and prob chains.
    model = Net(spell).eval().to(torch.bfloat16)
    x = torch.randn(B, N, C, dtype=torch.bfloat16)

    (site,) = attnopt.find_attention(model, (x,))

    assert (site.name, site.num_heads, site.head_dim) == ("attn", H, D)
    assert site.scale == pytest.approx(SCALE)
    opt = attnopt.optimize(model, attnopt.Dense(), (x,))
    assert DENSE_OP in _ops(opt.graph_module)
    with torch.no_grad():
        actual = opt(x)
        assert actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual, model(x), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "spell",
    [prescaled_qk, einsum_bnhd, baddbmm_alibi, bmm_flat_heads],
    ids=lambda f: f.__name__,
)
def test_canonicalize_twice_changes_nothing(spell):
    model = Net(spell).eval()
    captured = capture(model, (torch.randn(B, N, C),))

    first = canonicalize_attention(captured.module)
    code = captured.module.code
    second = canonicalize_attention(captured.module)

    assert first.modified
    assert not second.modified and second.rewritten == {}
    assert captured.module.code == code


# -- negatives ------------------------------------------------------------------------------


class Router(nn.Module):
    """Mixture-of-experts routing: softmax over experts, top-k, weighted expert sum."""

    def __init__(self, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(C, experts))
        self.experts = nn.ModuleList(nn.Linear(C, C) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        probs = F.softmax(x @ self.w_gate, dim=-1)  # [B, N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, N, E, C]
        picked = outs.gather(-2, chosen[..., None].expand(*chosen.shape, C))
        return (weights[..., None] * picked).sum(-2)


class SoftRouter(nn.Module):
    """softmax(x @ W_gate) @ expert outputs: values depend on the input, keys are W_gate."""

    def __init__(self, experts: int = 4) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(C, experts))
        self.experts = nn.ModuleList(nn.Linear(C, C) for _ in range(experts))

    def forward(self, x):
        probs = F.softmax(x[..., None, :] @ self.w_gate, dim=-1)  # [B, N, 1, E]
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, N, E, C]
        return (probs @ outs).squeeze(-2)


class Mixture(nn.Module):
    """softmax(x @ W) @ P with both W and P parameters: a learned mixture, not attention."""

    def __init__(self, slots: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, slots))
        self.slots = nn.Parameter(torch.randn(slots, C))

    def forward(self, x):
        return F.softmax(x @ self.w, dim=-1) @ self.slots


def _scores(m, x):
    q, k, v = m.qkv(x)
    return q @ k.transpose(-2, -1) * SCALE, v


def softmax_dim_minus2(m, x, mask):
    scores, v = _scores(m, x)
    return m.merge(F.softmax(scores, dim=-2) @ v)


def softmax_dim1(m, x, mask):
    scores, v = _scores(m, x)
    return m.merge(F.softmax(scores, dim=1) @ v)


def probs_returned(m, x, mask):
    scores, v = _scores(m, x)
    probs = F.softmax(scores, dim=-1)
    return m.merge(probs @ v) + probs.mean(dim=(1, 3))[..., None]


def scores_reused(m, x, mask):
    scores, v = _scores(m, x)
    out = m.merge(F.softmax(scores, dim=-1) @ v)
    return out + scores.amax(dim=(1, 3))[..., None]


def softmax_then_mul(m, x, mask):
    # Probabilities weight the values elementwise: no P @ V product.
    scores, v = _scores(m, x)
    probs = F.softmax(scores, dim=-1)  # [B, H, N, M]
    return m.merge(probs[..., : v.shape[-1]] * v)


def softmax_then_sum(m, x, mask):
    scores, v = _scores(m, x)
    return m.merge(v * F.softmax(scores, dim=-1).sum(-1, keepdim=True))


class ProbsOutput(nn.Module):
    """Attention that also returns its probabilities (output_attentions=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn(matmul_mul)

    def forward(self, x):
        scores, v = _scores(self.attn, x)
        probs = F.softmax(scores, dim=-1)
        return self.attn.merge(probs @ v), probs


NEGATIVE = {
    "moe-router-topk": Router,
    "moe-router-soft": SoftRouter,
    "learned-mixture": Mixture,
    "softmax-dim-minus2": lambda: Net(softmax_dim_minus2),
    "softmax-dim1": lambda: Net(softmax_dim1),
    "probs-also-output": ProbsOutput,
    "probs-reused": lambda: Net(probs_returned),
    "scores-reused": lambda: Net(scores_reused),
    "softmax-then-mul": lambda: Net(softmax_then_mul),
    "softmax-then-sum": lambda: Net(softmax_then_sum),
}


@pytest.mark.parametrize("make", list(NEGATIVE.values()), ids=list(NEGATIVE))
def test_not_attention(make):
    model = make().eval()
    x = torch.randn(B, N, C)

    assert attnopt.find_attention(model, (x,)) == []
    with pytest.raises(ValueError, match="no attention found"):
        attnopt.optimize(model, attnopt.Dense(), (x,))


# -- several sites, inputs -------------------------------------------------------------------


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attn(matmul_mul), Attn(where_causal)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_one_site_per_layer_named_by_module_path():
    sites = attnopt.find_attention(TwoLayers(), (torch.randn(B, N, C),))

    assert [s.name for s in sites] == ["layers.0", "layers.1"]
    assert [s.mask for s in sites] == [MaskKind.NONE, MaskKind.CAUSAL]
    assert all(s.module_type.endswith(".Attn") for s in sites)


class TwoInOne(nn.Module):
    """One module computing two attentions (self, then causal): names get ``#k``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Attn(matmul_mul)

    def forward(self, x):
        return matmul_mul(self.a, where_causal(self.a, x, None), None)


def test_two_sites_in_one_module_are_numbered():
    sites = attnopt.find_attention(TwoInOne(), (torch.randn(B, N, H * D),))

    assert [s.name for s in sites] == ["<root>#0", "<root>#1"]
    assert [s.mask for s in sites] == [MaskKind.CAUSAL, MaskKind.NONE]


def test_keyword_inputs_find_the_same_site():
    model = Net(masked_fill_padding).eval()
    x, keep = torch.randn(B, N, C), torch.ones(B, N, dtype=torch.bool)

    by_kwargs = attnopt.find_attention(model, {"x": x, "mask": keep})
    by_args = attnopt.find_attention(model, (x, keep))

    assert [s.to_dict() for s in by_kwargs] == [s.to_dict() for s in by_args]
    assert by_kwargs[0].mask == MaskKind.PADDING


def test_model_left_unchanged():
    model = Net(dropout_eval).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    attnopt.find_attention(model, (torch.randn(B, N, C),))

    assert model.training and model.attn.drop.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_example_inputs_required_for_plain_modules():
    model = Net(matmul_mul)
    with pytest.raises(attnopt.CaptureError, match="example_inputs is required"):
        attnopt.find_attention(model)
    with pytest.raises(attnopt.CaptureError, match="example_inputs is required"):
        attnopt.optimize(model, attnopt.Dense())


def test_example_inputs_as_list_rejected():
    with pytest.raises(TypeError, match="got a list"):
        attnopt.find_attention(Net(matmul_mul), [torch.randn(B, N, C)])


def test_example_inputs_must_match_forward():
    with pytest.raises(TypeError, match="inputs do not match"):
        attnopt.find_attention(Net(matmul_mul), {"y": torch.randn(B, N, C)})
