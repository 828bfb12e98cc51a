"""EAGLE-3 heads in vLLM's speculators format: lossless decoding with leanlm's engine, the round trip through the
speculators package's own config and model classes (both directions, logits compared at every training-time-test
step, the draft vocabulary's d2t/t2d kept), EAGLE-3 training, and clear refusals of what leanlm cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanlm.errors import CheckpointError, LeanLMError
from leanlm.speculative import Chain, Eagle2, SpeculativeDecoder, plain_generate
from leanlm.speculative.draft import head_config
from leanlm.speculative.eagle3 import Eagle3DraftHead, check_feature_layers, default_feature_layers
from leanlm.speculative.heads import load_head
from leanlm.speculative.train_draft import (DraftTrainConfig, collect_features, eagle3_ttt_logits, select_draft_vocab,
                                            train_head, answer_token_counts)

V, C, LAYERS = 64, 32, 6
FEATURES = (1, 3, 4)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def random_head(target, vocab=None, seed: int = 1) -> Eagle3DraftHead:
    """An EAGLE-3 head with random weights everywhere (norms too, so a swapped norm would show)."""
    torch.manual_seed(seed)
    head = Eagle3DraftHead(head_config(target.config), FEATURES, vocab).init_from_target(target.lm_head)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return head.eval()


def test_feature_layer_ids_are_checked():
    assert default_feature_layers(30) == (2, 15, 27)
    assert check_feature_layers([1, 3, 4], LAYERS) == (1, 3, 4)
    for bad in ([], [1, 1], [-1, 2], [1, LAYERS]):
        with pytest.raises(LeanLMError, match="Fix"):
            check_feature_layers(bad, LAYERS)


@pytest.mark.parametrize("strategy", [Chain(4), Eagle2(total_tokens=16, depth=4, top_k=4)], ids=lambda s: s.describe())
def test_eagle3_head_decodes_token_identically(strategy):
    """Greedy speculative decoding with an EAGLE-3 head (reading three target layers, drafting over a reduced
    vocabulary) gives exactly the target's greedy tokens, for a Hugging Face target and for a leanlm one."""
    from leanlm.config import LeanLMConfig
    from leanlm.model import LeanLMForCausalLM

    torch.manual_seed(0)
    lean = LeanLMForCausalLM(LeanLMConfig(vocab_size=V, hidden_size=C, num_hidden_layers=LAYERS, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=512)).eval()
    for target in (tiny_llama(), lean):
        head = random_head(target, vocab=torch.arange(0, V, 2))
        for i in range(3):
            prompt = torch.randint(0, V, (1, 6 + i), generator=torch.Generator().manual_seed(i))
            ref, _ = plain_generate(target, prompt, 24)
            out, stats = SpeculativeDecoder(target, head, strategy).generate(prompt, 24)
            assert out == ref
            assert stats.steps > 0


def _inputs(target, t: int = 20, seed: int = 0):
    """Tokens [T] and the target's EAGLE-3 layer features [T, 3C] (HF hidden_states indices)."""
    tokens = torch.randint(0, V, (t,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hs = target(tokens[None], output_hidden_states=True).hidden_states
    return tokens, torch.cat([hs[k][0] for k in FEATURES], dim=-1)


def _speculators_step_logits(model, target, tokens, feats, steps: int) -> list[torch.Tensor]:
    """The logits speculators' own Eagle3DraftModel.forward computes at each TTT step (captured from its LM head),
    on the inputs as speculators' shift_batch aligns them (input ids from the second token, features to the
    second-last, positions from 1)."""
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().clone()))
    n = len(tokens) - 1
    with torch.no_grad():
        model(hidden_states=feats[:-1][None], input_ids=tokens[1:][None], document_ids=torch.zeros(1, n, dtype=torch.long),
              position_ids=torch.arange(1, n + 1)[None], ttt_steps=steps + 1)
    hook.remove()
    return seen


