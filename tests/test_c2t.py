"""C2T: features, classifier, tree growth (lossless greedy and sampling), data collection labels, training,
the offline replay and the cost-aware threshold, CLI."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from leanlm.speculative import SpeculativeDecoder, plain_generate
from leanlm.speculative.c2t import C2T, C2TClassifier, top_entropy
from leanlm.speculative.c2t_train import (C2TTrainConfig, EntropyRecorder, auc, collect_trees, cost_aware_beta,
                                          load_rows, replay, save_rows, train_classifier)
from leanlm.speculative.draft import EagleDraftHead, head_config
from leanlm.speculative.strategies import make_strategy
from test_spec import V, assert_samples_like_plain, decoder, sampling_target, tiny, tiny_hf_llama


def depth_classifier(threshold_depth: float = 3.5) -> C2TClassifier:
    """Hand-set weights: confidence > 0.5 exactly while P is high enough and depth < threshold_depth."""
    clf = C2TClassifier(hidden=2)
    with torch.no_grad():
        clf.fc1.weight.copy_(torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        clf.fc1.bias.zero_()
        clf.fc2.weight.copy_(torch.tensor([[1.0, -1.0]]))
        clf.fc2.bias.fill_(threshold_depth - 0.4)
    return clf.eval()


def test_top_entropy_matches_the_definition():
    logp = torch.log_softmax(torch.randn(3, 50), -1)
    p = logp.exp()
    assert torch.allclose(top_entropy(logp, None), -(p * logp).sum(-1), atol=1e-6)
    top = logp.topk(5, -1).values
    assert torch.allclose(top_entropy(logp, 5), -(top.exp() * top).sum(-1), atol=1e-6)  # not renormalised
    assert (top_entropy(logp, 5) < top_entropy(logp, None)).all()


def test_classifier_shape_scaling_and_save_load(tmp_path):
    clf = C2TClassifier()
    assert [tuple(p.shape) for p in clf.parameters()] == [(48, 3), (48,), (1, 48), (1,)]
    x = clf.inputs(torch.tensor([0.0, -2.0]), torch.tensor([1.0, 2.0]), torch.tensor([0, 3]))
    assert torch.allclose(x, torch.tensor([[1.0, 1.0, 0.0], [torch.e ** -2, 2.0, 3.0]]))  # raw: P linear
    xl = C2TClassifier(feature_scaling="log").inputs(torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([1]))
    assert torch.allclose(xl, torch.tensor([[-2.0, 1.0, 1.0]]))
    conf = clf(torch.tensor([-1.0, -3.0]), torch.tensor([0.5, 4.0]), torch.tensor([0, 2]))
    assert conf.shape == (2,) and ((conf > 0) & (conf < 1)).all()
    clf.save(tmp_path / "c", meta={"note": "x"})
    back, meta = C2TClassifier.load(tmp_path / "c")
    assert meta["note"] == "x" and torch.equal(back(torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([0])),
                                              clf(torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([0])))
    from leanlm.errors import CheckpointError
    with pytest.raises(CheckpointError, match="c2t-train"):
        C2TClassifier.load(tmp_path)
    with pytest.raises(ValueError, match="feature_scaling"):
        C2TClassifier(feature_scaling="z")


def test_c2t_growth_follows_the_classifier():
    """Every kept node passed beta, no node is deeper than the classifier allows, parents come first, each layer
    holds at most second_topk nodes, and children are the parent's top-k draft tokens."""
    target = tiny()
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(0))
    strategy = C2T(depth_classifier(2.5), beta=0.5, top_k=4, max_depth=10, second_topk=6)
    dec = decoder(target, strategy, target, 0.5, prompt)
    dec.keep_trees = True
    _, stats = dec.generate(prompt, 14)
    for tree in stats.trees:
        tree.check()
        depths = tree.depths()
        for d in range(1, max(depths) + 1):
            assert sum(x == d for x in depths) <= 6
        conf = strategy.clf(torch.as_tensor(tree.logp[1:]), torch.zeros(len(tree) - 1),
                            torch.as_tensor(depths[1:]) - 1)
        assert torch.allclose(conf, strategy.clf(torch.as_tensor(tree.logp[1:]), torch.ones(len(tree) - 1),
                                                 torch.as_tensor(depths[1:]) - 1))  # this classifier ignores H
        assert (conf >= 0.5).all()
    assert sum(len(t) for t in stats.trees) > 3 * len(stats.trees)  # real trees, not bare roots
    dec.strategy = C2T(depth_classifier(2.5), beta=0.5, top_k=4, max_depth=2)
    _, stats = dec.generate(prompt, 20)
    assert max(max(t.depths()) for t in stats.trees) == 2


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_c2t_greedy_is_token_identical_to_plain_greedy(kind):
    target = tiny(kind)
    accepted = 0
    for beta in (0.2, 0.5):
        for i in range(4):
            prompt = torch.randint(0, V, (1, 5 + i), generator=torch.Generator().manual_seed(i))
            ref, _ = plain_generate(target, prompt, 30)
            strategy = C2T(depth_classifier(4.5), beta=beta, top_k=5, max_depth=6)
            out, stats = decoder(target, strategy, target, 1.0, prompt).generate(prompt, 30)
            assert out == ref
            accepted += stats.accepted
    assert accepted > 0


