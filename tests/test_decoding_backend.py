"""The decoding backend (`leanlm.speculative.target`): the slot cache, its moves, compiled steps and the one engine.

References are independent of the backend: greedy and sampled decoding by full recomputation (no cache), and the
KV of a fresh prefill of the accepted text. Compiled checks run on a tiny Llama (each graph compiles in seconds)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from leanlm.speculative import Chain, Eagle2, SpeculativeDecoder, StaticTree, TokenTree, make_target, plain_generate
from leanlm.speculative.c2t import C2T
from leanlm.speculative.draft import ModelDrafter
from leanlm.speculative.target import BUCKETS, bucket_for
from leanlm.speculative.verify import greedy_accept, greedy_nodes, process_logits
from test_c2t import depth_classifier
from test_spec import V, assert_samples_like_plain, tiny, tiny_gemma3, tiny_hf_llama


@torch.no_grad()
def naive(model, prompt: list[int], n: int, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[int]:
    """Decoding by recomputing the whole sequence every step, with the engine's sampling draws."""
    gen = torch.Generator().manual_seed(seed)
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1].float()
        if temperature <= 0:
            tok = int(logits.argmax())
        else:
            tok = int(torch.multinomial(process_logits(logits, temperature, top_k), 1, generator=gen))
        out.append(tok)
        seq.append(tok)
    return out


def noisy(model, prompt, noise=1.0):
    """The target drafting for itself with Gaussian noise of `noise` times its logits' spread (random tiny models
    differ a lot in scale): drafts often right, sometimes wrong."""
    with torch.no_grad():
        spread = float(model(torch.tensor([list(prompt)]), use_cache=False).logits.float().std())
    noise = noise * spread

    def factory():
        d = ModelDrafter(model, noise)
        d.first = int(prompt[0])
        return d

    return factory


