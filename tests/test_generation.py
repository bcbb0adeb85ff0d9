"""Token generation with optimized attention: generate() equals the original where the
variant is exact, each step equals a full recompute where it is not, caches stay bounded,
and what cannot decode says so."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import attnopt
from attnopt.cache import AttnoptCache, FullLayer, HybridLayer, LinearLayer, WindowLayer
from attnopt.generation import build_cache, decode_model
from attnopt.kernels.block_sparse.decode import block_sparse_decode_attention
from attnopt.kernels.block_sparse.reference import block_sparse_attention_reference
from attnopt.kernels.hybrid.decode import hybrid_decode_attention
from attnopt.kernels.hybrid.reference import hybrid_attention_reference
from attnopt.kernels.linear.decode import linear_decode_step, linear_state
from attnopt.kernels.linear.feature_maps import apply_feature_map
from attnopt.kernels.linear.reference import decay_per_head, linear_attention_reference
from attnopt.kernels.sliding_window.decode import (
    window_decode_attention,
    window_visible_positions,
)
from attnopt.kernels.sliding_window.reference import sliding_window_attention_reference
from attnopt.zoo import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPT, NEW = 9, 8
# Step logits vs a full recompute: fp32 rounding only (the variants' own definitions).
STEP_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: a thread pool only adds hand-off latency (and stalls on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama")


def _prompt(batch: int = 2, length: int = PROMPT, pad: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[1, :pad] = 0  # left padding
        ids[1, :pad] = 0
    return ids, mask


def _positions(mask):
    # generate() numbers positions from each row's first real token; so do the references.
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _greedy(model, ids, mask, new=NEW, **kw):
    kw = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": new, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


# -- generate() equals the original where the variant is exact -------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def test_greedy_with_covering_window_equals_original(name):
    model = tiny_model(name)
    fast = attnopt.optimize(model, attnopt.SlidingWindow(PROMPT + NEW, sinks=2), measure=False)
    ids, mask = _prompt()
    out = _greedy(fast, ids, mask)
    assert out.shape == (2, PROMPT + NEW)
    assert torch.equal(out, _greedy(model, ids, mask))


def test_block_sparse_keeping_every_block_equals_original(llama):
    fast = attnopt.optimize(llama, attnopt.BlockSparse(block=4, topk=16), measure=False)
    ids, mask = _prompt()
    assert torch.equal(_greedy(fast, ids, mask), _greedy(llama, ids, mask))


def test_beam_search_with_covering_window_equals_original(llama):
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(64), measure=False)
    ids, mask = _prompt()
    kw = {"num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(_greedy(fast, ids, mask, **kw), _greedy(llama, ids, mask, **kw))


def test_sampling_is_reproducible_and_equals_original_with_covering_window(llama):
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(64), measure=False)
    ids, mask = _prompt()
    kw = {"do_sample": True, "top_k": 20, "pad_token_id": 0, "max_new_tokens": NEW}

    def sample(model, seed):
        torch.manual_seed(seed)
        return model.generate(input_ids=ids, attention_mask=mask, **kw)

    first = sample(fast, 123)
    assert torch.equal(first, sample(fast, 123))
    assert torch.equal(first, sample(llama, 123))


# -- each step equals a full recompute with the variant's attention -----------------------------

STEP_CONFIGS = {
    "window4-sinks1": attnopt.SlidingWindow(4, sinks=1),
    "window3-sinks2-dilation2": attnopt.SlidingWindow(3, sinks=2, dilation=2),
    "linear-elu-decay": attnopt.Linear("elu", decay=0.9),
    "linear-relu-per-head-decay": attnopt.Linear("relu", decay=(0.9, 0.8, 0.95, 1.0)),
    "linear-softmax-rf": attnopt.Linear("softmax_rf"),
    "hybrid-window4-sinks1": attnopt.Hybrid(window=4, sinks=1),
    "hybrid-hedgehog-mixing": attnopt.Hybrid(
        window=3, sinks=0, feature_map="hedgehog", mixing=True
    ),
}


@pytest.mark.parametrize("config", list(STEP_CONFIGS.values()), ids=list(STEP_CONFIGS))
def test_each_step_equals_full_recompute(llama, config):
    ids, mask = _prompt()
    # Captured with position_ids, so the recomputes below reuse one graph.
    example = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask)}
    fast = attnopt.optimize(llama, config, example, measure=False)
    if isinstance(config, attnopt.Hybrid) and config.mixing:
        with torch.no_grad():  # away from the initial values, so the test sees them used
            for p in fast.attnopt_params.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    out = _greedy(fast, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert len(out.logits) == NEW
    with torch.no_grad():
        for i, logits in enumerate(out.logits):
            full = torch.cat([mask, torch.ones(2, i, dtype=mask.dtype)], dim=1)
            ref = fast(
                input_ids=out.sequences[:, : PROMPT + i],
                attention_mask=full,
                position_ids=_positions(full),
            ).logits[:, -1]
            err = (logits - ref).abs().max().item()
            assert err < STEP_TOL, f"step {i}: max |decode - recompute| = {err:.3e}"


def test_small_window_changes_the_output(llama):
    # The variant is really used: a 2-key window must not reproduce dense generation.
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(2), measure=False)
    ids, mask = _prompt(batch=1, length=24, pad=0)
    kw = {"output_logits": True, "return_dict_in_generate": True}
    a = _greedy(fast, ids, mask, **kw).logits[-1]
    b = _greedy(llama, ids, mask, **kw).logits[-1]
    assert (a - b).abs().max() > 1e-3


def test_block_sparse_first_step_equals_forward_and_generation_runs(llama):
    fast = attnopt.optimize(llama, attnopt.BlockSparse(block=4, topk=2), measure=False)
    ids, mask = _prompt(pad=0, length=21)
    out = _greedy(fast, ids, mask, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = fast(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert (out.logits[0] - ref).abs().max() < STEP_TOL
    assert out.sequences.shape == (2, 21 + NEW)


# -- decode kernels against the reference kernels ------------------------------------------------


def _qkv(B=2, H=4, Hkv=2, M=37, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=gen)
    k = torch.randn(B, Hkv, M, D, generator=gen)
    v = torch.randn(B, Hkv, M, D, generator=gen)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, :5] = False
    return q, k, v, mask


def test_window_decode_kernel_equals_reference_last_row():
    q, k, v, mask = _qkv()
    M = k.shape[2]
    ref = sliding_window_attention_reference(
        q, k, v, mask[:, None], window=5, sinks=2, dilation=2, causal=True
    )
    perm = torch.randperm(M)  # slot order does not matter, only positions
    vis = window_visible_positions(torch.tensor([M - 1]), perm, window=5, sinks=2, dilation=2)
    vis = vis[None] & mask[:, perm][:, None]
    out = window_decode_attention(q[:, :, -1:], k[:, :, perm], v[:, :, perm], vis, scale=8**-0.5)
    torch.testing.assert_close(out, ref[:, :, -1:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "decay", [None, 0.9, (0.9, 0.8, 0.7, 0.95)], ids=["none", "one", "per-head"]
)
def test_linear_decode_step_equals_reference(decay):
    q, k, v, mask = _qkv()
    M, P = k.shape[2], 30
    ref = linear_attention_reference(q, k, v, mask[:, None], causal=True, decay=decay)
    qf, kf = apply_feature_map(q, "elu", query=True), apply_feature_map(k, "elu")
    ld = decay_per_head(decay, 4, torch.float32)
    if isinstance(decay, tuple):
        kf, v = kf.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    elif ld is not None:
        ld = ld[:2]
    S, z = linear_state(kf[:, :, :P], v[:, :, :P], mask[:, :P], ld)
    for a, b in ((P, P + 4), (P + 4, P + 5), (P + 5, M)):  # a chunk, one token, a chunk
        out, S, z = linear_decode_step(
            qf[:, :, a:b],
            kf[:, :, a:b],
            v[:, :, a:b],
            S,
            z,
            valid=mask[:, a:b],
            log_decay=ld,
        )
        torch.testing.assert_close(out, ref[:, :, a:b], atol=1e-6, rtol=1e-5)


def test_hybrid_decode_kernel_equals_reference_last_row():
    q, k, v, mask = _qkv()
    M, W, S0 = k.shape[2], 6, 2
    ref = hybrid_attention_reference(q, k, v, mask[:, None], window=W, sinks=S0)
    p = M - 1
    pos = torch.arange(M)
    win = (pos < S0) | (pos > p - W)
    old = ~win
    kf = apply_feature_map(k, "elu") * (mask & old)[:, None, :, None]
    state, norm = kf.transpose(-1, -2) @ v, kf.sum(2)
    qf = apply_feature_map(q[:, :, -1:], "elu", query=True)
    vis = (win[None] & mask)[:, None]
    out = hybrid_decode_attention(q[:, :, -1:], k, v, vis, qf, state, norm, scale=8**-0.5)
    torch.testing.assert_close(out, ref[:, :, -1:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [{"topk": 2}, {"threshold": 0.6}, {"pattern": "a-shape"}, {"pattern": "radial"}],
    ids=["topk", "threshold", "a-shape", "radial"],
)
def test_block_sparse_decode_equals_reference_single_query(kw):
    q, k, v, mask = _qkv(M=203)
    ref = block_sparse_attention_reference(
        q[:, :, -1:], k, v, mask[:, None], block=16, causal=True, **kw
    )
    out = block_sparse_decode_attention(q[:, :, -1:], k, v, mask[:, None], block=16, **kw)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


# -- bounded memory ------------------------------------------------------------------------------


def _feed(cache: AttnoptCache, tokens: int, heads=4, kv_heads=2, dim=16):
    """Push ``tokens`` positions through every layer, as a decode loop does."""
    for _ in range(tokens):
        for layer in cache.layers:
            k, v = torch.randn(1, kv_heads, 1, dim), torch.randn(1, kv_heads, 1, dim)
            kk, vv = layer.update(k, v, None)
            layer.attend(torch.randn(1, heads, 1, dim), kk, vv, 0.25)


@pytest.mark.parametrize(
    "config,layer_type",
    [
        (attnopt.SlidingWindow(256, sinks=4), WindowLayer),
        (attnopt.Linear("elu"), LinearLayer),
        (attnopt.Hybrid(window=256, sinks=4), HybridLayer),
    ],
    ids=["sliding-window", "linear", "hybrid"],
)
def test_cache_bytes_stay_bounded(llama, config, layer_type):
    fast = attnopt.optimize(llama, config, measure=False)
    cache = build_cache(fast, decode_model(llama))
    assert all(isinstance(layer, layer_type) for layer in cache.layers)
    _feed(cache, 300)
    at_300 = cache.nbytes()
    # The window is full long before 300; the linear state never grows: a shorter run shows it.
    total = 4096 if isinstance(config, attnopt.SlidingWindow) else 1200
    _feed(cache, total - 300)
    assert cache.get_seq_length() == total
    assert cache.nbytes() == at_300
    if isinstance(config, attnopt.SlidingWindow):
        # sinks + window keys and values per layer: 2 layers x 2 x [1, 2, 260, 16] fp32
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert kv == 2 * 2 * (4 + 256) * 2 * 16 * 4


def test_full_cache_grows(llama):
    fast = attnopt.optimize(llama, attnopt.BlockSparse(block=16, topk=2), measure=False)
    cache = build_cache(fast, decode_model(llama))
    assert all(isinstance(layer, FullLayer) for layer in cache.layers)
    _feed(cache, 300)
    at_300 = cache.nbytes()
    _feed(cache, 300)
    assert cache.nbytes() > at_300


def test_generate_returns_a_bounded_cache(llama):
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(4, sinks=1), measure=False)
    ids, mask = _prompt()
    out = _greedy(fast, ids, mask, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, AttnoptCache)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    assert all(layer.keys.shape[2] == 5 for layer in cache.layers)


# -- the generation API ----------------------------------------------------------------------------


def test_streamer_receives_every_token(llama):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    fast = attnopt.optimize(llama, attnopt.SlidingWindow(4, sinks=1), measure=False)
    ids, mask = _prompt(batch=1)
    streamer = Collect()
    out = _greedy(fast, ids, mask, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == ids[0].tolist()  # the prompt first, then token by token
    assert [c[0] for c in streamer.chunks[1:]] == out[0, PROMPT:].tolist()


def test_original_model_is_left_unchanged(llama):
    before = _greedy(llama, *_prompt())
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(2), measure=False)
    _greedy(fast, *_prompt())
    assert llama.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_attnopt_layer") for m in llama.modules())
    assert not any(m._forward_pre_hooks for m in llama.modules())
    assert torch.equal(_greedy(llama, *_prompt()), before)


def test_concurrent_generation_is_independent(llama):
    fast = attnopt.optimize(llama, {"*.0.*": attnopt.SlidingWindow(3), "*": attnopt.Linear()})
    prompts = [_prompt(seed=s) for s in range(3)]
    expected = [_greedy(fast, *p) for p in prompts]
    results: dict[int, torch.Tensor] = {}

    def run(i):
        results[i] = _greedy(fast, *prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(3))


def test_mixed_policy_and_untouched_sites(llama):
    policy = {"model.layers.0.*": None, "*": attnopt.Hybrid(window=3, sinks=1)}
    fast = attnopt.optimize(llama, policy, measure=False)
    cache = build_cache(fast, decode_model(llama))
    assert [type(layer) for layer in cache.layers] == [FullLayer, HybridLayer]
    assert _greedy(fast, *_prompt()).shape == (2, PROMPT + NEW)


def test_generation_surface(llama):
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(8), measure=False)
    assert fast.can_generate()
    assert fast.config is llama.config
    assert fast.generation_config is llama.generation_config
    assert fast.device == llama.device


def test_save_pretrained_then_load_generates_the_same(llama, tmp_path):
    checkpoint = pytest.importorskip("attnopt.checkpoint")
    fast = attnopt.optimize(llama, attnopt.Hybrid(window=3, sinks=1), measure=False)
    path = fast.save_pretrained(tmp_path / "ckpt")
    again = checkpoint.load(path)
    ids, mask = _prompt()
    assert torch.equal(_greedy(again, ids, mask), _greedy(fast, ids, mask))


# -- errors --------------------------------------------------------------------------------


def _with_site(fast, **changes):
    """``fast`` with its first site's report entry changed (its own report, nothing shared)."""
    first = fast.report.sites[0]
    site = dataclasses.replace(first.site, **changes.pop("site", {}))
    fast.report.sites[0] = dataclasses.replace(first, site=site, **changes)
    return fast


