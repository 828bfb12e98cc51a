"""Speculative decoding: trees, verification and the decoding loop are lossless (greedy: token-identical to plain
greedy decoding; sampling: the same distribution as plain sampling), for leanlm and Hugging Face targets."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from leanlm.config import LeanLMConfig
from leanlm.errors import LeanLMError
from leanlm.model import LeanLMForCausalLM
from leanlm.speculative import Chain, Eagle2, SpeculativeDecoder, StaticTree, TokenTree, plain_generate
from leanlm.speculative.draft import EagleDraftHead, ModelDrafter, head_config
from leanlm.speculative.verify import greedy_accept, process_logits, sample_accept

V = 48


def tiny(kind="gqa", seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LeanLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, attention=kind)
    return LeanLMForCausalLM(cfg).eval()


def tiny_hf_llama():
    """A tiny random Hugging Face Llama target and an untrained EAGLE head for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval(), EagleDraftHead(head_config(cfg)).eval()


def decoder(target, strategy, drafter_model, noise, prompt):
    def factory():
        d = ModelDrafter(drafter_model, noise)
        d.first = int(prompt[0, 0])
        return d

    return SpeculativeDecoder(target, None, strategy, drafter_factory=factory)


STRATEGIES = [Chain(1), Chain(5), StaticTree(), Eagle2(total_tokens=12, depth=4, top_k=3),
              Eagle2(total_tokens=60, depth=6, top_k=10)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.describe())
@pytest.mark.parametrize("kind", ["gqa", "mla", "gla"])
def test_greedy_is_token_identical_to_plain_greedy(strategy, kind):
    target = tiny(kind)
    near = tiny(kind, seed=0, layers=2)  # the target itself, made noisy below: often right, sometimes wrong
    accepted = 0
    for i in range(6):
        prompt = torch.randint(0, V, (1, 5 + i), generator=torch.Generator().manual_seed(i))
        ref, _ = plain_generate(target, prompt, 30)
        out, stats = decoder(target, strategy, near, 1.0, prompt).generate(prompt, 30)
        assert out == ref, f"prompt {i}"
        accepted += stats.accepted
    assert accepted > 0  # the test exercised acceptance, not only rejection


def test_perfect_drafter_accepts_whole_chains():
    target = tiny()
    prompt = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
    out, stats = decoder(target, Chain(4), target, 0.0, prompt).generate(prompt, 41)
    assert stats.tau == 4.0 and stats.steps == 8 and len(out) == 41


def test_hf_llama_target_with_the_eagle_head():
    target, head = tiny_hf_llama()
    for i in range(3):
        prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(i))
        ref, _ = plain_generate(target, prompt, 25)
        for strategy in (Chain(3), Eagle2(total_tokens=16, depth=4, top_k=4)):
            out, _ = SpeculativeDecoder(target, head, strategy).generate(prompt, 25)
            assert out == ref
            out, _ = decoder(target, strategy, target, 1.0, prompt).generate(prompt, 25)
            assert out == ref


def test_eos_and_max_new_tokens_are_respected():
    target = tiny()
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    ref, _ = plain_generate(target, prompt, 40)
    eos = ref[17]
    ref_eos, _ = plain_generate(target, prompt, 40, eos_token_id=eos)
    out, _ = decoder(target, Eagle2(12, 4, 3), target, 0.5, prompt).generate(prompt, 40, eos_token_id=eos)
    assert out == ref_eos and out[-1] == eos
    out, _ = decoder(target, Chain(6), target, 0.0, prompt).generate(prompt, 9)
    assert out == ref[:9]


def test_eagle2_tree_is_connected_and_ranked():
    class Fixed:
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

        def root(self):
            return torch.log_softmax(torch.randn(V, generator=self.gen) * 3, -1)

        def expand(self, nodes, tokens, parents):
            return torch.log_softmax(torch.randn(len(nodes), V, generator=self.gen) * 3, -1)

    tree = Eagle2(total_tokens=30, depth=5, top_k=4).grow(Fixed(), 7)
    tree.check()
    assert len(tree) == 30 and tree.tokens[0] == 7
    depths = tree.depths()
    assert max(depths) <= 5
    for i in range(1, len(tree)):
        assert tree.logp[i] <= tree.logp[tree.parents[i]] + 1e-6
    mask = tree.ancestor_mask()
    assert all(int(mask[i].sum()) == depths[i] + 1 for i in range(len(tree)))