def test_export_round_trips_through_speculators(tmp_path):
    """leanlm writes an EAGLE-3 head; speculators' Eagle3SpeculatorConfig / Eagle3DraftModel read it with every
    weight and the d2t/t2d mapping intact, and compute the same logits as leanlm at each of three TTT steps."""
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    target = tiny_llama()
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(3))
    vocab = select_draft_vocab(counts, 40)
    head = random_head(target, vocab)
    verifier = tmp_path / "target"
    target.save_pretrained(str(verifier))  # speculators reads the verifier's embedding and final norm from it
    folder = tmp_path / "eagle3"
    head.save(folder, verifier=str(verifier), verifier_architectures=["LlamaForCausalLM"], meta={"note": "test"})

    cfg = Eagle3SpeculatorConfig.from_pretrained(str(folder))
    assert cfg.draft_vocab_size == 40 and cfg.eagle_aux_hidden_state_layer_ids == list(FEATURES)
    assert cfg.speculators_config.verifier.name_or_path == str(verifier)
    assert cfg.speculators_config.verifier.architectures == ["LlamaForCausalLM"]
    assert cfg.transformer_layer_config.model_type == "llama" and cfg.transformer_layer_config.num_hidden_layers == 1
    cfg.transformer_layer_config._attn_implementation = "eager"  # flex attention needs a compiler on CPU
    model = Eagle3DraftModel.from_pretrained(str(folder), config=cfg).eval()
    # (its embedding is the verifier's; `_speculators_step_logits` sets it explicitly: under transformers 5.23,
    # newer than speculators 0.9.0 pins, from_pretrained leaves the skipped embedding uninitialised, not NaN)
    ours = head.state_dict()
    theirs = model.state_dict()
    for name, value in ours.items():
        assert torch.equal(theirs[name].to(value.dtype), value), name
    assert torch.equal(model.d2t + torch.arange(40), vocab) and torch.equal(model.t2d.nonzero()[:, 0], vocab)

    tokens, feats = _inputs(target)
    expected = _speculators_step_logits(model, target, tokens, feats, steps=2)
    with torch.no_grad():
        got = eagle3_ttt_logits(head, target.get_input_embeddings(), tokens, feats, steps=2)
    assert len(expected) == len(got) == 3
    for step, (a, b) in enumerate(zip(expected, got)):
        valid = len(tokens) - 1 - step  # rows past the end read padding tokens in both; compare the real ones
        torch.testing.assert_close(b[:valid], a[:valid], rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_import_of_a_head_that_speculators_saved(tmp_path):
    """A head built and saved by speculators itself (its own init, its embedding copy in the file) loads into
    leanlm with the same logits, and decodes losslessly in leanlm's engine."""
    from speculators import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig
    from transformers import LlamaConfig

    target = tiny_llama()
    layer = LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8)
    layer._attn_implementation = "eager"
    cfg = Eagle3SpeculatorConfig(
        transformer_layer_config=layer, draft_vocab_size=48, eagle_aux_hidden_state_layer_ids=list(FEATURES),
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
            default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None, architectures=[])))
    torch.manual_seed(5)
    model = Eagle3DraftModel(cfg).eval()
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(2))[:48].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    model.load_vocab_mappings(t2d, ids - torch.arange(48))
    with torch.no_grad():
        model.lm_head.weight.copy_(target.lm_head.weight[ids])
        model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = tmp_path / "theirs"
    model.save_pretrained(str(folder))
    assert "embed_tokens.weight" in load_file(str(folder / "model.safetensors"))

    head, meta = load_head(folder, target.config)
    assert isinstance(head, Eagle3DraftHead) and meta["speculators_model_type"] == "eagle3"
    assert head.feature_layers == FEATURES and torch.equal(head.draft_vocab, ids)
    tokens, feats = _inputs(target, seed=4)
    expected = _speculators_step_logits(model, target, tokens, feats, steps=1)
    with torch.no_grad():
        got = eagle3_ttt_logits(head, target.get_input_embeddings(), tokens, feats, steps=1)
    for step, (a, b) in enumerate(zip(expected, got)):
        valid = len(tokens) - 1 - step
        torch.testing.assert_close(b[:valid], a[:valid], rtol=1e-4, atol=1e-4)
    prompt = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(9))
    ref, _ = plain_generate(target, prompt, 20)
    out, _ = SpeculativeDecoder(target, head, Eagle2(total_tokens=12, depth=3, top_k=3)).generate(prompt, 20)
    assert out == ref


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            cfg[outer][inner] = value
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    (folder / "manifest.json").unlink(missing_ok=True)  # hand-edited, as a user would