def test_variant_that_cannot_decode_names_site_and_variant(llama):
    fast = _with_site(
        attnopt.optimize(llama, attnopt.SlidingWindow(4), measure=False),
        config=attnopt.Agent(num_agents=4),
        applied=True,
    )
    with pytest.raises(
        NotImplementedError, match=r"model\.layers\.0\.self_attn.*Agent.*incrementally"
    ):
        _greedy(fast, *_prompt())


def test_dense_with_additive_bias_cannot_decode(llama):
    fast = _with_site(
        attnopt.optimize(llama, attnopt.Dense(), measure=False),
        site={"mask": attnopt.MaskKind.BIAS},
    )
    with pytest.raises(NotImplementedError, match=r"model\.layers\.0\.self_attn.*Dense.*'bias'"):
        _greedy(fast, *_prompt())


def test_bad_generate_arguments(llama):
    fast = attnopt.optimize(llama, attnopt.SlidingWindow(4), measure=False)
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="use_cache=False"):
        _greedy(fast, ids, mask, use_cache=False)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="past_key_values must not be given"):
        _greedy(fast, ids, mask, past_key_values=DynamicCache())
    with pytest.raises(NotImplementedError, match="assistant_model"):
        _greedy(fast, ids, mask, assistant_model=llama)


def test_models_that_cannot_generate(llama):
    bert = attnopt.optimize(tiny_model("tiny-bert"), attnopt.Dense(), measure=False)
    assert not bert.can_generate()
    with pytest.raises(TypeError, match="cannot generate"):
        bert.generate(torch.ones(1, 4, dtype=torch.long))
    t5 = attnopt.optimize(tiny_model("tiny-t5"), attnopt.Dense(), measure=False)
    with pytest.raises(TypeError, match="encoder-decoder"):
        t5.generate(torch.ones(1, 4, dtype=torch.long))


