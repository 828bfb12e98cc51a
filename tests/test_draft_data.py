"""Draft-head data and vocabulary: ShareGPT read record by record from a cut-off file, split by chat, evaluation
prompts kept out, chat-template assistant masks, teacher-forced conversation features on disk (resumable), the loss
mask, and the reduced draft vocabulary (losslessness included)."""

from __future__ import annotations

import json

import pytest
import torch
from test_spec import V, tiny

from leanlm.errors import CheckpointError, LeanLMError
from leanlm.speculative import sharegpt as sg
from leanlm.speculative.draft import DraftSession, EagleDraftHead, head_config
from leanlm.speculative.engine import SpeculativeDecoder, plain_generate
from leanlm.speculative.train_draft import (DraftTrainConfig, answer_token_counts, build_conversation_cache,
                                            collect_features, coverage, draft_loss, extraction_rate, last_hidden,
                                            load_feature_cache, loss_weights, select_draft_vocab, train_head)
from leanlm.speculative.tree import Eagle2


def record(i, *turns):
    return {"id": i, "conversations": [{"from": f, "value": v} for f, v in turns]}


def write_cut_file(path, records):
    text = json.dumps(records, indent=2)
    cut = text.index(records[-1]["conversations"][0]["value"])  # inside the last record
    path.write_text(text[:cut])


def test_cut_off_json_is_read_record_by_record(tmp_path):
    recs = [record("a_0", ("human", "hi"), ("gpt", "hello")), record("b_0", ("human", "q"), ("gpt", "a")),
            record("c_0", ("human", "cut here"), ("gpt", "never read"))]
    write_cut_file(tmp_path / "s.json", recs)
    assert [r["id"] for r in sg.iter_records(tmp_path / "s.json")] == ["a_0", "b_0"]
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / "s.json").read_text())  # the point: the file is not valid JSON


def test_turns_are_normalised_to_alternating_user_assistant():
    c = sg.normalise(record("x_1", ("gpt", "reply to an earlier part"), ("human", "q1"), ("chatgpt", "a1"),
                            ("human", "q2"), ("human", "q2 again"), ("gpt", "a2")))
    assert [t["role"] for t in c.turns] == ["user", "assistant"] and c.turns[1]["content"] == "a1"
    assert sg.normalise(record("y", ("human", "only a question"))) is None
    assert sg.normalise(record("z", ("system", "x"), ("human", "q"), ("gpt", "a"))) is None  # unknown role stops
    assert [t["content"] for t in sg.normalise(record("w", ("human", "q"), ("gpt", "a"), ("human", "q2"))).turns] \
        == ["q", "a"]


def test_split_keeps_chat_parts_together_and_drops_evaluation_prompts():
    convs = [sg.Conversation(f"chat{i}_{part}", [{"role": "user", "content": f"question {i}"},
                                                 {"role": "assistant", "content": "answer"}])
             for i in range(200) for part in range(3)]
    quoting = sg.Conversation("evil_0", [{"role": "user", "content": "Please answer:  WRITE a persuasive essay about "
                                          "the benefits of   cats in every home, for school."},
                                         {"role": "assistant", "content": "..."}])
    keys = {" ".join("write a persuasive essay about the benefits of cats in every home".split())}
    train, held, dropped = sg.split(convs + [quoting], held_out=0.1, seed=3, exclude=keys)
    assert dropped == 1 and len(train) + len(held) == 600
    side = {}
    for name, part in (("train", train), ("held", held)):
        for c in part:
            assert side.setdefault(c.chat, name) == name  # all parts of a chat on one side
    assert 0.03 < len(held) / 600 < 0.2
    assert sg.split(convs, 0.1, 3)[1] == held  # deterministic


def test_evaluation_keys_cover_mtbench_gsm8k_and_humaneval():
    from leanlm.speculative.prompts import load_prompts

    keys = sg.evaluation_keys()
    for name in ("mtbench", "gsm8k", "humaneval"):
        prompt = load_prompts(name, limit=1)[0]
        conv = sg.Conversation("q_0", [{"role": "user", "content": "Hi! " + prompt}, {"role": "assistant",
                                                                                      "content": "x"}])
        assert sg.quotes_evaluation(conv, keys), name


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from leanlm.pretrained import smollm2_135m_instruct

    return AutoTokenizer.from_pretrained(str(smollm2_135m_instruct()), local_files_only=True)