def test_greedy_accept_follows_argmax():
    tree = TokenTree([5, 1, 2, 3, 4], [-1, 0, 0, 2, 2], [0.0] * 5)
    logits = torch.full((5, 8), -10.0)
    logits[0, 2] = 5  # root -> node 2 (token 2)
    logits[2, 4] = 5  # node 2 -> node 4 (token 4)
    logits[4, 6] = 5  # bonus 6
    assert greedy_accept(tree, logits) == ([0, 2, 4], 6)


def test_tree_rejection_sampling_preserves_the_target_distribution():
    """One verification step, many trials: the first emitted token's frequencies must match p (chi-square)."""
    torch.manual_seed(0)
    vocab = 6
    logits = torch.randn(4, vocab) * 1.5
    tree = TokenTree([0, 2, 3, 2], [-1, 0, 0, 1], [0.0] * 4)  # root children: tokens 2, 3
    p = process_logits(logits[0], 0.8)
    gen = torch.Generator().manual_seed(1)
    n = 20000
    counts = Counter()
    for _ in range(n):
        path, bonus = sample_accept(tree, logits, 0.8, generator=gen)
        first = int(tree.tokens[path[1]]) if len(path) > 1 else bonus
        counts[first] += 1
    chi2 = sum((counts[x] - n * p[x].item()) ** 2 / (n * p[x].item()) for x in range(vocab))
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom


def sampling_target():
    """A tiny target whose next-token distributions are flat enough that sampling visits several outcomes."""
    target = tiny(seed=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.0).add_(torch.randn_like(target.lm_head.weight) * 0.02)
    return target


def assert_samples_like_plain(target, spec: Counter, prompt: list[int], n: int = 600) -> None:
    """Two-sample chi-square of 2-token generations (top_k=3: <= 9 joint outcomes) sampled speculatively (`spec`)
    against n plain samples of `target`."""
    plain = Counter()
    for s in range(n):
        out, _ = plain_generate(target, torch.tensor([prompt]), 2, temperature=1.0, top_k=3, seed=10_000 + s)
        plain[tuple(out)] += 1
    chi2 = sum((spec[k] - plain[k]) ** 2 / (spec[k] + plain[k]) for k in set(spec) | set(plain))
    assert chi2 < 27.9  # 99.9% quantile, 8 degrees of freedom
    assert len(spec) >= 5  # really random


def test_sampled_speculative_decoding_matches_plain_sampling():
    """Whole generations of 3 tokens: the joint distribution under tree sampling equals plain sampling."""
    target = sampling_target()
    prompt = torch.tensor([[1, 2, 3]])
    spec = Counter()
    dec = decoder(target, Eagle2(total_tokens=8, depth=3, top_k=2), target, 0.3, prompt)
    for s in range(600):
        out, _ = dec.generate(prompt, 2, temperature=1.0, top_k=3, seed=s)
        spec[tuple(out)] += 1
    assert_samples_like_plain(target, spec, [1, 2, 3])


def test_process_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(process_logits(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(process_logits(logits, 1.0, top_p=0.75), torch.tensor([0.625, 0.375, 0, 0]))
    assert math.isclose(float(process_logits(logits, 1.0, top_p=0.81).sum()), 1.0, rel_tol=1e-6)
    assert int((process_logits(logits, 1.0, top_p=0.81) > 0).sum()) == 3


def test_asa_target_refuses_trees_but_chain_drafting_works():
    torch.manual_seed(0)
    cfg = LeanLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, attention="asa", nsa_window=32,
                       nsa_select_count=4)
    target = LeanLMForCausalLM(cfg).eval()
    prompt = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(0))
    ref, _ = plain_generate(target, prompt, 20)
    with pytest.raises(ValueError, match="chain"):
        decoder(target, Eagle2(8, 3, 2), target, 0.5, prompt).generate(prompt, 20)
    out, _ = decoder(target, Chain(4), target, 0.5, prompt).generate(prompt, 20)
    assert out == ref