def prompt_of(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def models():
    yield "hf-llama", tiny_hf_llama()[0]
    yield "hf-gemma3-sliding", tiny_gemma3()
    for kind in ("gqa", "mla", "gla", "asa"):
        yield f"leanlm-{kind}", tiny(kind)


@pytest.mark.parametrize("name,model", list(models()), ids=lambda x: x if isinstance(x, str) else "")
def test_plain_decoding_equals_recomputation(name, model):
    for i in range(2):
        prompt = prompt_of(5 + 3 * i, i)
        out, _ = plain_generate(model, torch.tensor([prompt]), 30)
        assert out == naive(model, prompt, 30), f"{name} prompt {i}"
        out, _ = plain_generate(model, torch.tensor([prompt]), 12, temperature=1.0, top_k=5, seed=i)
        assert out == naive(model, prompt, 12, temperature=1.0, top_k=5, seed=i), f"{name} sampled {i}"


@pytest.mark.parametrize("strategy", [Chain(4), StaticTree(), Eagle2(total_tokens=20, depth=4, top_k=4),
                                      C2T(depth_classifier(3.5), beta=0.4, top_k=4)], ids=lambda s: s.name)
@pytest.mark.parametrize("name,model", [m for m in models() if m[0] in ("hf-llama", "hf-gemma3-sliding", "leanlm-gla")],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_speculative_greedy_equals_recomputation(strategy, name, model):
    """Against recomputation, for a Hugging Face Llama, Gemma-3 with sliding-window layers and a latent-attention
    leanlm model (tests/test_spec.py checks every strategy against plain decoding for GQA, MLA and GLA)."""
    prompt = prompt_of(6, 3)
    out, st = SpeculativeDecoder(model, None, strategy, drafter_factory=noisy(model, prompt)).generate(
        torch.tensor([prompt]), 30)
    assert out == naive(model, prompt, 30)
    assert st.accepted > 0


def test_the_cache_after_moves_equals_a_fresh_prefill():
    """After speculative steps (accepted paths moved into place), slots [0, length) hold exactly the keys and values
    a fresh prefill of the same text computes."""
    model, _ = tiny_hf_llama()
    prompt = prompt_of(7, 1)
    dec = SpeculativeDecoder(model, None, Eagle2(total_tokens=16, depth=4, top_k=4),
                             drafter_factory=noisy(model, prompt), keep_trees=True)
    out, st = dec.generate(torch.tensor([prompt]), 25)
    assert any(p != list(range(len(p))) for p in st.accepted_paths)  # some accepted path had to be moved
    length = len(prompt) + len(out) - 1  # the last token is emitted, not yet cached
    fresh = make_target(model)
    text = torch.tensor([prompt + out[:-1]])
    fresh.start(1, 256)
    fresh.prefill(text, torch.tensor([length]))
    for a, b in zip(dec.target.cache.layers, fresh.cache.layers):
        assert torch.allclose(a.keys[:, :, :length], b.keys[:, :, :length], atol=1e-5)
        assert torch.allclose(a.values[:, :, :length], b.values[:, :, :length], atol=1e-5)


def test_leanlm_cache_move_equals_keep():
    """`LeanCache.move` (per row, in place) does what the single-row `keep` did."""
    model = tiny("mla")
    a, b = make_target(model), make_target(model)
    ids = torch.tensor([prompt_of(12, 0)])
    for t in (a, b):
        t.start(1, 64)
        t.prefill(ids, torch.tensor([12]))
    a.cache.keep(8, torch.tensor([0, 2, 3]))
    b.cache.move(torch.tensor([8]), torch.tensor([[8, 10, 11]]))
    b.cache.crop(11)
    for sa, sb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(sa.c.view(), sb.c.view()) and torch.equal(sa.k_rope.view(), sb.k_rope.view())


def test_batch_of_one_is_the_single_sequence_case():
    model = tiny("gqa")
    prompt = prompt_of(9, 2)
    strategy = Eagle2(total_tokens=12, depth=4, top_k=3)
    dec = SpeculativeDecoder(model, None, strategy, drafter_factory=noisy(model, prompt))
    single, st = dec.generate(torch.tensor([prompt]), 20)
    outs, stats, _ = dec.generate_batch([prompt], 20)
    assert outs[0] == single and stats[0].steps == st.steps and stats[0].accepted == st.accepted


def test_batched_rows_of_different_lengths_equal_recomputation():
    model, _ = tiny_hf_llama()
    prompts = [prompt_of(3 + 4 * i, 10 + i) for i in range(3)]
    firsts = itertools.cycle([p[0] for p in prompts])
    with torch.no_grad():
        spread = float(model(torch.tensor([prompts[-1]]), use_cache=False).logits.std())

    def factory():
        d = ModelDrafter(model, spread)
        d.first = next(firsts)
        return d

    dec = SpeculativeDecoder(model, None, Eagle2(total_tokens=12, depth=4, top_k=3), drafter_factory=factory)
    outs, _, totals = dec.generate_batch(prompts, 18)
    for p, o in zip(prompts, outs):
        assert o == naive(model, p, 18)
    assert totals["forwards"] < 18  # one target step per batch step, fewer than tokens


def _random_tree(n: int, rng: random.Random) -> TokenTree:
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    return TokenTree([rng.randrange(5) for _ in range(n)], parents, [0.0] * n)


def test_tree_tensors_equal_the_node_loop_definitions():
    rng = random.Random(0)
    for _ in range(50):
        tree = _random_tree(rng.randrange(1, 70), rng)
        parents = tree.parents.tolist()
        depth = [0] * len(tree)
        anc = torch.eye(len(tree), dtype=torch.bool)
        for i in range(1, len(tree)):
            depth[i] = depth[parents[i]] + 1
            anc[i] |= anc[parents[i]]
        assert tree.depths().tolist() == depth
        assert torch.equal(tree.ancestor_mask(), anc)
        assert tree.is_chain() == (parents == list(range(-1, len(tree) - 1)))


def test_vectorised_greedy_acceptance_equals_the_tree_walk():
    rng = random.Random(1)
    for _ in range(200):
        tree = _random_tree(rng.randrange(1, 40), rng)
        logits = torch.randn(len(tree), 5)
        best = logits.argmax(-1).tolist()
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        path = [0]
        while True:  # the walk: first child (in node order) carrying the target's argmax
            nxt = next((c for c in range(len(tree)) if parents[c] == path[-1] and tokens[c] == best[path[-1]]),
                       None)
            if nxt is None:
                break
            path.append(nxt)
        got, bonus = greedy_accept(tree, logits)
        assert bonus == best[got[-1]]
        assert got[0] == 0 and all(parents[b] == a and tokens[b] == best[a] for a, b in zip(got, got[1:]))
        siblings = [(parents[i], tokens[i]) for i in range(1, len(tree))]
        if len(set(siblings)) == len(siblings):  # distinct sibling tokens: exactly the walk
            assert got == path
        else:  # duplicates: the deepest matching path, never shorter than the walk's (both are lossless)
            assert len(got) >= len(path)
    # padding nodes (parent -1 beyond the root) never match
    ids = torch.tensor([[4, 7, 7]])
    node = greedy_nodes(ids, torch.tensor([[-1, 0, -1]]), torch.eye(3, dtype=torch.bool)[None] | torch.tensor(
        [[[0, 0, 0], [1, 0, 0], [0, 0, 0]]], dtype=torch.bool), torch.tensor([[0, 1, 0]]), torch.tensor([[7, 1, 7]]))
    assert node.tolist() == [1]


def test_buckets():
    assert [bucket_for(n) for n in (1, 3, 8, 9, 64)] == [1, 4, 8, 16, 64] and bucket_for(65) is None
    assert BUCKETS[-1] == 64


# -- compiled ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_llama():
    model, _ = tiny_hf_llama()
    target = make_target(model, compile=True)
    return model, target


def test_compiled_plain_and_speculative_greedy_equal_recomputation(compiled_llama):
    model, target = compiled_llama
    for i in range(2):
        prompt = prompt_of(6 + i, 20 + i)
        ref = naive(model, prompt, 24)
        out, _ = plain_generate(target, torch.tensor([prompt]), 24, capacity=256)
        assert out == ref
        for strategy in (Chain(3), StaticTree(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))),
                         Eagle2(total_tokens=8, depth=3, top_k=3),
                         C2T(depth_classifier(2.5), beta=0.4, top_k=3, max_nodes=8)):
            out, st = SpeculativeDecoder(target, None, strategy, drafter_factory=noisy(model, prompt),
                                         capacity=256).generate(torch.tensor([prompt]), 24)
            assert out == ref, strategy.describe()
    stats = target.compile_stats
    assert stats.failed is None and set(stats.seconds) <= {1, 2, 4, 8} and 1 in stats.seconds