@pytest.mark.parametrize("changes,field", [
    ({"fc_norm": True}, "fc_norm"),
    ({"norm_output": True}, "norm_output"),
    ({"transformer_layer_config.num_hidden_layers": 2}, "num_hidden_layers"),
    ({"speculators_model_type": "mtp"}, "speculators_model_type"),
    ({"eagle_aux_hidden_state_layer_ids": [1, 3, LAYERS]}, "eagle_aux_hidden_state_layer_ids"),
    ({"target_hidden_size": 64}, "target_hidden_size"),
])
def test_unsupported_speculators_folders_are_refused_naming_the_field(tmp_path, changes, field):
    target = tiny_llama()
    folder = tmp_path / "h"
    random_head(target, torch.arange(0, V, 2)).save(folder)
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=field):
        load_head(folder, target.config)


def test_damaged_vocabulary_mapping_is_refused(tmp_path):
    target = tiny_llama()
    folder = tmp_path / "h"
    random_head(target, torch.arange(0, V, 2)).save(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["t2d"] = torch.zeros(V, dtype=torch.bool)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="d2t"):
        load_head(folder, target.config)
    with pytest.raises(CheckpointError, match="neither"):
        (tmp_path / "empty").mkdir()
        load_head(tmp_path / "empty", target.config)


def test_eagle3_training_lifts_accuracy_at_every_depth(tiny_config):
    """EAGLE-3's loss (KL to the target's distribution, three TTT steps) trains the head: teacher-forced accuracy
    at depth 1 and the accuracy of the head fed its own outputs (depth 2, 3) all rise, and decoding with it gets
    more tokens accepted than with the untrained head, token-identically. Target: a tiny leanlm model trained on
    the bundled text (2 layers; the head reads hidden_states 0 and 1)."""
    from conftest import mean_tau, trained_tiny_target

    target, prompts, seqs = trained_tiny_target(tiny_config(max_steps=30, ckpt_every=0, eval_every=0))
    vocab_size = target.config.vocab_size
    layers = (0, 1)
    data = [(t, f, 8) for t, f in collect_features(target, seqs, progress=False, feature_layers=layers)]
    assert data[0][1].shape == (len(seqs[0]), 3 * target.config.hidden_size)  # two layers and the last state
    vocab = select_draft_vocab(answer_token_counts(data, vocab_size), 256)
    torch.manual_seed(0)
    head = Eagle3DraftHead(head_config(target.config), layers, vocab).init_from_target(target.lm_head)
    untrained = Eagle3DraftHead(head_config(target.config), layers, vocab)
    untrained.load_state_dict(head.state_dict())
    frozen = head.lm_head.weight.clone()
    cfg = DraftTrainConfig(epochs=6, lr=3e-3, batch_tokens=512, ttt_steps=2)
    logs = train_head(head, target.get_input_embeddings(), target.lm_head, data[:28], cfg, progress=False,
                      val_data=data[28:])
    first, last = logs[0], logs[-1]
    assert last["kl"] < 0.7 * first["kl"]
    for key in ("acc", "acc_step1", "acc_step2"):
        assert last["val"][key] > first[key] + 0.1, (key, first[key], last["val"][key])
    assert torch.equal(head.lm_head.weight, frozen)  # the target's rows stay frozen
    taus = {name: mean_tau(target, h.eval(), prompts[32:]) for name, h in (("trained", head),
                                                                          ("untrained", untrained))}
    assert taus["trained"] > taus["untrained"] + 0.3, taus