def test_assistant_mask_covers_exactly_the_answers(smol_tokenizer):
    tok = smol_tokenizer
    conv = sg.Conversation("m_0", [{"role": "user", "content": "Name a colour."},
                                   {"role": "assistant", "content": "Blue is a colour."},
                                   {"role": "user", "content": "Another one?"},
                                   {"role": "assistant", "content": "Green."}])
    ids, mask = sg.encode_conversation(tok, conv, 4096)
    assert ids == tok.apply_chat_template(conv.turns, tokenize=True, return_dict=True)["input_ids"]
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans.append(tok.decode(cur)) if cur else None
    assert [s.replace("<|im_end|>", "").strip() for s in spans] == ["Blue is a colour.", "Green."]
    assert all("<|im_end|>" in s for s in spans)  # the end-of-turn token is learned too
    cut_ids, cut_mask = sg.encode_conversation(tok, conv, 20)
    assert cut_ids == ids[:20] and cut_mask == mask[:20]


def test_sharegpt_sequences_from_a_file(tmp_path, smol_tokenizer):
    recs = [record(f"c{i}_0", ("human", f"Tell me about topic {i}."), ("gpt", f"Topic {i} is nice.")) for i in range(30)]
    write_cut_file(tmp_path / "s.json", recs + [record("cut_0", ("human", "x"), ("gpt", "y"))])
    parts, stats = sg.sharegpt_sequences(smol_tokenizer, {"train": 10, "held-out": 30}, 256, seed=0,
                                         path=tmp_path / "s.json", progress=False)
    seqs, held = parts["train"], parts["held-out"]
    assert len(seqs) == 10 and stats["records"] == 30 and stats["train"]["used"] == 10
    assert stats["train"]["answer_tokens"] == sum(sum(m) for _, m in seqs) > 0
    assert stats["held_out_pool"] == len(held) and not set(map(tuple, (s[0] for s in held))) & set(
        map(tuple, (s[0] for s in seqs)))


def test_sharegpt_evaluation_prompts_are_the_held_out_first_turns(tmp_path):
    """`spec bench --prompts sharegpt` decodes first user turns of the held-out side only (what the draft data
    never reads), in file order, long ones skipped; the set is known to the command line."""
    from leanlm.speculative.eval_sets import EVAL_SETS, load_eval_prompts

    recs = [record(f"c{i}_0", ("human", f"Question {i}?" + ("!" * 5000 if i == 7 else "")), ("gpt", f"Answer {i}."),
                   ("human", f"Follow-up {i}"), ("gpt", "More.")) for i in range(60)]
    write_cut_file(tmp_path / "s.json", recs + [record("cut_0", ("human", "x"), ("gpt", "y"))])
    train, held, _ = sg.split(sg.conversations(tmp_path / "s.json"), 0.2, 0)
    prompts = sg.heldout_prompts(path=tmp_path / "s.json", held_out=0.2)
    assert prompts == [c.turns[0]["content"] for c in held if len(c.turns[0]["content"]) <= 4000]
    assert prompts and not set(prompts) & {c.turns[0]["content"] for c in train}
    assert all(not p.startswith("Follow-up") for p in prompts)  # first turns only
    assert sg.heldout_prompts(2, path=tmp_path / "s.json", held_out=0.2) == prompts[:2]
    assert "sharegpt" in EVAL_SETS and load_eval_prompts("mtbench", 2) == load_eval_prompts("mtbench")[:2]
    long_chat = next(c for c in train + held if c.id == "c7_0")
    assert long_chat.turns[0]["content"] not in prompts  # over max_chars: skipped wherever it falls


