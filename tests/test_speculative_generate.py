"""`leanlm.speculative.generate`, shaped like `model.generate`: the same ids as HF greedy generate for every
strategy (batch 1 and batched with left padding), streaming through transformers' streamers, sampling, errors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from leanlm.speculative import generate
from leanlm.speculative.c2t import C2TClassifier
from test_gpu_check import _float64_llama


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


@pytest.fixture(scope="module")
def llama():
    model, head = _float64_llama()
    return model.float(), head.float()


@pytest.mark.parametrize("strategy", ["chain", "static", "eagle2", "c2t"])
def test_greedy_matches_hf_generate(llama, strategy):
    model, head = llama
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    extra = {"classifier": C2TClassifier(hidden=8, feature_scaling="log"), "beta": 0.01} if strategy == "c2t" else {}
    streamer = Collect()
    out = generate(model, ids, draft=head, strategy=strategy, max_new_tokens=12, eos_token_id=[], streamer=streamer,
                   **extra)
    assert torch.equal(out, ref)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended  # the prompt first, as HF's generate does
    assert sum(streamer.chunks[1:], []) == out[0, 7:].tolist()


def test_batched_left_padded_and_text_streamer(llama, capsys):
    from transformers import TextStreamer

    from leanlm.corpus import Document
    from leanlm.data import train_bpe

    model, head = llama
    a = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, 96, (8,), generator=torch.Generator().manual_seed(5))
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = a, 1
    ids[1], mask[1] = b, 1
    out = generate(model, ids, draft=head, strategy="eagle2", attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    for row, prompt in ((0, a), (1, b)):
        ref = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[row, 8:].tolist() == ref[0, len(prompt):].tolist()
    tok = train_bpe([Document("a", "the king and the queen " * 50)], 300)
    generate(model, a[None] % len(tok), draft=head, max_new_tokens=4, eos_token_id=[],
             streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out.strip() != ""


def test_sampling_and_errors(llama):
    model, head = llama
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(6))
    out = generate(model, ids, draft=head, strategy="chain", max_new_tokens=10, do_sample=True, temperature=0.7,
                   top_k=20, eos_token_id=[], seed=3)
    again = generate(model, ids, draft=head, strategy="chain", max_new_tokens=10, do_sample=True, temperature=0.7,
                     top_k=20, eos_token_id=[], seed=3)
    assert out.shape == (1, 16) and torch.equal(out, again)  # seeded
    with pytest.raises(ValueError, match="classifier"):
        generate(model, ids, draft=head, strategy="c2t")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, draft=head, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, ids.repeat(2, 1), draft=head, streamer=Collect())