def test_c2t_with_the_eagle_head_on_an_hf_target():
    target, head = tiny_hf_llama()
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    ref, _ = plain_generate(target, prompt, 25)
    out, _ = SpeculativeDecoder(target, head, C2T(C2TClassifier(), beta=0.3)).generate(prompt, 25)
    assert out == ref


def test_c2t_sampling_matches_plain_sampling():
    target = sampling_target()
    prompt = torch.tensor([[1, 2, 3]])
    spec = Counter()
    dec = decoder(target, C2T(depth_classifier(2.5), beta=0.5, top_k=3, max_depth=3), target, 0.3, prompt)
    for s in range(600):
        out, _ = dec.generate(prompt, 2, temperature=1.0, top_k=3, seed=s)
        spec[tuple(out)] += 1
    assert_samples_like_plain(target, spec, [1, 2, 3])


def test_make_strategy_knows_c2t(tmp_path):
    C2TClassifier().save(tmp_path / "clf")
    s = make_strategy("c2t", classifier=str(tmp_path / "clf"), beta=0.3)
    assert isinstance(s, C2T) and s.beta == 0.3 and "beta=0.3" in s.describe()
    with pytest.raises(ValueError, match="beta"):
        C2T(C2TClassifier(), beta=1.5)


def test_collected_labels_are_the_accepted_paths():
    """Full EAGLE-2 trees: rows per tree = every drafted node; positives per tree = accepted tokens of that step;
    the entropy of a root child is the entropy of the root distribution; depths are 0-based."""
    target = tiny()
    head = EagleDraftHead(head_config(target.config)).eval()
    prompts = [torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rows, stats = collect_trees(target, head, prompts, max_new_tokens=12, top_k=3, depth=3, entropy_top=10,
                                progress=False)
    per_tree = 3 + 2 * 9
    assert stats.nodes == stats.trees * per_tree == len(rows["label"])
    assert rows["depth"].min() == 0 and rows["depth"].max() == 2
    # positives per tree form a path from the root: one per depth at most, depths 0..k-1
    for t in range(stats.trees):
        sel = rows["tree"] == t
        pos_depths = sorted(rows["depth"][sel][rows["label"][sel] > 0.5].tolist())
        assert pos_depths == list(range(len(pos_depths)))
    # replaying the same decoding with EntropyRecorder gives the same root entropy as the rows' depth-0 nodes
    assert torch.all(rows["entropy"] > 0) and torch.all(rows["joint_logp"] <= 0)
    # labels agree with an independent decode: accepted tokens counted by the engine with the same tree shape
    from leanlm.speculative.tree import Eagle2
    accepted = 0
    for p in prompts:
        _, st = SpeculativeDecoder(target, head, Eagle2(total_tokens=1 + per_tree, depth=3, top_k=3)).generate(p, 12)
        accepted += st.accepted
    assert accepted == stats.positives


def test_entropy_recorder_records_each_distribution():
    class D:
        def root(self):
            return torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)

        def expand(self, nodes, tokens, parents):
            return torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), -1)

        def end_tree(self):
            self.ended = True

    rec = EntropyRecorder(D(), top=None)
    rec.root()
    rec.expand([4, 7], [0, 1], [0, 0])
    rec.end_tree()
    assert rec.drafter.ended
    assert rec.entropy[4] == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-6)
    assert rec.entropy[7] < rec.entropy[0] < rec.entropy[4]