# -- the Triton decode kernels (interpreter on CPU, the real thing on CUDA) -------------------


@pytest.mark.triton
def test_triton_window_decode_equals_pytorch(monkeypatch):
    triton_decode = pytest.importorskip("attnopt.kernels.sliding_window.triton_decode")
    calls = []
    kernel = triton_decode.decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode_attention_triton", spy)
    q, k, v, mask = _qkv(M=20)
    vis = (torch.rand(2, 1, 20) > 0.3) & mask[:, None]
    out = window_decode_attention(q[:, :, -1:], k, v, vis, scale=0.25, use_triton=True)
    ref = window_decode_attention(q[:, :, -1:], k, v, vis, scale=0.25, use_triton=False)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.triton
def test_triton_linear_decode_step_equals_pytorch():
    pytest.importorskip("attnopt.kernels.linear.triton_decode")
    q, k, v, mask = _qkv(M=20, Hkv=4)
    qf, kf = apply_feature_map(q, "elu", query=True), apply_feature_map(k, "elu")
    ld = decay_per_head((0.9, 0.8, 0.7, 0.95), 4, torch.float32)
    S, z = linear_state(kf[:, :, :19], v[:, :, :19], mask[:, :19], ld)
    args = (qf[:, :, 19:], kf[:, :, 19:], v[:, :, 19:])
    kw = {"valid": mask[:, 19:], "log_decay": ld}
    S_in = S.clone()
    out, S1, z1 = linear_decode_step(*args, S_in, z.clone(), use_triton=True, **kw)
    assert S1 is S_in  # the Triton step ran: it updates the state in place
    ref, S2, z2 = linear_decode_step(*args, S, z, use_triton=False, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S1, S2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
