"""Models whose own layers attend within a sliding window (Mistral, Qwen2 with
``use_sliding_window``, Gemma): discovery reports the window, only variants that honour
it rewrite those layers, and forward and generation stay the original model's."""

from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.passes.find_attention import causal_window, keys_present
from attnopt.site import MaskKind

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WINDOW = 8
_DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    attn_implementation="sdpa",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mistral(window: int = WINDOW, seed: int = 0):
    import transformers as t

    torch.manual_seed(seed)
    return t.MistralForCausalLM(t.MistralConfig(**_DECODER, sliding_window=window)).eval()


def _qwen2_mixed():
    """Layer 0 full attention, layer 1 a sliding window."""
    import transformers as t

    torch.manual_seed(1)
    cfg = t.Qwen2Config(
        **_DECODER,
        use_sliding_window=True,
        sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention"],
    )
    return t.Qwen2ForCausalLM(cfg).eval()


def _ids(batch: int = 2, length: int = 32, pad: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        mask[1, :pad] = 0  # left padding
        ids[1, :pad] = 0
    return ids, mask


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _real_rows(logits, mask):
    return logits[mask.bool()]


# -- discovery --------------------------------------------------------------------------------


def test_window_found_in_the_mask_of_a_long_example():
    ids, mask = _ids(length=32)
    sites = attnopt.find_attention(_mistral(), {"input_ids": ids, "attention_mask": mask})
    assert [s.window for s in sites] == [WINDOW, WINDOW]
    assert all(s.mask.causal for s in sites)
    assert "window 8" in sites[0].mask_description


def test_window_from_the_layer_when_the_example_is_shorter_than_it():
    ids, mask = _ids(length=6, pad=2)
    sites = attnopt.find_attention(_mistral(), {"input_ids": ids, "attention_mask": mask})
    assert [s.window for s in sites] == [WINDOW, WINDOW]


def test_window_per_layer_type():
    ids, mask = _ids(length=32)
    sites = attnopt.find_attention(_qwen2_mixed(), {"input_ids": ids, "attention_mask": mask})
    assert [s.window for s in sites] == [None, WINDOW]


def test_models_without_window_report_none():
    sites = attnopt.find_attention(attnopt.zoo.tiny_model("tiny-mistral"))
    assert [s.window for s in sites] == [None, None]


# -- the mask classifier on its own -----------------------------------------------------------


def _window_mask(n, m, window, padding):
    q = torch.arange(n)[:, None] + (m - n)
    k = torch.arange(m)[None, :]
    keep = (k <= q) & (k > q - window) & padding[:, None, :]
    return torch.where(keep, 0.0, float("-inf"))[:, None]  # [B, 1, N, M]


@pytest.mark.parametrize("seed", range(6))
def test_causal_window_recovers_random_windows_with_padding(seed):
    gen = torch.Generator().manual_seed(seed)
    m = int(torch.randint(6, 40, (), generator=gen))
    n = int(torch.randint(2, m + 1, (), generator=gen))
    window = int(torch.randint(1, m, (), generator=gen))
    padding = torch.ones(2, m, dtype=torch.bool)
    pad = int(torch.randint(0, max(1, m // 4), (), generator=gen))
    padding[0, :pad] = False  # left padding
    bias = _window_mask(n, m, window, padding)
    assert causal_window(bias) == window  # row 1, unpadded, shows the whole window
    # Keys not padding, from each key's own query row (the last row sees only its window);
    # keys before the first query as the first query sees them.
    steps = (("add", ("ref", 0), 1.0),)
    present = keys_present(steps, (bias,), n, m)[:, 0]
    off = m - n
    expected = padding.clone()
    expected[:, :off] &= torch.arange(off) > off - window
    assert torch.equal(present, expected)


def test_causal_window_rejects_other_masks():
    gen = torch.Generator().manual_seed(0)
    n = 16
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    plain = torch.where(tri, 0.0, float("-inf"))
    assert causal_window(plain) is None  # no window: plain causal
    band = tri & ~torch.ones(n, n, dtype=torch.bool).tril(-4)
    noisy = band.clone()
    noisy[10, 2] = True  # one key outside the band
    assert causal_window(torch.where(noisy, 0.0, float("-inf"))) is None
    rand = torch.rand(n, n, generator=gen) > 0.5
    assert causal_window(torch.where(rand | torch.eye(n, dtype=torch.bool), 0.0, -1e9)) is None
    biased = torch.where(band, torch.randn(n, n, generator=gen), float("-inf"))
    assert causal_window(biased) is None  # a finite bias is not a window
    assert causal_window(torch.where(band, 0.0, float("-inf"))) == 4


# -- rewriting sliding-window layers ----------------------------------------------------------


def test_sliding_window_of_the_layers_size_is_exact():
    model = _mistral()
    ids, mask = _ids()
    fast = attnopt.optimize(
        model, attnopt.SlidingWindow(WINDOW), {"input_ids": ids, "attention_mask": mask}
    )
    assert len(fast.report.applied) == 2
    ids2, mask2 = _ids(length=40, pad=7, seed=1)  # fresh inputs, longer than the example
    ref, got = _forward(model, ids2, mask2), _forward(fast, ids2, mask2)
    torch.testing.assert_close(_real_rows(got, mask2), _real_rows(ref, mask2), atol=1e-5, rtol=0)


def test_wider_sliding_window_keeps_the_layers_window():
    model = _mistral()
    ids, mask = _ids()
    fast = attnopt.optimize(model, attnopt.SlidingWindow(64), {"input_ids": ids})
    ref, got = _forward(model, ids, mask), _forward(fast, ids, mask)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(ref, mask), atol=1e-5, rtol=0)


def test_narrower_sliding_window_equals_a_model_with_that_window():
    # Independent reference: the same weights with transformers' own window of 4.
    model, narrow = _mistral(WINDOW), _mistral(4)
    narrow.load_state_dict(model.state_dict())
    ids, mask = _ids()
    fast = attnopt.optimize(model, attnopt.SlidingWindow(4), {"input_ids": ids})
    ref, got = _forward(narrow, ids, mask), _forward(fast, ids, mask)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(ref, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config, words",
    [
        (attnopt.SlidingWindow(4, sinks=2), "sinks"),
        (attnopt.Linear(), "sliding window (8 keys"),
        (attnopt.BlockSparse(block=4, topk=2), "sliding window (8 keys"),
        (attnopt.Hybrid(window=4, sinks=0), "sliding window (8 keys"),
    ],
)
def test_variants_that_cannot_honour_the_window_leave_the_layer(config, words):
    model = _mistral()
    ids, _ = _ids()
    fast = attnopt.optimize(model, config, {"input_ids": ids}, measure=False)
    assert not fast.report.applied
    assert all(words in r.reason for r in fast.report.sites)
    _, mask = _ids()
    ref, got = _forward(model, ids, mask), _forward(fast, ids, mask)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(ref, mask), atol=1e-5, rtol=0)


def test_report_shows_the_window():
    fast = attnopt.optimize(_mistral(), attnopt.SlidingWindow(WINDOW), measure=False)
    assert "window 8" in str(fast.report)
    assert fast.report.to_dict()["sites"][0]["site"]["window"] == WINDOW


# -- generation -------------------------------------------------------------------------------


def _greedy(model, ids, mask, new=14):
    return model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=new
    )


@pytest.mark.parametrize("policy", [{"*": None}, attnopt.SlidingWindow(WINDOW)])
def test_generation_keeps_the_layers_window(policy):
    model = _mistral()
    ids, mask = _ids(length=12, pad=3)  # 12 + 14 tokens: well past the window
    fast = attnopt.optimize(model, policy, {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(_greedy(fast, ids, mask), _greedy(model, ids, mask))


def test_generation_with_mixed_layers_equals_original():
    model = _qwen2_mixed()
    ids, mask = _ids(length=12, pad=3)
    fast = attnopt.optimize(model, {"*": None}, {"input_ids": ids, "attention_mask": mask})
    assert [s.window for s in (r.site for r in fast.report.sites)] == [None, WINDOW]
    assert torch.equal(_greedy(fast, ids, mask), _greedy(model, ids, mask))


def test_mask_kind_of_window_sites_is_causal():
    ids, mask = _ids()
    sites = attnopt.find_attention(_mistral(), {"input_ids": ids, "attention_mask": mask})
    assert {s.mask for s in sites} <= {MaskKind.CAUSAL, MaskKind.CAUSAL_PADDING}