def test_auc_matches_pairwise_counting():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    labels = (torch.rand(200, generator=g) < 0.3).float()
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    ref = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert auc(scores, labels) == pytest.approx(float(ref), abs=1e-6)


def synthetic_rows(n_trees=400, per=30, seed=0):
    """Trees whose accepted nodes are the likely ones: label ~ Bernoulli(sigmoid(6 * (P - 0.35) - 0.5 * depth))."""
    g = torch.Generator().manual_seed(seed)
    n = n_trees * per
    depth = torch.randint(0, 6, (n,), generator=g)
    joint = -torch.rand(n, generator=g) * (1 + depth.float())
    ent = torch.rand(n, generator=g) * 5
    p = torch.sigmoid(6 * (joint.exp() - 0.35) - 0.5 * depth)
    label = (torch.rand(n, generator=g) < p).float()
    tree = torch.arange(n_trees).repeat_interleave(per)
    node = torch.arange(1, per + 1).repeat(n_trees)
    return {"joint_logp": joint, "entropy": ent, "depth": depth, "label": label, "tree": tree, "node": node,
            "parent": torch.zeros(n, dtype=torch.long)}


def test_training_learns_a_separable_signal():
    rows = synthetic_rows()
    clf, logs = train_classifier(rows, C2TTrainConfig(epochs=10, lr=1e-2, neg_ratio=1.0, val_fraction=0.2), progress=False)
    chosen = [m for m in logs if m.get("chosen")][-1]
    assert chosen["auc"] > 0.75 and chosen["recall"] > 0.6
    assert max(m["recall"] for m in logs) <= chosen["recall"] + 0.005  # recall first
    # a positive-heavy negative-sampling ratio raises recall at beta = 0.5 (fewer negatives seen)
    few, _ = train_classifier(rows, C2TTrainConfig(epochs=10, lr=1e-2, neg_ratio=0.5, val_fraction=0.2), progress=False)
    many, _ = train_classifier(rows, C2TTrainConfig(epochs=10, lr=1e-2, neg_ratio=8.0, val_fraction=0.2), progress=False)
    x = (rows["joint_logp"], rows["entropy"], rows["depth"])
    with torch.no_grad():
        assert (few(*x) >= 0.5).float().mean() > (many(*x) >= 0.5).float().mean()


def hand_tree_rows():
    """One tree: root -> a (pos, d0), b (d0); a -> c (pos, d1), e (d1); c -> f (pos, d2)."""
    return {"joint_logp": torch.tensor([-0.1, -1.0, -0.3, -2.0, -0.6]),
            "entropy": torch.zeros(5), "depth": torch.tensor([0, 0, 1, 1, 2]),
            "label": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), "tree": torch.zeros(5, dtype=torch.long),
            "node": torch.tensor([1, 2, 3, 4, 5]), "parent": torch.tensor([0, 0, 1, 1, 3])}


def p_classifier() -> C2TClassifier:
    """confidence = sigmoid(20 * (P - 0.5)): kept iff joint probability > 0.5."""
    clf = C2TClassifier(hidden=1)
    with torch.no_grad():
        clf.fc1.weight.copy_(torch.tensor([[20.0, 0.0, 0.0]]))
        clf.fc1.bias.fill_(0.0)
        clf.fc2.weight.fill_(1.0)
        clf.fc2.bias.fill_(-10.0)
    return clf.eval()


def test_replay_prunes_subtrees_of_dropped_nodes():
    rows = hand_tree_rows()
    r = replay(p_classifier(), rows, 0.5)  # P: a .905, b .368, c .741, e .135, f .549 -> keep a, c, f
    assert r == {"beta": 0.5, "tau": 3.0, "nodes": 4.0, "layers": 3.0}
    rows["joint_logp"][0] = -1.0  # a dropped: its whole subtree goes, although c and f pass
    assert replay(p_classifier(), rows, 0.5)["nodes"] == 1.0


