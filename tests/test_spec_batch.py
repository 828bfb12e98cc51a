"""Batched speculative decoding: every row equals decoding its prompt alone (greedy), sampling keeps the target
distribution, rows finish independently; leanlm and Hugging Face targets."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from leanlm.speculative import Chain, Eagle2, plain_generate
from leanlm.speculative.engine import BatchedSpeculativeDecoder
from leanlm.speculative.c2t import C2T
from test_c2t import depth_classifier
from test_spec import V, ModelDrafter, assert_samples_like_plain, sampling_target, tiny, tiny_hf_llama


def batched(target, strategy, drafter_model, noise, prompts):
    firsts = itertools.cycle([p[0] for p in prompts])

    def factory():
        d = ModelDrafter(drafter_model, noise)
        d.first = next(firsts)
        return d

    return BatchedSpeculativeDecoder(target, None, strategy, drafter_factory=factory)


def prompts_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


STRATEGIES = [Chain(3), Eagle2(total_tokens=12, depth=4, top_k=3), C2T(depth_classifier(3.5), beta=0.4, top_k=4)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_batched_greedy_rows_equal_single_greedy(strategy, kind):
    target = tiny(kind)
    prompts = prompts_of(4)
    outs, stats, totals = batched(target, strategy, target, 1.0, prompts).generate(prompts, 24)
    for p, out in zip(prompts, outs):
        ref, _ = plain_generate(target, torch.tensor([p]), 24)
        assert out == ref
    assert sum(s.accepted for s in stats) > 0
    assert totals["forwards"] - 1 == max(s.steps for s in stats)  # one target forward per step for all rows


def test_batched_rows_finish_independently_and_respect_eos():
    target = tiny()
    prompts = prompts_of(3, seed=2)
    ref0, _ = plain_generate(target, torch.tensor([prompts[0]]), 30)
    eos = ref0[5]
    outs, _, _ = batched(target, Eagle2(total_tokens=10, depth=3, top_k=3), target, 0.5, prompts).generate(
        prompts, 30, eos_token_id=eos)
    for p, out in zip(prompts, outs):
        ref, _ = plain_generate(target, torch.tensor([p]), 30, eos_token_id=eos)
        assert out == ref
    assert outs[0][-1] == eos and len(outs[0]) <= 6


def test_batched_hf_llama_target_with_the_eagle_head():
    target, head = tiny_hf_llama()
    prompts = prompts_of(3, seed=4)
    for strategy in (Chain(3), Eagle2(total_tokens=16, depth=4, top_k=4)):
        outs, _, _ = BatchedSpeculativeDecoder(target, head, strategy).generate(prompts, 20)
        outs2, _, _ = batched(target, strategy, target, 1.0, prompts).generate(prompts, 20)
        for p, out, out2 in zip(prompts, outs, outs2):
            ref, _ = plain_generate(target, torch.tensor([p]), 20)
            assert out == ref and out2 == ref


def test_batched_sampling_matches_plain_sampling():
    target = sampling_target()
    prompt = [1, 2, 3]
    spec = Counter()
    dec = batched(target, Eagle2(total_tokens=8, depth=3, top_k=2), target, 0.3, [prompt] * 8)
    for s in range(75):  # 75 batches of 8 rows = 600 samples
        outs, _, _ = dec.generate([prompt] * 8, 2, temperature=1.0, top_k=3, seed=8 * s)
        spec.update(tuple(o) for o in outs)
    assert_samples_like_plain(target, spec, prompt)


def test_batched_gemma3_target_with_sliding_window_layers():
    from test_spec import tiny_gemma3

    target = tiny_gemma3(sliding_window=4)
    prompts = prompts_of(3, seed=5)
    outs, _, _ = batched(target, Eagle2(total_tokens=12, depth=4, top_k=3), target, 1.0, prompts).generate(prompts, 20)
    for p, out in zip(prompts, outs):
        ref, _ = plain_generate(target, torch.tensor([p]), 20)
        assert out == ref