def test_cli_generate_with_a_saved_draft_head(tiny_config, tmp_path, capsys):
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    head = EagleDraftHead(head_config(trainer.model.config))
    head.save(tmp_path / "head", meta={"note": "untrained, for the test"})
    args = ["generate", ckpt, "--prompt", "the king", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip()
    assert main(args + ["--spec", "eagle2", "--draft", str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert out.split("\n[eagle2")[0].strip() == plain  # lossless: the same text
    assert "tau" in out
    assert main(args + ["--spec", "eagle2"]) == 2
    assert "--draft" in capsys.readouterr().err
    assert main(args + ["--spec", "chain", "--draft", str(tmp_path)]) == 2
    assert "not a draft head" in capsys.readouterr().err


def test_training_a_draft_head_raises_acceptance(tiny_config):
    """A head trained on the target's own greedy outputs gets more drafted tokens accepted than an untrained one."""
    from conftest import mean_tau, trained_tiny_target

    from leanlm.speculative.train_draft import DraftTrainConfig, collect_features, train_head

    target, prompts, seqs = trained_tiny_target(tiny_config(max_steps=30, ckpt_every=0, eval_every=0))
    data = collect_features(target, seqs, progress=False)
    torch.manual_seed(0)
    head = EagleDraftHead(head_config(target.config))
    untrained = EagleDraftHead(head_config(target.config))
    untrained.load_state_dict(head.state_dict())
    logs = train_head(head, target.get_input_embeddings(), target.get_output_embeddings(), data,
                      DraftTrainConfig(epochs=6, lr=3e-3, batch_tokens=512), progress=False)
    assert logs[-1]["reg"] < 0.6 * logs[0]["reg"] and logs[-1]["acc"] > logs[0]["acc"]
    taus = {name: mean_tau(target, h, prompts[32:]) for name, h in (("trained", head), ("untrained", untrained))}
    assert taus["trained"] > taus["untrained"] + 0.3, taus


def test_cli_train_draft_then_speculative_generate(tiny_config, tmp_path, capsys):
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    head = tmp_path / "head"
    assert main(["spec", "train-draft", ckpt, "--out", str(head), "--prompts", "6", "--max-new-tokens", "6",
                 "--epochs", "1", "--draft-vocab", "1"]) == 0
    assert "draft head saved" in capsys.readouterr().out
    loaded, meta = EagleDraftHead.load(head, trainer.model.config)
    assert meta["prompts"] == 6 and 0.0 <= meta["final_train"]["acc"] <= 1.0
    assert main(["spec", "train-draft", ckpt, "--out", str(head), "--prompts", "6"]) == 2  # no silent overwrite
    # continue training from the head (warm start), with another loss weight; the history is kept
    more = tmp_path / "head2"
    assert main(["spec", "train-draft", ckpt, "--out", str(more), "--prompts", "6", "--max-new-tokens", "6",
                 "--epochs", "2", "--init", str(head), "--cls-weight", "0.5", "--data", str(tmp_path / "head-data"),
                 "--stage", "train", "--val-prompts", "2", "--cls-target", "data"]) == 0
    assert "held-out" in capsys.readouterr().out
    _, meta2 = EagleDraftHead.load(more, trainer.model.config)
    assert meta2["init"] == str(head) and meta2["cls_weight"] == 0.5 and meta2["history"][0]["steps"] == meta["steps"]
    # the continued head keeps the first one's single draft id, and its coverage is counted over it (not as full)
    from leanlm.speculative.train_draft import answer_token_counts, coverage, load_feature_cache

    kept, _ = EagleDraftHead.load(more, trainer.model.config)
    assert torch.equal(kept.draft_vocab, loaded.draft_vocab) and len(kept.draft_vocab) == 1
    counts = answer_token_counts(load_feature_cache(tmp_path / "head-data")[:-2], trainer.model.config.vocab_size)
    expected = coverage(counts, kept.draft_vocab)
    assert meta2["draft_vocab_coverage"] == pytest.approx(expected) and expected < 1.0
    assert meta["train"]["cls_target"] == "greedy" and meta2["train"]["cls_target"] == "data"
    assert all("acc_greedy" in v for v in meta2["val_by_epoch"])
    assert len(meta2["val_by_epoch"]) == 2 and all(0 < v["tokens"] and 0 <= v["acc"] <= 1 for v in meta2["val_by_epoch"])
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h4"), "--prompts", "6", "--max-new-tokens", "6",
                 "--data", str(tmp_path / "head-data"), "--stage", "train", "--val-prompts", "6"]) == 2
    capsys.readouterr()
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h3"), "--init", str(tmp_path / "nope")]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h3"), "--cls-weight", "-1"]) == 2
    capsys.readouterr()
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h3"), "--cls-target", "tokens"]) == 2
    assert "--cls-target" in capsys.readouterr().err and not (tmp_path / "h3").exists()
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h3"), "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["generate", ckpt, "--prompt", "the", "--max-new-tokens", "8", "--temperature", "0", "--spec",
                 "chain", "--draft", str(head)]) == 0


