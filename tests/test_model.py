"""The model core: incremental decoding matches a full forward, generate(), save/load, Auto classes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from leanlm import LeanLMConfig, LeanLMForCausalLM
from leanlm.cache import LeanCache


def small_model(seed: int = 0, **kw) -> LeanLMForCausalLM:
    torch.manual_seed(seed)
    args = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    args.update(kw)
    return LeanLMForCausalLM(LeanLMConfig(**args)).eval()


@settings(max_examples=12, deadline=None)
@given(kv=st.sampled_from([1, 2, 4, 8]), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       tied=st.booleans(), bias=st.booleans())
def test_incremental_decoding_matches_full_forward(kv, chunks, tied, bias):
    model = small_model(num_attention_heads=8, num_key_value_heads=kv, tie_word_embeddings=tied,
                        attention_bias=bias).double()
    total = sum(chunks)
    x = torch.randint(0, 97, (2, total))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache, outs, pos = LeanCache(2), [], 0
        for c in chunks:  # prefill and decode in arbitrary chunk sizes
            outs.append(model(x[:, pos : pos + c], past_key_values=cache, use_cache=True).logits)
            pos += c
    inc = torch.cat(outs, dim=1)
    assert cache.get_seq_length() == total
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-10)


def test_cache_crop_rolls_back():
    model = small_model()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        cache = LeanCache(2)
        model(x[:, :10], past_key_values=cache, use_cache=True)
        cache.crop(6)
        assert cache.get_seq_length() == 6
        rolled = model(x[:, 6:12], past_key_values=cache, use_cache=True).logits
        full = model(x, use_cache=False).logits[:, 6:]
    torch.testing.assert_close(rolled, full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_equals_argmax_loop():
    model = small_model()
    x = torch.randint(1, 97, (2, 5))
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    seq = x
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_seeded_and_valid():
    model = small_model()
    x = torch.randint(1, 97, (1, 4))
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.0, top_k=10, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(3)
    a = model.generate(x, **kw)
    torch.manual_seed(3)
    b = model.generate(x, **kw)
    torch.manual_seed(4)
    c = model.generate(x, **kw)
    assert torch.equal(a, b) and a.shape == (1, 24)
    assert not torch.equal(a, c)
    assert int(a.max()) < 97


def test_left_padded_batch_matches_single_prompts():
    model = small_model()
    p1, p2 = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 3))
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    batch[0], mask[0] = p1[0], 1
    batch[1, 4:], mask[1, 4:] = p2[0], 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    both = model.generate(batch, attention_mask=mask, **kw)
    one = model.generate(p1, **kw)
    two = model.generate(p2, **kw)
    assert torch.equal(both[0, 7:], one[0, 7:])
    assert torch.equal(both[1, 7:], two[0, 3:])


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip_with_auto_classes(tmp_path, tied):
    model = small_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path, local_files_only=True).model_type == "leanlm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, LeanLMForCausalLM)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    tied_now = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied_now == tied


def test_labels_give_shifted_cross_entropy():
    model = small_model()
    x = torch.randint(0, 97, (2, 10))
    out = model(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_hidden_states_and_gradient_flow():
    model = small_model().train()
    x = torch.randint(0, 97, (2, 10))
    out = model(x, labels=x, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 10, 64)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_same_logits_as_transformers_llama(kv):
    from leanlm.interop import to_llama

    model = small_model(num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=kv != 2)
    twin = to_llama(model).eval()
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, rtol=1e-5, atol=1e-5)