SAMPLING_STRATEGIES = [Chain(2), StaticTree(((0,), (1,), (0, 0), (0, 1), (1, 0))),
                       Eagle2(total_tokens=8, depth=3, top_k=2), C2T(depth_classifier(2.5), beta=0.4, top_k=2,
                                                                     max_nodes=8)]


@pytest.fixture(scope="module")
def flat_llama():
    """A tiny Llama with flat next-token distributions (so sampling visits several outcomes), and a compiled target
    of it (its own model: freezing bakes the weights in at compile time)."""
    model, _ = tiny_hf_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.02)
    return model, make_target(model, compile=True)


def _sampled(target, model, strategy, prompt, n):
    dec = SpeculativeDecoder(target, None, strategy, drafter_factory=noisy(model, torch.tensor(prompt), 0.3),
                             capacity=256)
    spec = Counter()
    for s in range(n):
        out, _ = dec.generate(torch.tensor([prompt]), 2, temperature=1.0, top_k=3, seed=s)
        spec[tuple(out)] += 1
    return spec


@pytest.mark.parametrize("strategy", [s for s in SAMPLING_STRATEGIES if s.name != "eagle2"], ids=lambda s: s.name)
def test_eager_sampling_keeps_the_distribution(strategy, flat_llama):
    """(eagle2's eager sampling is checked in tests/test_spec.py and tests/test_spec_batch.py)"""
    model, _ = flat_llama
    assert_samples_like_plain(model, _sampled(make_target(model), model, strategy, [1, 2, 3], 300), [1, 2, 3],
                              n=300)