def test_spec_bench_on_a_tiny_target(tiny_config, tmp_path, capsys):
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.speculative.prompts import load_prompts
    from leanlm.train import Trainer

    assert len(load_prompts("mtbench")) == 80 and len(load_prompts("humaneval")) == 164
    assert len(load_prompts("gsm8k")) == 1319
    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    EagleDraftHead(head_config(trainer.model.config)).save(tmp_path / "head")
    out = tmp_path / "bench.json"
    assert main(["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--prompts", "mtbench,gsm8k", "--limit",
                 "2", "--max-new-tokens", "6", "--strategies", "chain,eagle2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompts"], r["strategy"]) for r in rows] == [
        ("mtbench", "none"), ("mtbench", "chain"), ("mtbench", "eagle2"),
        ("gsm8k", "none"), ("gsm8k", "chain"), ("gsm8k", "eagle2")]
    assert all(r["identical_outputs"] == 2 for r in rows if r["strategy"] != "none")
    assert out.with_suffix(".png").exists() and "speed-up" in out.with_suffix(".md").read_text()
    assert main(["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--prompts", "alpaca"]) == 2


def tiny_gemma3(sliding_window: int = 4):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("strategy", [Chain(3), Eagle2(total_tokens=16, depth=4, top_k=4)], ids=lambda s: s.name)
def test_gemma3_target_with_sliding_window_layers(strategy):
    """Gemma-3's architecture (sliding-window layers interleaved with global ones, scaled embeddings, one KV head):
    speculative greedy output equals plain greedy output past the window."""
    target = tiny_gemma3()
    head = EagleDraftHead(head_config(target.config)).eval()
    for i in range(3):
        prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(i))
        ref, _ = plain_generate(target, prompt, 24)
        out, _ = decoder(target, strategy, target, 1.0, prompt).generate(prompt, 24)
        assert out == ref
        out, _ = SpeculativeDecoder(target, head, strategy).generate(prompt, 24)
        assert out == ref


class _Tok:
    """The slice of a tokenizer the draft-data pipeline uses: no chat template, ids from text, EOS."""

    chat_template = None
    pad_token_id = None

    def __init__(self, eos: int | None):
        self.eos_token_id = eos

    def __call__(self, text):
        return {"input_ids": [int(x) % V for x in text.split()]}


def test_answers_with_features_equal_greedy_and_teacher_forcing(tmp_path):
    """One generation pass gives what plain greedy decoding answers and what a teacher-forced pass computes; the
    cache on disk resumes and refuses other settings."""
    from leanlm.errors import LeanLMError
    from leanlm.speculative.train_draft import (answer_with_features, build_feature_cache, collect_features,
                                         load_feature_cache)

    target = tiny()
    prompts = ["1 2 3", "4 5 6 7 8 9 10", "11 12", "13 14 15 16"]
    ref0, _ = plain_generate(target, torch.tensor([[1, 2, 3]]), 12)
    eos = ref0[4]  # some prompts stop early, some do not
    rows = sorted(answer_with_features(target, _Tok(eos), prompts, 12, batch_size=3, progress=False))
    forced = collect_features(target, [r[1].tolist() for r in rows], progress=False)
    for (i, tokens, feats, p), (_, ref_feats) in zip(rows, forced):
        prompt = [int(x) % V for x in prompts[i].split()]
        answer, _ = plain_generate(target, torch.tensor([prompt]), 12, eos_token_id=eos)
        assert p == len(prompt) and tokens.tolist() == prompt + answer
        assert torch.allclose(feats.float(), ref_feats.float(), atol=2e-2, rtol=1e-2)
    folder = tmp_path / "cache"
    build_feature_cache(target, _Tok(eos), prompts, folder, 12, batch_size=2, shard_prompts=3, progress=False)
    data = load_feature_cache(folder)
    assert [d[0].tolist() for d in data] == [r[1].tolist() for r in rows]
    (folder / "shard-00001.safetensors").unlink()  # an interrupted run: the next one rebuilds only what is missing
    build_feature_cache(target, _Tok(eos), prompts, folder, 12, batch_size=2, shard_prompts=3, progress=False)
    assert len(load_feature_cache(folder)) == 4
    with pytest.raises(LeanLMError, match="other settings"):
        build_feature_cache(target, _Tok(eos), prompts, folder, 8, progress=False)