def test_conversation_features_are_teacher_forced_and_resumable(tmp_path):
    target = tiny()
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for n in (7, 12, 5, 9, 11):
        ids = torch.randint(0, V, (n,), generator=gen).tolist()
        seqs.append((ids, [i % 3 == 0 for i in range(n)]))
    folder = tmp_path / "cache"
    build_conversation_cache(target, seqs, folder, "test", shard_size=2, batch_tokens=24, progress=False)
    data = load_feature_cache(folder)
    ref = collect_features(target, [s[0] for s in seqs], progress=False)
    for (tokens, feats, mask), (ids, m), (rt, rf) in zip(data, seqs, ref):
        assert tokens.tolist() == ids and mask.tolist() == m
        torch.testing.assert_close(feats.float(), rf.float(), atol=2e-3, rtol=1e-2)  # padded batch = one by one
    assert extraction_rate(folder)["tokens"] == sum(len(s[0]) for s in seqs)
    (folder / "shard-00001.safetensors").unlink()
    build_conversation_cache(target, seqs, folder, "test", shard_size=2, progress=False)  # rebuilds the gap only
    assert [d[0].tolist() for d in load_feature_cache(folder)] == [s[0] for s in seqs]
    more = seqs + [(list(range(6)), [True] * 6)]  # a longer list of the same source adds a shard only
    build_conversation_cache(target, more, folder, "test", shard_size=2, progress=False)
    assert [d[0].tolist() for d in load_feature_cache(folder)] == [s[0] for s in more]
    from leanlm.speculative.draft_recipe import DraftRecipe

    for n in (3, 6):  # training on the first n conversations of a cache that holds more reads those n only
        recipe = DraftRecipe("tiny", str(tmp_path / "head"), prompts=0, sharegpt=n, sharegpt_data=str(folder))
        assert [d[0].tolist() for d in recipe.load_data()[0]] == [s[0] for s in more[:n]]
    with pytest.raises(LeanLMError, match="holds other sequences"):
        build_conversation_cache(target, seqs[::-1], folder, "test", shard_size=2, progress=False)
    with pytest.raises(LeanLMError, match="other sequences or settings"):
        build_conversation_cache(target, seqs, folder, "another source", shard_size=2, progress=False)


def test_last_hidden_is_the_feature_the_lm_head_reads():
    from test_spec import tiny_hf_llama

    model, _ = tiny_hf_llama()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(last_hidden(model, ids, mask), full.hidden_states[-1])
    torch.testing.assert_close(model.lm_head(last_hidden(model, ids, mask)), full.logits)


def test_loss_mask_counts_predictions_of_answer_tokens():
    answer = torch.tensor([False, False, True, True, False, False, True, True])
    w_reg, w_cls = loss_weights(answer)
    # prediction at position i (1..7) counts when token i+1 is an answer token; the last one when the answer runs on
    assert w_cls.tolist() == [1, 1, 0, 0, 1, 1] and w_reg.tolist() == [1, 1, 0, 0, 1, 1, 1]
    target = tiny()
    head = EagleDraftHead(head_config(target.config))
    tokens = torch.randint(0, V, (12,))
    feats = collect_features(target, [tokens.tolist()], progress=False)[0][1]
    cfg = DraftTrainConfig(noise=0.0)
    emb, lm = target.get_input_embeddings(), target.get_output_embeddings()
    by_len, _ = draft_loss(head, emb, lm, tokens, feats, cfg, prompt_len=5)
    by_mask, _ = draft_loss(head, emb, lm, tokens, feats, cfg, answer=torch.arange(12) >= 5)
    torch.testing.assert_close(by_len, by_mask)
    # the last feature is only a regression target (never an input): it counts exactly when the answer runs on
    moved = feats.clone()
    moved[-1] += 1.0
    for runs_on in (False, True):
        mask = torch.arange(12) >= 6
        mask[-1] = runs_on
        a, _ = draft_loss(head, emb, lm, tokens, feats, cfg, answer=mask)
        b, _ = draft_loss(head, emb, lm, tokens, moved, cfg, answer=mask)
        assert torch.equal(a, b) != runs_on


def test_draft_vocab_selection_and_coverage():
    counts = torch.tensor([5, 0, 9, 9, 1, 3])
    vocab = select_draft_vocab(counts, 3)
    assert vocab.tolist() == [0, 2, 3]  # the most frequent; ties by id
    assert coverage(counts, vocab) == pytest.approx(23 / 27) and coverage(counts, None) == 1.0
    data = [(torch.tensor([1, 2, 2, 5]), None, torch.tensor([False, True, True, True]))]
    assert answer_token_counts(data, 6).tolist() == [0, 0, 2, 0, 0, 1]
    with pytest.raises(LeanLMError, match="draft vocabulary size"):
        select_draft_vocab(counts, 0)