@pytest.mark.parametrize("strategy", SAMPLING_STRATEGIES, ids=lambda s: s.name)
def test_compiled_sampling_keeps_the_distribution(strategy, flat_llama):
    model, target = flat_llama
    assert_samples_like_plain(model, _sampled(target, model, strategy, [1, 2, 3], 300), [1, 2, 3], n=300)
    assert target.compile_stats.seconds and target.compile_stats.failed is None


def test_a_tree_wider_than_the_largest_bucket_runs_eager(compiled_llama):
    model, target = compiled_llama
    prompt = prompt_of(5, 30)
    before = target.compile_stats.eager_steps
    out, st = SpeculativeDecoder(target, None, Eagle2(total_tokens=80, depth=4, top_k=6),
                                 drafter_factory=noisy(model, prompt), capacity=256).generate(
        torch.tensor([prompt]), 10)
    assert out == naive(model, prompt, 10)
    assert target.compile_stats.eager_steps > before and st.candidates / st.steps > 64


def test_a_failing_compile_falls_back_to_eager(capsys):
    model, _ = tiny_hf_llama()
    target = make_target(model, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")

    target._compiled = broken
    prompt = prompt_of(6, 4)
    out, _ = plain_generate(target, torch.tensor([prompt]), 12)
    assert out == naive(model, prompt, 12)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed (RuntimeError: inductor exploded)" in err[0]
    assert target._compiled is None and target.compile_stats.failed.startswith("RuntimeError")


def test_compile_auto_is_off_on_cpu_and_for_leanlm():
    model, _ = tiny_hf_llama()
    assert make_target(model, compile="auto")._compiled is None
    assert make_target(model, compile="on")._compiled is not None
    lean = make_target(tiny(), compile="on")
    assert lean.compile_stats.failed and "eager" in lean.compile_stats.failed


def test_prompt_beyond_the_context_is_refused_before_work():
    model = tiny("gqa")  # 512 positions
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        SpeculativeDecoder(model, None, Chain(3), drafter_factory=lambda: 1 / 0).generate(
            torch.tensor([prompt_of(500, 0)]), 20)


def test_capacity_too_small_is_refused_before_work():
    model, _ = tiny_hf_llama()
    with pytest.raises(ValueError, match="capacity 32 is too small"):
        plain_generate(model, torch.tensor([prompt_of(20, 0)]), 20, capacity=32)


def test_cli_generate_compile_on_equals_off(tiny_config, tmp_path, capsys):
    """`leanlm generate --compile on` on a Hugging Face model folder prints what `--compile off` prints; a leanlm
    checkpoint with --compile on says in one line that it decodes eager."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = trainer.ckpt_dir / "step-00000002"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=trainer.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / "hf" / f.name)
    args = ["generate", str(tmp_path / "hf"), "--prompt", "the king", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(args + ["--compile", "off"]) == 0
    off = capsys.readouterr().out
    assert main(args + ["--compile", "on"]) == 0
    captured = capsys.readouterr()
    assert captured.out == off and "warning" not in captured.err
    assert main(["generate", str(ckpt), "--prompt", "the king", "--max-new-tokens", "4", "--compile", "on"]) == 0
    assert "decode eager" in capsys.readouterr().err
    assert main(args + ["--compile", "sometimes"]) == 2