def test_cli_trains_an_eagle3_head_that_generate_reads(tiny_config, tmp_path, capsys):
    """`leanlm spec train-draft --arch eagle3` writes a speculators folder (layers, draft vocabulary, verifier) that
    `leanlm generate --spec` decodes with; bad layer ids and a cache of the other kind are refused with exit 2."""
    from leanlm.cli import main
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=2, ckpt_every=2, eval_every=0)))
    trainer.fit()
    ckpt = str(trainer.ckpt_dir / "step-00000002")
    head = tmp_path / "head"
    common = ["--prompts", "6", "--max-new-tokens", "6", "--epochs", "1"]
    assert main(["spec", "train-draft", ckpt, "--out", str(head), *common, "--arch", "eagle3", "--feature-layers",
                 "0,1", "--draft-vocab", "128"]) == 0
    assert "KL" in capsys.readouterr().out
    cfg = json.loads((head / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    assert cfg["draft_vocab_size"] == 128 and cfg["speculators_config"]["verifier"]["name_or_path"] == ckpt
    assert cfg["leanlm"]["train"]["ttt_steps"] == 2  # EAGLE-3's default: three steps
    loaded, _ = load_head(head, trainer.model.config)
    assert loaded.feature_layers == (0, 1) and len(loaded.draft_vocab) == 128
    assert main(["generate", ckpt, "--prompt", "the", "--max-new-tokens", "8", "--temperature", "0", "--spec",
                 "eagle2", "--draft", str(head)]) == 0
    capsys.readouterr()
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h2"), *common, "--arch", "eagle3",
                 "--feature-layers", "0,2", "--data", str(tmp_path / "d2")]) == 2
    assert "feature layers" in capsys.readouterr().err
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h3"), *common, "--feature-layers", "0,1"]) == 2
    assert "--arch eagle3" in capsys.readouterr().err
    # the EAGLE-3 cache of the first run is not read as EAGLE-1 data (nor the other way round)
    assert main(["spec", "train-draft", ckpt, "--out", str(tmp_path / "h4"), *common,
                 "--data", str(tmp_path / "head-data")]) == 2
    assert "feature cache" in capsys.readouterr().err


def test_draft_session_matches_the_training_time_test():
    """What drafting computes with an EAGLE-3 head (DraftSession: prefill with the target's layer features, then a
    chain of nodes each reading its parent's output) equals, number for number, what training computes at TTT steps
    0, 1, 2 for the same prefix: training optimises the drafting the engine does."""
    from leanlm.speculative.draft import DraftSession

    target = tiny_llama()
    vocab = torch.arange(0, V, 2)
    head = random_head(target, vocab)
    tokens, feats = _inputs(target, t=14, seed=7)
    embed = target.get_input_embeddings()
    with torch.no_grad():
        steps = eagle3_ttt_logits(head, embed, tokens, feats, steps=2)
    for p in (5, 9):  # prefix of pairs at positions 1..p: row p-1 of each TTT step
        session = DraftSession(head, embed, target.lm_head)
        session.prefill(feats[:p], tokens[1:p + 1])
        got = [session.root()]
        for depth in (1, 2):
            node = torch.tensor([depth])
            got.append(session.expand(node, tokens[p + depth: p + depth + 1], node - 1)[0])
        for step, logp in enumerate(got):
            expected = torch.log_softmax(steps[step][p - 1].float(), -1)
            torch.testing.assert_close(logp[vocab], expected, rtol=1e-4, atol=1e-5, msg=f"prefix {p}, step {step}")
            assert torch.isinf(logp[1::2]).all()  # ids outside the draft vocabulary are never drafted
