"""The command line: train / eval / generate end to end, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import yaml

from leanlm.cli import main


def write_cfg(tmp_path, raw) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_eval_generate(tiny_config, tmp_path, capsys):
    raw = tiny_config(max_steps=8, ckpt_every=8, eval_every=8)
    cfg = write_cfg(tmp_path, raw)
    assert main(["train", cfg, "--set", "train.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "final: val_loss" in out
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000008"
    saved = json.loads((ckpt / "run_config.json").read_text())
    assert saved["train"]["lr"] == 2e-3

    assert main(["eval", str(ckpt), "--batches", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["val_ppl"] > 1 and metrics["tokens"] > 0
    # bits per byte = nats per token / ln 2 * tokens per byte, and this BPE packs more than one byte per token
    assert 0 < metrics["bits_per_byte"] < metrics["val_loss"] / 0.693

    assert main(["generate", str(ckpt), "--prompt", "The king", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The king") and len(text) > len("The king")


def test_bad_set_key_fails_before_any_work(tiny_config, tmp_path, capsys):
    raw = tiny_config()
    cfg = write_cfg(tmp_path, raw)
    assert main(["train", cfg, "--set", "train.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "Fix:" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_bad_config_values_fail_with_one_line(tiny_config, tmp_path, capsys):
    raw = tiny_config()
    raw["model"]["num_key_value_heads"] = 3
    assert main(["train", write_cfg(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "num_key_value_heads" in err and err.count("\n") == 1
    assert main(["train", "no-such-config"]) == 2
    assert "CONFIG" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_wisca_command_transforms_a_checkpoint(tiny_config, tmp_path, capsys):
    import torch

    from leanlm.inference import load_model_and_tokenizer

    raw = tiny_config(max_steps=4, ckpt_every=4, eval_every=4)
    assert main(["train", write_cfg(tmp_path, raw)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    out = tmp_path / "balanced"
    capsys.readouterr()
    assert main(["wisca", str(ckpt), str(out), "--qk", "channel"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn" in printed and "after" in printed
    a, _ = load_model_and_tokenizer(str(ckpt))
    b, tok = load_model_and_tokenizer(str(out))
    x = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    assert float((la - lb).abs().max() / la.abs().max()) < 1e-5
    assert not torch.equal(a.model.layers[0].self_attn.k_proj.weight, b.model.layers[0].self_attn.k_proj.weight)
    assert main(["wisca", str(ckpt), str(out)]) == 2  # refuses to overwrite
    assert main(["wisca", str(ckpt), str(tmp_path / "x"), "--qk", "rows"]) == 2
    assert "wisca.qk" in capsys.readouterr().err


def test_bad_corpus_fails_before_any_work(tiny_config, tmp_path, capsys, monkeypatch):
    from leanlm.corpus import cache_root

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))  # a private cache: other test workers write the shared one
    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "a.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    raw = tiny_config()
    raw["data"]["source"] = str(bad)
    assert main(["train", write_cfg(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "Fix:" in err
    assert not (tmp_path / "run").exists()
    data = cache_root() / "data"
    left = [p.name for p in data.iterdir() if not p.name.endswith(".build-lock")] if data.exists() else []
    assert left == []  # no half-built data cache left behind (only the empty lock file of the attempt)


def test_demo_runs_end_to_end(tmp_path, capsys):
    from leanlm.demo import run_demo

    result = run_demo(out_dir=str(tmp_path / "demo"), steps=4, spec_prompts=1, spec_tokens=12)
    out = capsys.readouterr().out
    for step in ("[1] data", "[2] train", "[3] evaluate", "[4] generate", "[5] kv cache",
                 "WISCA: 1 output-preserving", "ASA layers (0: local, 1: global"):
        assert step in out
    assert 1 < result["val_ppl"] < 10_000 and result["sample"].startswith("KING HENRY.")
    assert result["val_ppl"] == pytest.approx(result["trained_val_ppl"], rel=1e-4)  # reloaded == trained
    assert result["cache_bytes_measured"] == result["cache_bytes_accounted"] > 0
    assert 0.4 < result["asa_vs_nsa_128k"] < 0.7
    if result["spec"]:  # assets/ holds the SmolLM2 draft head and C2T classifier
        assert "[6] speculate" in out
        assert result["spec"]["eagle2"]["identical"] == result["spec"]["c2t"]["identical"] == 1
        from leanlm.pretrained import committed_draft

        if (committed_draft("smollm2")[1] / "trees.safetensors").exists():  # trees sized to this machine as well
            assert "tree sizes for this machine" in out and "tokens/s, plain decoding" in out
            assert result["spec"]["eagle2:auto"]["identical"] == result["spec"]["c2t:auto"]["identical"] == 1