def test_spec_bench_writes_each_prompt_as_it_finishes_and_resumes(tiny_config, tmp_path, capsys, monkeypatch):
    """A killed `spec bench` keeps every prompt it finished (OUT.jsonl); a rerun with the same arguments decodes only
    the rest (a larger --limit adds prompts), cuts a line torn by the kill, and refuses a journal of other arguments,
    other head weights, or one another run is writing, before loading anything."""
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.speculative import bench
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    EagleDraftHead(head_config(trainer.model.config)).save(tmp_path / "head")
    out, journal = tmp_path / "bench.json", tmp_path / "bench.jsonl"
    args = ["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--prompts", "mtbench", "--max-new-tokens", "6",
            "--strategies", "chain,eagle2:total_tokens=8:depth=3:top_k=3", "--out", str(out)]
    decoded = []
    real = bench.bench_prompt
    monkeypatch.setattr(bench, "bench_prompt", lambda *a, **k: decoded.append(a[4]) or real(*a, **k))
    assert main(args + ["--limit", "2"]) == 0
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and len(decoded) == 2  # the header, then one record per prompt
    first = [json.loads(x) for x in lines[1:]]
    assert [r["index"] for r in first] == [0, 1] and all(r["strategies"]["chain"]["identical"] for r in first)

    journal.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])  # killed while writing prompt 1
    decoded.clear()
    assert main(args + ["--limit", "3"]) == 0
    assert "resuming" in capsys.readouterr().out and len(decoded) == 2  # prompts 1 and 2, not 0
    records = [json.loads(x) for x in journal.read_text().splitlines()[1:]]  # every line parses: the torn one is gone
    assert [r["index"] for r in records] == [0, 1, 2] and records[0] == first[0]  # prompt 0 kept, not re-decoded
    rows = json.loads(out.read_text())
    assert rows["resumed_prompts"] == 1
    chain = next(r for r in rows["rows"] if r["strategy"] == "chain")
    assert chain["n"] == 3 and chain["identical_outputs"] == 3
    assert chain["tau_ci95"][0] <= chain["tau"] <= chain["tau_ci95"][1]  # over the three prompts' records
    s = chain["candidates_per_step"] * sum(r["strategies"]["chain"]["steps"] for r in records)
    assert s == pytest.approx(sum(r["strategies"]["chain"]["candidates"] for r in records))  # summed over all three

    before = journal.read_bytes()
    decoded.clear()
    assert main(args[:-2] + ["--max-new-tokens", "5", "--out", str(out)]) == 2  # other arguments
    assert "max_new_tokens" in capsys.readouterr().err
    EagleDraftHead(head_config(trainer.model.config)).save(tmp_path / "head")  # other weights, same folder name
    assert main(args + ["--limit", "3"]) == 2
    assert "draft_weights" in capsys.readouterr().err and journal.read_bytes() == before and not decoded