def test_reduced_vocab_head_drafts_only_its_ids_and_stays_lossless(tmp_path):
    target = tiny()
    vocab = torch.arange(0, V, 2)  # half the ids
    head = EagleDraftHead(head_config(target.config), vocab).eval()
    session = DraftSession(head, target.get_input_embeddings(), target.get_output_embeddings())
    feats = torch.randn(4, target.config.hidden_size)
    session.prefill(feats, torch.tensor([1, 2, 3, 4]))
    logp = session.root()
    assert torch.isinf(logp[1::2]).all() and torch.isfinite(logp[0::2]).all()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    head.save(tmp_path / "head")
    again, _ = EagleDraftHead.load(tmp_path / "head", target.config)
    assert torch.equal(again.draft_vocab, vocab) and torch.equal(again.target_to_draft, head.target_to_draft)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    ref, _ = plain_generate(target, prompt, 20)
    out, _ = SpeculativeDecoder(target, again, Eagle2(total_tokens=8, depth=3, top_k=2)).generate(prompt, 20)
    assert out == ref


def test_reduced_vocab_training_and_bad_files(tmp_path):
    target = tiny()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (16,), generator=gen).tolist() for _ in range(6)]
    data = collect_features(target, seqs, progress=False)
    vocab = select_draft_vocab(answer_token_counts(data, V), 16)
    head = EagleDraftHead(head_config(target.config), vocab)
    logs = train_head(head, target.get_input_embeddings(), target.get_output_embeddings(), data,
                      DraftTrainConfig(epochs=2, batch_tokens=32), progress=False)
    assert all(torch.isfinite(torch.tensor(lg["cls"])) for lg in logs)
    head.save(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "draft_config.json").read_text())
    meta["draft_vocab_size"] = None  # the weights still carry a vocabulary
    (tmp_path / "h" / "draft_config.json").write_text(json.dumps(meta))
    from leanlm.checkpoint import write_manifest

    write_manifest(tmp_path / "h")
    with pytest.raises(CheckpointError, match="disagree on the draft vocabulary"):
        EagleDraftHead.load(tmp_path / "h", target.config)
    with pytest.raises(LeanLMError, match="distinct target ids"):
        EagleDraftHead(head_config(target.config), torch.tensor([1, 1, 2]))


def tree_rows(trees: int = 3, width: int = 3, layers: int = 6):
    """Synthetic collected trees: per layer `width` nodes, the first on the accepted path (a spine), each node's
    joint log-prob falling with depth; the spine is the likeliest."""
    rows = {k: [] for k in ("joint_logp", "depth", "label", "tree", "parent", "node")}
    for t in range(trees):
        node = 0
        for d in range(layers):
            for w in range(width):
                node += 1
                rows["joint_logp"].append(-0.2 * (d + 1) - 1.5 * w)
                rows["depth"].append(d)
                rows["label"].append(1.0 if w == 0 else 0.0)
                rows["tree"].append(t)
                rows["parent"].append(0 if d == 0 else node - width - w)
                rows["node"].append(node)
    rows["entropy"] = [1.0] * len(rows["depth"])
    return {k: torch.tensor(v, dtype=torch.float32 if k in ("joint_logp", "label", "entropy") else torch.long)
            for k, v in rows.items()}


def test_eagle2_replay_keeps_the_likeliest_nodes_within_depth():
    from leanlm.speculative.cost import replay_eagle2

    rows = tree_rows()
    assert replay_eagle2(rows, 4, 6) == {"total_tokens": 4, "depth": 6, "tau": 3.0, "nodes": 4.0}  # the spine
    assert replay_eagle2(rows, 60, 2)["tau"] == 2.0 and replay_eagle2(rows, 60, 2)["nodes"] == 7.0
    assert replay_eagle2(rows, 60, 6)["tau"] == 6.0


