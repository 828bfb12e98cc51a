"""Long-context tasks and position-bucket perplexity, checked with models whose behaviour is known exactly."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_corpus
from leanlm.evals.longctx import TASKS, Generator, evaluate_longctx, position_perplexity, sentences

V = 128


class AsciiTokenizer:
    """One token per ASCII character."""

    eos_token_id, pad_token_id, bos_token_id = 0, 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % V for c in text]}


class InductionLM(torch.nn.Module):
    """Predicts the token that followed the latest earlier occurrence of the longest (<= 8) suffix ending here,
    i.e. perfect n-gram induction: it can recall a planted line when the question repeats its wording."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=100_000)

    def forward(self, input_ids, attention_mask=None, **kw):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, V)
        for r in range(b):
            x = input_ids[r].tolist()
            seen: list[dict] = [dict() for _ in range(9)]
            for i in range(t):
                for k in range(8, 0, -1):
                    key = tuple(x[max(0, i - k + 1):i + 1])
                    if len(key) == k and key in seen[k]:
                        logits[r, i, x[seen[k][key] + 1]] = 10.0
                        break
                for k in range(1, 9):
                    key = tuple(x[max(0, i - k + 1):i + 1])
                    if len(key) == k and i + 1 < t:
                        seen[k][key] = i
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def filler(tmp_path_factory):
    root = make_corpus(tmp_path_factory.mktemp("hay"), n_docs=20, seed=3)
    return sentences(" ".join(p.read_text() for p in sorted(root.glob("*.txt"))))


def test_samples_are_deterministic_and_plant_their_answers(filler):
    gen = Generator(AsciiTokenizer(), filler)
    for task in TASKS:
        a, b = gen.samples(task, 600, 3, seed=1), gen.samples(task, 600, 3, seed=1)
        assert a == b
        assert gen.samples(task, 600, 3, seed=2) != a
        for s in a:
            assert 0.6 * 600 <= len(s.prompt) + len(s.answer) <= 600 + 10
            assert 0.0 < s.depth < 1.0
            # every answer's content is in the haystack, not only in the question
            haystack = s.prompt.rsplit("\n", 1)[0]
            for part in s.answer.replace(",", " ").split():
                assert part in haystack


def test_exact_match_of_an_induction_model(filler):
    """Induction recalls the pass key ("... pass key is 12345") and the copied excerpt, but not the magic numbers,
    whose question is worded differently from the planted line."""
    rows = evaluate_longctx(InductionLM(), AsciiTokenizer(), ["passkey", "copy", "niah_single"], [400], n=4,
                            filler=filler, progress=False)
    em = {r["task"]: r["exact_match"] for r in rows}
    assert em["passkey"] == 1.0
    assert em["copy"] == 1.0
    assert em["niah_single"] == 0.0
    lp = {r["task"]: r["answer_logprob_per_token"] for r in rows}
    assert lp["passkey"] > -0.01 > lp["niah_single"]


def test_position_perplexity_buckets():
    class Uniform(InductionLM):
        def forward(self, input_ids, attention_mask=None, **kw):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))

    tokens = np.random.default_rng(0).integers(0, V, 5000)
    rows = position_perplexity(Uniform(), tokens, 256, windows=5, buckets=[0, 64, 128, 512], progress=False)
    assert [(r["from"], r["to"]) for r in rows] == [(0, 64), (64, 128), (128, 256)]
    for r in rows:
        assert r["ppl"] == pytest.approx(V, rel=1e-6)


def test_longctx_runs_on_a_leanlm_asa_model(filler):
    from leanlm.config import LeanLMConfig
    from leanlm.model import LeanLMForCausalLM

    torch.manual_seed(0)
    model = LeanLMForCausalLM(LeanLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, max_position_embeddings=512, attention="asa",
                                           nsa_window=32, nsa_select_count=4)).eval()
    rows = evaluate_longctx(model, AsciiTokenizer(), ["passkey", "mqar"], [300], n=3, batch_size=3, filler=filler,
                            progress=False)
    assert [r["task"] for r in rows] == ["passkey", "mqar"]
    assert all(math.isfinite(r["answer_logprob_per_token"]) and r["exact_match"] == 0.0 for r in rows)
    json.dumps(rows)