def test_bench_journal_is_locked_while_a_run_appends(tmp_path):
    from leanlm.speculative.bench import BenchJournal

    holder = BenchJournal(tmp_path / "b.jsonl", {"a": 1})
    holder.start(None)
    with pytest.raises(LeanLMError, match="another spec bench"):
        BenchJournal(tmp_path / "b.jsonl", {"a": 1}).lock()
    holder.close()
    again = BenchJournal(tmp_path / "b.jsonl", {"a": 1})
    again.lock()  # released on close
    again.close()
    (tmp_path / "b.jsonl").write_text('{"signature": {"a": 1}}\n[1, 2]\n{"x": 1}\n')
    with pytest.raises(LeanLMError, match="damaged line 2"):
        BenchJournal(tmp_path / "b.jsonl", {"a": 1})


def test_bench_journal_from_before_the_manifest_digest_still_resumes(tmp_path):
    """Journals written before `weights_digest` read the folder's manifest hold the digest of the weight files; the
    same weights still resume them, other weights are still refused."""
    from leanlm.speculative.bench import BenchJournal, weights_digest

    head = tmp_path / "head"
    EagleDraftHead(head_config(tiny().config)).save(head)
    old, new = weights_digest(head, legacy=True), weights_digest(head)
    assert (head / "manifest.json").is_file() and old != new
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"signature": {"draft": "head", "draft_weights": old}, "sizes": None}) + "\n"
                    + json.dumps({"prompts": "mtbench", "index": 0, "sha": "x"}) + "\n")
    legacy = {"draft_weights": lambda: weights_digest(head, legacy=True)}
    journal = BenchJournal(path, {"draft": "head", "draft_weights": new}, legacy)
    assert list(journal.records) == [("mtbench", 0)]
    with pytest.raises(LeanLMError, match="other arguments \\(draft_weights\\)"):
        BenchJournal(path, {"draft": "head", "draft_weights": new})  # without the legacy digest: refused
    EagleDraftHead(head_config(tiny(seed=1).config)).save(head)  # other weights under the same name
    assert weights_digest(head, legacy=True) != old
    with pytest.raises(LeanLMError, match="draft_weights"):
        BenchJournal(path, {"draft": "head", "draft_weights": weights_digest(head)}, legacy)


def test_tau_interval_is_a_bootstrap_over_prompts():
    from leanlm.speculative.bench import tau_interval

    steps = torch.tensor([10.0, 20.0, 10.0, 40.0])
    same = tau_interval(steps * 1.5, steps)  # every prompt at τ 1.5: no spread
    assert same == pytest.approx([1.5, 1.5])
    accepted = torch.tensor([2.0, 30.0, 15.0, 20.0])  # per-prompt τ 0.2, 1.5, 1.5, 0.5; pooled 67/80
    lo, hi = tau_interval(accepted, steps)
    assert 0.2 <= lo < 67 / 80 < hi <= 1.5 and tau_interval(accepted, steps) == [lo, hi]  # seeded
    wide = tau_interval(accepted, steps)
    narrow = tau_interval(accepted.repeat(25), steps.repeat(25))  # the same spread over 25x the prompts
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2
    assert tau_interval(torch.tensor([3.0]), torch.tensor([4.0])) == [0.75, 0.75]


def test_paired_tau_difference_matches_prompts_and_cancels_their_spread():
    from leanlm.speculative.bench import paired_tau_difference

    def rec(i, steps, accepted, name="eagle2"):
        return {"prompts": "mtbench", "index": i, "sha": f"s{i}",
                "strategies": {name: {"steps": steps, "accepted": accepted}}}

    steps = [10, 40, 10, 30, 20, 10]
    easy_hard = [1, 36, 2, 27, 4, 9]  # prompts differ a lot; the second head accepts one more token on each
    a = [rec(i, s, x) for i, (s, x) in enumerate(zip(steps, easy_hard))]
    b = [rec(i, s, x + 1, "c2t") for i, (s, x) in enumerate(zip(steps, easy_hard))][::-1] + [rec(9, 5, 5, "c2t")]
    d = paired_tau_difference(a, b, "eagle2", "c2t")
    assert d["n"] == 6 and d["diff"] == pytest.approx(6 / 120)  # prompt 9 is in one run only
    lo, hi = d["diff_ci95"]
    assert 0 < lo <= d["diff"] <= hi < 0.1  # paired: the interval excludes 0 although per-prompt τ spans 0.1-0.9
    with pytest.raises(LeanLMError, match="share no prompt"):
        paired_tau_difference(a, [rec(9, 5, 5)], "eagle2")