def test_tree_size_follows_the_machine():
    """Flat verification (a GPU: memory-bound) grows the tree; verification cost rising with n (this CPU) keeps it
    small; C2T's beta model reads the same interpolation."""
    from leanlm.speculative.cost import cost_aware_eagle2, interpolate_seconds

    rows = tree_rows()
    flat = {1: 0.010, 16: 0.010, 64: 0.011, 128: 0.012}
    steep = {1: 0.010, 16: 0.080, 64: 0.320, 128: 0.640}
    gpu, _ = cost_aware_eagle2(rows, flat, draft_layer_seconds=0.001)
    cpu, table = cost_aware_eagle2(rows, steep, draft_layer_seconds=0.001)
    assert gpu["depth"] == 6 and cpu["nodes"] < gpu["nodes"]
    assert max(r["tokens_per_second"] for r in table) == cpu["tokens_per_second"]
    assert interpolate_seconds(steep, 8) == pytest.approx(0.010 + 7 / 15 * 0.070)
    assert interpolate_seconds(steep, 256) == pytest.approx(1.28)


def test_overhead_per_step_is_charged_to_every_tree_size():
    """A fixed per-step cost favours trees that accept more per step: with it the chosen tree is never smaller, and
    every row's step time carries it."""
    from leanlm.speculative.cost import cost_aware_eagle2

    rows = tree_rows()
    steep = {1: 0.010, 16: 0.080, 64: 0.320, 128: 0.640}
    lean, lean_table = cost_aware_eagle2(rows, steep, draft_layer_seconds=0.001)
    heavy, heavy_table = cost_aware_eagle2(rows, steep, draft_layer_seconds=0.001, overhead_seconds=0.5)
    assert heavy["tau"] >= lean["tau"] and heavy["nodes"] > lean["nodes"]
    for a, b in zip(lean_table, heavy_table):
        assert b["step_seconds"] == pytest.approx(a["step_seconds"] + 0.5)


