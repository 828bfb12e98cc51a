"""WISCA as a `transformers.TrainerCallback`: with HF's Trainer (plain and PEFT LoRA models) and TRL's SFTTrainer,
logits unchanged across every transition, transitions at the configured steps and logged, and a run resumed from a
Trainer checkpoint transitions at the same steps (and ends where the uninterrupted run ends)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from leanlm.errors import ConfigError
from leanlm.wisca import WiscaConfig, WiscaTrainerCallback

V = 64
PROBE = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))


class Probe(WiscaTrainerCallback):
    """Records the largest logit change on a fixed batch across each transition."""

    changes: list[tuple[int, float]] = []

    def transition(self, model, optimizer, step, state=None):
        was = model.training
        model.eval()
        with torch.no_grad():
            before = model(input_ids=PROBE).logits
            record = super().transition(model, optimizer, step, state)
            after = model(input_ids=PROBE).logits
        model.train(was)
        Probe.changes.append((step, float((after - before).abs().max() / before.abs().max())))
        return record


def tiny_llama(vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 64):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, V, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, save_steps=4,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                restore_callback_states_from_checkpoint=True, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_callback_preserves_logits_logs_and_resumes(tmp_path):
    Probe.changes = []
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path / "a"), train_dataset=dataset(),
                      callbacks=[Probe(WiscaConfig(every=3))])
    trainer.train()
    assert [s for s, _ in Probe.changes] == [0, 3, 6]
    assert max(c for _, c in Probe.changes) < 1e-5  # output-preserving, in float32
    logged = [r["step"] for r in trainer.state.log_history if "wisca_s_mean" in r]
    assert logged == [0, 3, 6]
    final = model(input_ids=PROBE).logits.detach()

    # Resume from the step-4 checkpoint in a new run: the transition at step 6 happens again, the log is restored.
    Probe.changes = []
    again = tiny_llama()
    resumed = Trainer(model=again, args=args(tmp_path / "b"), train_dataset=dataset(),
                      callbacks=[Probe(WiscaConfig(every=3))])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert [s for s, _ in Probe.changes] == [6]
    cb = next(c for c in resumed.callback_handler.callbacks if isinstance(c, WiscaTrainerCallback))
    assert [r["step"] for r in cb.log] == [0, 3, 6]
    assert torch.allclose(again(input_ids=PROBE).logits, final, atol=1e-4, rtol=1e-4)


def test_trainer_callback_with_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    Probe.changes = []
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    Trainer(model=model, args=args(tmp_path / "lora", max_steps=4, save_steps=100), train_dataset=dataset(),
            callbacks=[Probe(WiscaConfig(every=2, lora="both"))]).train()
    assert [s for s, _ in Probe.changes] == [0, 2]
    assert max(c for _, c in Probe.changes) < 1e-5


def test_trl_sft_trainer(tmp_path, corpus_dir):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from leanlm.corpus import load_documents
    from leanlm.data import train_bpe

    tok = train_bpe(load_documents(str(corpus_dir)), 300)
    rows = [{"text": p.read_text()[:200]} for p in sorted(corpus_dir.glob("*.txt"))]
    Probe.changes = []
    model = tiny_llama(len(tok))  # PROBE's ids (< 64) are valid for this vocabulary too
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                        learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                        max_length=32, disable_tqdm=True, dataset_text_field="text", packing=False,
                        bf16=False)  # SFTConfig defaults to bf16 autocast, which would blur the fp32 comparison
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Probe(WiscaConfig(every=2))])
    trainer.train()
    assert [s for s, _ in Probe.changes] == [0, 2]
    assert max(c for _, c in Probe.changes) < 1e-5
    assert [r["step"] for r in trainer.state.log_history if "wisca_s_mean" in r] == [0, 2]


def test_trainer_callback_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="wisca.apply"):
        WiscaTrainerCallback(WiscaConfig(every=2, apply="lr"))
    assert WiscaTrainerCallback({"every": 5}).cfg.every == 5  # the form transformers restores it from