def test_cost_aware_beta_follows_the_verification_cost():
    rows = synthetic_rows(n_trees=50)
    clf, _ = train_classifier(rows, C2TTrainConfig(epochs=3, lr=1e-2), progress=False)
    free = {1: 1.0, 1000: 1.0}  # verification cost independent of n (GPU-like)
    steep = {1: 1.0, 1000: 1000.0}  # linear in n (CPU-like, exaggerated)
    b_free, table = cost_aware_beta(clf, rows, free, draft_layer_seconds=0.0)
    b_steep, _ = cost_aware_beta(clf, rows, steep, draft_layer_seconds=0.0)
    assert b_free <= b_steep
    best = max(table, key=lambda r: r["tokens_per_second"])
    assert best["beta"] == b_free and all(r["nodes"] >= 1 for r in table)


def test_cli_c2t_collect_train_generate(tiny_config, tmp_path, capsys):
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    head = tmp_path / "head"
    EagleDraftHead(head_config(trainer.model.config)).save(head)
    data = tmp_path / "c2t.safetensors"
    assert main(["spec", "c2t-collect", ckpt, "--draft", str(head), "--out", str(data), "--prompts", "3",
                 "--max-new-tokens", "6", "--top-k", "3", "--depth", "3"]) == 0
    assert "trees" in capsys.readouterr().out
    rows, meta = load_rows(data)
    assert meta["trees"] == int(rows["tree"].max()) + 1 and meta["top_k"] == 3
    if rows["label"].sum() == 0:  # an untrained head on a 2-step model: nothing accepted, refused clearly
        assert main(["spec", "c2t-train", str(data), "--out", str(tmp_path / "none")]) == 2
        assert "no accepted node" in capsys.readouterr().err
    save_rows(synthetic_rows(n_trees=40), data, {"entropy_top": 1000})
    clf = tmp_path / "clf"
    assert main(["spec", "c2t-train", str(data), "--out", str(clf), "--epochs", "2", "--neg-ratio", "2"]) == 0
    out = capsys.readouterr().out
    assert "recall" in out and "AUC" in out
    assert main(["generate", ckpt, "--prompt", "the", "--max-new-tokens", "8", "--temperature", "0", "--spec",
                 "c2t", "--draft", str(head), "--classifier", str(clf), "--beta", "0.3"]) == 0
    assert "c2t(beta=0.3" in capsys.readouterr().out
    assert main(["generate", ckpt, "--prompt", "the", "--spec", "c2t", "--draft", str(head)]) == 2
    assert "--classifier" in capsys.readouterr().err
    assert main(["spec", "c2t-train", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2


def test_compact_rows_round_trip(tmp_path):
    """`save_rows(compact=True)` (the form committed beside a classifier) loads back to the same indices and labels,
    the entropy within float16's rounding, in the dtypes replay and training expect; values that do not fit 16 bits
    are refused rather than wrapped."""
    rows = synthetic_rows(n_trees=20)
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    save_rows(rows, full, {"trees": 20})
    save_rows(rows, small, {"trees": 20}, compact=True)
    assert small.stat().st_size < 0.6 * full.stat().st_size
    back, meta = load_rows(small)
    assert meta == {"trees": 20}
    for k in ("depth", "tree", "node", "parent"):
        assert back[k].dtype == torch.long and torch.equal(back[k], rows[k])
    assert back["label"].dtype == torch.float32 and torch.equal(back["label"], rows["label"])
    assert torch.equal(back["joint_logp"], rows["joint_logp"])
    assert torch.allclose(back["entropy"], rows["entropy"], rtol=1e-3, atol=1e-3)
    assert not torch.equal(back["entropy"], rows["entropy"])  # it was stored in float16
    big = dict(rows, node=rows["node"] + 40_000)
    with pytest.raises(ValueError, match="node"):
        save_rows(big, tmp_path / "big.safetensors", {}, compact=True)