def test_step_overhead_finds_work_outside_the_modelled_forwards(monkeypatch):
    """With the model's terms set to zero the "tree" overhead is the whole step; a 20 ms delay added where the
    engine hands accepted tokens back to the draft head (outside the target's step and the tree's growth) shows up
    in it, and not in plain decoding's."""
    import time

    from leanlm.speculative.cost import step_overhead_seconds

    model = tiny()
    head = EagleDraftHead(head_config(model.config)).eval()
    zero = {1: 0.0, 128: 0.0}
    prefill = DraftSession.prefill
    calls = []

    def slow_prefill(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first prefill reads the prompt; the later ones are the per-step re-reads
            time.sleep(0.02)
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(DraftSession, "prefill", slow_prefill)
    over = step_overhead_seconds(model, head, zero, 0.0, context=16, new_tokens=6, top_k=3, repeats=1)
    assert over["tree"] >= 0.02 > over["plain"] >= 0.0


def test_spec_bench_sizes_trees_for_this_machine(tiny_config, tmp_path, capsys, monkeypatch):
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.speculative.c2t_train import save_rows
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    EagleDraftHead(head_config(trainer.model.config)).save(tmp_path / "head")
    save_rows(tree_rows(), tmp_path / "trees.safetensors", {"top_k": 3})
    out = tmp_path / "bench.json"
    assert main(["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--prompts", "mtbench", "--limit", "1",
                 "--max-new-tokens", "6", "--strategies", "chain", "--size-from", str(tmp_path / "trees.safetensors"),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    chosen = result["sizes"]["eagle2"]
    assert chosen["total_tokens"] in (4, 8, 12, 16, 24, 32, 48, 60, 80, 128) and 2 <= chosen["depth"] <= 8
    printed = capsys.readouterr().out
    assert "tree sizes for this machine" in printed
    sizes = result["sizes"]
    plain = sizes["plain_tokens_per_second"]  # the cost model's plain step: a 1-token verification + its overhead
    assert plain == pytest.approx(1.0 / (sizes["verify_seconds"]["1"] + sizes["overhead_seconds"]["plain"]))
    assert min(sizes["overhead_seconds"].values()) >= 0.0 and "step overhead plain" in printed
    assert f"plain decoding {plain:.1f} tokens/s" in printed
    assert ("no tree size pays" in printed) == (chosen["tokens_per_second"] < plain)
    auto = [r for r in result["rows"] if r["strategy"] == "eagle2:auto"]
    assert len(auto) == 1 and auto[0]["identical_outputs"] == 1
    from leanlm.speculative.bench import strategies_for_sizes

    assert strategies_for_sizes(result["sizes"])["eagle2:auto"].describe() == auto[0]["describe"]  # from the JSON

    from leanlm.speculative import bench

    def measured_again(*a, **k):
        raise AssertionError("a resumed run re-measured the tree sizes")

    monkeypatch.setattr(bench, "sized_strategies", measured_again)
    assert main(["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--prompts", "mtbench", "--limit", "2",
                 "--max-new-tokens", "6", "--strategies", "chain", "--size-from", str(tmp_path / "trees.safetensors"),
                 "--out", str(out)]) == 0  # resumed: one more prompt, decoded with the first start's sizes
    assert "tree sizes from the first start" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["sizes"] == result["sizes"] and again["resumed_prompts"] == 1
    assert [r["n"] for r in again["rows"] if r["strategy"] == "eagle2:auto"] == [2]
    assert main(["spec", "bench", ckpt, "--draft", str(tmp_path / "head"), "--size-from",
                 str(tmp_path / "none.safetensors")]) == 2  # refused before any model is loaded


def test_training_time_test_steps_compute_what_drafting_computes():
    """Step b of the training-time test at position i+1 equals the draft session's node at depth b+1 after a prefix
    of i+1-b positions: same keys, the head's own features as input."""
    from leanlm.speculative.train_draft import ttt_predictions

    torch.manual_seed(3)
    target = tiny()
    head = EagleDraftHead(head_config(target.config)).eval()
    tokens = torch.randint(0, V, (14,))
    feats = collect_features(target, [tokens.tolist()], progress=False)[0][1].float()
    emb_layer, lm = target.get_input_embeddings(), target.get_output_embeddings()
    with torch.no_grad():
        preds = ttt_predictions(head, feats[:-1][None], emb_layer(tokens[1:][None]), torch.arange(1, 14)[None], 2)
        for prefix in (3, 6, 9):  # pairs at positions 1..prefix are teacher-forced
            s = DraftSession(head, emb_layer, lm)
            s.prefill(feats[:prefix], tokens[1:prefix + 1])
            torch.testing.assert_close(s._feat[0], preds[0][prefix - 1], atol=1e-5, rtol=1e-4)
            s.expand(torch.tensor([1]), tokens[prefix + 1:prefix + 2], torch.tensor([0]))  # depth 1
            torch.testing.assert_close(s._feat[1], preds[1][prefix], atol=1e-5, rtol=1e-4)
            s.expand(torch.tensor([2]), tokens[prefix + 2:prefix + 3], torch.tensor([1]))  # depth 2
            torch.testing.assert_close(s._feat[2], preds[2][prefix + 1], atol=1e-5, rtol=1e-4)
    cfg = DraftTrainConfig(noise=0.0, ttt_steps=2)
    loss, st = draft_loss(head, emb_layer, lm, tokens, feats, cfg)
    base, _ = draft_loss(head, emb_layer, lm, tokens, feats, DraftTrainConfig(noise=0.0))
    assert {"acc_step1", "acc_step2", "reg_step2"} <= set(st) and loss.item() > base.item()
    loss.backward()
    assert head.fc.weight.grad is not None and torch.isfinite(head.fc.weight.grad).all()


def test_distilled_token_loss_is_the_kl_to_the_targets_distribution():
    """cls_target="target": the token loss is KL(target || head) over the draft vocabulary, the target's
    distribution read from its LM head over the cached next feature; "greedy" (default): cross-entropy against the
    target's top-1 draft id; "data": cross-entropy against the data's token."""
    import torch.nn.functional as F

    target = tiny()
    vocab = torch.arange(0, V, 3)  # a reduced draft vocabulary: the KL is over its ids only
    head = EagleDraftHead(head_config(target.config), vocab)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V, (14,), generator=gen)
    feats = collect_features(target, [tokens.tolist()], progress=False)[0][1].float()
    emb, lm = target.get_input_embeddings(), target.get_output_embeddings()
    answer = torch.arange(14) >= 4
    kl_loss, kl_st = draft_loss(head, emb, lm, tokens, feats, DraftTrainConfig(noise=0.0, cls_target="target"),
                                answer=answer)
    ce_loss, ce_st = draft_loss(head, emb, lm, tokens, feats, DraftTrainConfig(noise=0.0, cls_target="data"),
                                answer=answer)
    with torch.no_grad():
        pred = head(feats[:-1][None], emb(tokens[1:][None]), torch.arange(1, 14)[None])[0]  # [13, C]
        rows = lm.weight[vocab]
        logp = torch.log_softmax(pred[:-1] @ rows.T, -1)
        tgt = torch.log_softmax(feats[1:-1] @ rows.T, -1)
        kl = (tgt.exp() * (tgt - logp)).sum(-1)
        _, w = loss_weights(answer)
        labels = head.draft_ids(tokens[2:])
        ce = F.cross_entropy(pred[:-1] @ rows.T, labels.clamp(min=0), reduction="none")
        keep = w * (labels >= 0)
    assert kl_st["cls"] == pytest.approx(float((kl * w).sum() / w.sum()), rel=1e-4)
    assert ce_st["cls"] == pytest.approx(float((ce * keep).sum() / keep.sum()), rel=1e-4)
    _, gr_st = draft_loss(head, emb, lm, tokens, feats, DraftTrainConfig(noise=0.0), answer=answer)  # the default
    with torch.no_grad():  # "greedy": cross-entropy against the target's top-1 among the draft ids
        ce_greedy = F.cross_entropy(pred[:-1] @ rows.T, tgt.argmax(-1), reduction="none")
    assert gr_st["cls"] == pytest.approx(float((ce_greedy * w).sum() / w.sum()), rel=1e-4)
    assert kl_st["reg"] == pytest.approx(ce_st["reg"])  # the regression term is the same
    # `acc` scores against the data's token whatever the loss is
    acc = ((logp.argmax(-1) == labels) & (labels >= 0)).float()
    assert kl_st["acc"] == gr_st["acc"] == ce_st["acc"] == pytest.approx(float((acc * w).sum() / w.sum()))
    assert kl_loss.item() == pytest.approx(kl_st["reg"] + 0.1 * kl_st["cls"], rel=1e-5)
    assert kl.min() >= -1e-6 and kl_st["cls"] > 0  # a KL divergence; an untrained head's is not zero
    # evaluation scores the head's top-1 (mapped to target ids) against the target's greedy token over all V ids
    head.eval()
    _, st = draft_loss(head, emb, lm, tokens, feats, DraftTrainConfig(noise=0.0), answer=answer)
    greedy = (feats[1:-1] @ lm.weight.T).argmax(-1)
    drafted = vocab[logp.argmax(-1)]
    assert st["acc_greedy"] == pytest.approx(float(((drafted == greedy).float() * w).sum() / w.sum()))
    with pytest.raises(LeanLMError, match="cls_target 'tokens' is unknown"):
        DraftTrainConfig(cls_target="tokens")


def test_distillation_teaches_the_targets_argmax_on_text_the_target_did_not_write():
    """On random text (not the target's own answers, as ShareGPT is not SmolLM2's) a head trained on the data's
    tokens learns to predict text the target would not write; heads trained on the target's distribution or its
    top-1 learn the target's greedy token, which is what verification accepts."""
    from leanlm.speculative.train_draft import evaluate_head

    target = tiny(seed=2)
    with torch.no_grad():  # a confident target (a random one's next-token distribution is nearly uniform)
        target.get_output_embeddings().weight.mul_(40.0)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (24,), generator=gen).tolist() for _ in range(48)]
    data = collect_features(target, seqs, progress=False)
    train, held = data[:40], data[40:]
    emb, lm = target.get_input_embeddings(), target.get_output_embeddings()
    scores = {}
    for mode in ("data", "target", "greedy"):
        torch.manual_seed(0)
        head = EagleDraftHead(head_config(target.config))
        cfg = DraftTrainConfig(epochs=8, lr=3e-3, batch_tokens=128, cls_weight=1.0, cls_target=mode)
        train_head(head, emb, lm, train, cfg, progress=False)
        scores[mode] = evaluate_head(head, emb, lm, held, cfg)["acc_greedy"]
    assert min(scores["target"], scores["greedy"]) > scores["data"] + 0.15, scores
