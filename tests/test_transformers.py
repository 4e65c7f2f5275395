"""attn_implementation="attnext" in Hugging Face transformers against "sdpa" on the same
weights: tiny random-init GPT-2, Llama (grouped-query heads) and Mistral (a sliding window
shorter than the prompt), no downloads. Logits (unpadded, left- and right-padded batches),
greedy generate token for token (KV-cache decoding: bottom-right), and the gradients of a
training step; which path each call took (stats, explain); masks attnext hands to sdpa.

Skipped when transformers is not installed (pip install 'attnext[hf]').
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnext  # noqa: E402
import attnext.integrations.transformers as attnext_hf  # noqa: E402

attnext_hf.register()

VOCAB = 97


def _configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gpt2": GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                           embd_pdrop=0.0, **common),
        "llama": LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, max_position_embeddings=64, **common),
        "mistral": MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                                 intermediate_size=64, max_position_embeddings=64, sliding_window=5, **common),
    }


def _pair(name):
    """The same random weights with attn_implementation "sdpa" and "attnext"."""
    cfg = _configs()[name]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnext")
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "attnext" and ref.config._attn_implementation == "sdpa"
    return ref.eval(), ours.eval()


def _batch(padding, B=3, T=11):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -4:] = 0
        mask[2, -1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, (None if padding == "none" else mask)


MODELS = ["gpt2", "llama", "mistral"]


def _native_calls(fn):
    before = dict(attnext_hf.stats)
    out = fn()
    return out, attnext_hf.stats["attnext"] - before["attnext"], attnext_hf.stats["sdpa"] - before["sdpa"]


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_sdpa(name, padding):
    ref, ours = _pair(name)
    ids, mask = _batch(padding)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got, native, delegated = _native_calls(lambda: ours(ids, attention_mask=mask).logits)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)  # padded rows too: zeros in both
    if attnext.native_available() and attnext.kernels_enabled():
        assert native == 2 and delegated == 0


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_identical(name, padding):
    """Prefill then KV-cache decoding (bottom-right rows; left-padded keys sliced per entry)."""
    ref, ours = _pair(name)
    ids, mask = _batch(padding)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = ref.generate(ids, attention_mask=mask, **kw)
    got, native, delegated = _native_calls(lambda: ours.generate(ids, attention_mask=mask, **kw))
    assert torch.equal(got, expected)
    assert got.shape[1] == ids.shape[1] + 12
    if attnext.native_available() and attnext.kernels_enabled():
        assert native == 2 * 12 and delegated == 0


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients(name, padding):
    ref, ours = _pair(name)
    ref.train()
    ours.train()
    ids, mask = _batch(padding)
    labels = ids.masked_fill(ids == 0, -100)
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    loss = ours(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.grad is None:
            assert a.grad is None, n
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_attention_forward_convention():
    """Called directly as transformers calls sdpa_attention_forward: output (B, T, H, E), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    q = torch.randn(2, 6, 5, 8)
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool).tril(diagonal=4)  # decoding: bottom-right
    mask[1, ..., :3] = False  # left padding of entry 1
    for m in (None, mask):
        out, w = attnext_hf.attention_forward(module, q, k, v, m, dropout=0.0, scaling=0.5)
        exp, _ = sdpa_attention_forward(module, q, k, v, m, dropout=0.0, scaling=0.5)
        assert w is None and out.shape == (2, 5, 6, 8) and out.is_contiguous()
        torch.testing.assert_close(out, exp, atol=2e-6, rtol=2e-5)
        if attnext.native_available() and attnext.kernels_enabled():
            assert attnext_hf.explain(module, q, k, v, m) == []


@pytest.mark.parametrize("kind", ["float", "holes", "per_head"])
def test_other_masks_go_to_sdpa(kind):
    """Masks attnext does not express: sdpa runs them, unchanged, and explain says why."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    if kind == "float":
        m = torch.zeros(2, 1, 5, 5).masked_fill(~causal, float("-inf"))
        words = "not a boolean"
    elif kind == "holes":
        m = causal.clone().expand(2, 1, 5, 5).clone()
        m[0, 0, 4, 1] = False
        words = "batch entry 0"
    else:
        m = causal.expand(2, 2, 5, 5)
        words = "shape"
    reasons = attnext_hf.explain(module, q, k, v, m)
    assert reasons and words in reasons[0]
    (out, _), native, delegated = _native_calls(lambda: attnext_hf.attention_forward(module, q, k, v, m))
    assert (native, delegated) == (0, 1)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, m)[0], atol=0, rtol=0)


def test_register_name():
    from transformers import AttentionInterface

    assert attnext_hf.register("attnext_custom_name") == "attnext_custom_name"
    assert AttentionInterface._global_mapping["attnext_custom_name"] is attnext_hf.attention_forward


def test_small_calls_go_to_sdpa(monkeypatch):
    """A call without dropout whose query elements x keys is under ops._SDPA_SMALL_WORK
    (the suite sets 0) is transformers' sdpa itself: attnext's Python layers would cost
    more than its kernel saves. explain says so; dropout or a larger call keeps attnext."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(attnext.ops, "_SDPA_SMALL_WORK", 3 << 19)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64)
    reasons = attnext_hf.explain(module, q, k, v, None)
    assert reasons and "small call" in reasons[0]
    (out, _), native, delegated = _native_calls(lambda: attnext_hf.attention_forward(module, q, k, v, None))
    assert (native, delegated) == (0, 1)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, None)[0], atol=0, rtol=0)
    assert not any("small call" in r for r in attnext_hf.explain(module, q, k, v, None, dropout=0.1))
    big = torch.randn(1, 8, 64, 64), torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)  # 2.1M
    assert not any("small call" in r for r in attnext_hf.explain(module, *big, None))
