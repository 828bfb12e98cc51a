"""Shared fixtures: a small synthetic English-like corpus and a tiny run config, so tests run in seconds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LEANLM_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs `-n auto`) every worker gets its share of the cores, so two workers on two cores
# do not each start two BLAS threads; set before torch is imported (torch reads it once).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))
# Triton kernels run on CPU tensors through the interpreter; Triton reads this when it first decorates a kernel, so it
# is set before any test module imports leanlm (on a GPU: LEANLM_TEST_DEVICE=cuda TRITON_INTERPRET=0).
if os.environ.get("LEANLM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = ("the king queen lord good night day sword crown love death heart fair sweet noble brother father "
         "mother son daughter speak come go hence thou thee thy art hath doth shall will not what why where "
         "when now here there upon with from into under over before after battle peace honour gold silver "
         "field castle gate wind storm sea river mountain bread wine fire light dark old young true false").split()


def make_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        paras = []
        for _ in range(rng.randint(3, 6)):
            sents = []
            for _ in range(rng.randint(2, 5)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
                sents.append(" ".join(words).capitalize() + rng.choice(".!?"))
            paras.append(" ".join(sents))
        (root / f"doc{d:03d}.txt").write_text("\n\n".join(paras) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_raw_config(corpus: Path, out_dir: Path, **train) -> dict:
    """A nested run-config dict for a 2-layer model that trains in a second or two."""
    t = {"out_dir": str(out_dir), "max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
         "eval_every": 6, "eval_batches": 2, "ckpt_every": 4, "log_every": 1, "progress": False,
         "keep_checkpoints": 10}
    t.update(train)
    return {
        "model": {"vocab_size": 384, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "data": {"source": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        "train": t,
    }


@pytest.fixture
def tiny_config(corpus_dir, tmp_path):
    def make(**train):
        out = train.pop("out_dir", tmp_path / "run")
        return tiny_raw_config(corpus_dir, out, **train)

    return make


def trained_tiny_target(config: dict):
    """A tiny leanlm model trained on the bundled text from the run config `config`, 40 prompts of 8 validation
    tokens, and the target's greedy continuations (40 tokens) of the first 32: draft-head training data."""
    import torch

    from leanlm.runconfig import build_run_config
    from leanlm.speculative import plain_generate
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(config))
    trainer.fit()
    target = trainer.model.eval()
    val = torch.from_numpy(trainer.data.val.astype("int64"))
    prompts = [val[i * 9: i * 9 + 8][None] for i in range(40)]
    seqs = [p[0].tolist() + plain_generate(target, p, 40)[0] for p in prompts[:32]]
    return target, prompts, seqs


def mean_tau(target, head, prompts, max_new_tokens: int = 30) -> float:
    """Accepted draft tokens per step of greedy EAGLE-2 decoding (16 nodes, depth 4, top-k 4) over `prompts`,
    asserting every output equals plain greedy decoding."""
    from leanlm.speculative import Eagle2, SpeculativeDecoder, plain_generate

    acc = steps = 0
    for p in prompts:
        ref, _ = plain_generate(target, p, max_new_tokens)
        out, stats = SpeculativeDecoder(target, head, Eagle2(total_tokens=16, depth=4, top_k=4)).generate(
            p, max_new_tokens)
        assert out == ref
        acc, steps = acc + stats.accepted, steps + stats.steps
    return acc / steps
