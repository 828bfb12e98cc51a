"""Reliability: no lost runs (out_dir ownership, locks, pruning by step, fallback past corrupt checkpoints), no
silent wrong results (checksums, non-finite values, empty sources, context limits), and one clear line (exit 2) for
every bad input the CLI and the loaders meet. The data-loss cases run end to end through the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from leanlm.checkpoint import list_checkpoints, save_checkpoint
from leanlm.cli import main
from leanlm.errors import CheckpointError, ConfigError, ModelError, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> tuple[int, str, str]:
    """`leanlm ARGV` in this process: (exit status, stdout, stderr); argparse's exits count as statuses."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, *words: str) -> str:
    """Exit 2 and stderr ending in one `leanlm ...: error: ... Fix: ...` line (progress bars before it may exist)."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and "Fix" in last, err
    for w in words:
        assert w in last, (w, last)
    return last


def write_cfg(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def snapshot(root: Path, skip: tuple[str, ...] = (".lock",)) -> dict[str, str]:
    """sha256 of every file under `root` (names in `skip` left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture
def trained(tiny_config, tmp_path):
    """A run of 8 steps with checkpoints at 4 and 8 in tmp_path/run; returns (config path, raw config, out_dir)."""
    raw = tiny_config(max_steps=8, ckpt_every=4, eval_every=4)
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    rc, _, err = run(["train", cfg])
    assert rc == 0, err
    return cfg, raw, Path(raw["train"]["out_dir"])


# ------------------------------------------------------------------------------------------------ data loss
def test_fresh_run_refuses_an_out_dir_holding_another_run(trained):
    cfg, _, out = trained
    before = snapshot(out)
    rc, _, err = run(["train", cfg, "--set", "train.resume=never", "--set", "train.max_steps=2"])
    assert_one_line_error(rc, err, "train.resume", "step 8", "train.overwrite")
    assert snapshot(out) == before  # nothing deleted, nothing added
    # Told to overwrite, it replaces the old run: its own checkpoint exists and `latest` names it.
    rc, stdout, err = run(["train", cfg, "--set", "train.resume=never", "--set", "train.overwrite=true",
                           "--set", "train.max_steps=2", "--set", "train.ckpt_every=2"])
    assert rc == 0, err
    printed = Path(stdout.strip().splitlines()[-1].split("checkpoint ")[-1])
    assert printed.is_dir() and printed.name == "step-00000002"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_pruning_goes_by_step_and_never_deletes_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (300, 99_999_999, 100_000_000):
        save_checkpoint(root, step, lambda d: (d / "x").write_text("."), keep=0)
    assert [s for s, _ in list_checkpoints(root)] == [300, 99_999_999, 100_000_000]  # numeric, not by name
    save_checkpoint(root, 50, lambda d: (d / "x").write_text("."), keep=2)  # later steps are not pruned here
    assert [s for s, _ in list_checkpoints(root)] == [50, 300, 99_999_999, 100_000_000]
    save_checkpoint(root, 100_000_001, lambda d: (d / "x").write_text("."), keep=2)
    assert [s for s, _ in list_checkpoints(root)] == [100_000_000, 100_000_001]
    assert (root / "latest").read_text().strip() == "step-100000001"


def _build_once(target: Path, log: Path) -> None:
    from leanlm.lock import build_once

    def build() -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that every other process reaches the lock while this one builds
        target.write_text("built")

    build_once(target, target.exists, build)


def test_build_lock_builds_a_shared_cache_once_across_processes(tmp_path):
    import multiprocessing as mp

    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    procs = [mp.get_context("fork").Process(target=_build_once, args=(target, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(log.read_text().splitlines()) == 1  # one builder; the other three waited and found it built
    assert target.read_text() == "built"


def test_second_trainer_on_one_out_dir_is_refused(tiny_config, tmp_path):
    raw = tiny_config(max_steps=2, ckpt_every=2, eval_every=2)
    cfg = write_cfg(tmp_path / "cfg.yaml", raw)
    out = Path(raw["train"]["out_dir"])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from leanlm.lock import OutDirLock; "
                               "lock = OutDirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = run(["train", cfg])
        assert_one_line_error(rc, err, "in use by another trainer", f"pid {holder.pid}")
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    rc, _, err = run(["train", cfg])
    assert rc == 0, err


def test_resuming_a_checkpoint_into_another_runs_out_dir_is_refused(trained, tiny_config, tmp_path):
    cfg, _, out = trained
    other = tiny_config(max_steps=2, ckpt_every=2, eval_every=2, out_dir=str(tmp_path / "other"))
    assert run(["train", write_cfg(tmp_path / "other.yaml", other)])[0] == 0
    before = snapshot(tmp_path / "other")
    rc, _, err = run(["train", cfg, "--set", f"train.out_dir={tmp_path / 'other'}", "--set",
                      f"train.resume={out / 'checkpoints' / 'step-00000004'}"])
    assert_one_line_error(rc, err, "train.resume", "new train.out_dir")
    assert snapshot(tmp_path / "other") == before
    # Resuming an earlier checkpoint of the same out_dir would overwrite step 8: refused too.
    rc, _, err = run(["train", cfg, "--set", f"train.resume={out / 'checkpoints' / 'step-00000004'}"])
    assert_one_line_error(rc, err, "past step 4")


def test_corrupt_newest_checkpoint_is_moved_aside_and_resume_falls_back(trained):
    cfg, _, out = trained
    ckpts = out / "checkpoints"
    (ckpts / "step-00000008" / "trainer_state.pt").write_bytes(b"not a pickle")
    (ckpts / "step-00000008" / "manifest.json").unlink()  # also without a checksum the load fails and is caught
    rc, stdout, err = run(["train", cfg, "--set", "train.max_steps=12"])
    assert rc == 0, err
    assert "moved it to" in err and "resumed from" in err and "step-00000004" in err
    assert (ckpts / "corrupt-step-00000008" / "trainer_state.pt").read_bytes() == b"not a pickle"  # kept
    printed = Path(stdout.strip().splitlines()[-1].split("checkpoint ")[-1])
    assert printed.is_dir() and (ckpts / "latest").read_text().strip() == printed.name == "step-00000012"
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({s for s in steps}) == list(range(1, 13))


def test_every_checkpoint_corrupt_is_one_error(trained):
    cfg, _, out = trained
    for step in (4, 8):
        (out / "checkpoints" / f"step-{step:08d}" / "model.safetensors").write_bytes(b"\x00garbage")
    rc, _, err = run(["train", cfg, "--set", "train.max_steps=12"])
    assert_one_line_error(rc, err, "no complete checkpoint", "corrupt")


def test_truncated_last_metrics_line_survives_resume(trained):
    cfg, _, out = trained
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 4.')  # a kill in the middle of a write
    rc, _, err = run(["train", cfg, "--set", "train.max_steps=12"])
    assert rc == 0, err
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, 13))


def test_changed_model_config_on_resume_is_one_line(trained):
    cfg, _, _ = trained
    rc, _, err = run(["train", cfg, "--set", "model.hidden_size=128", "--set", "train.max_steps=12"])
    assert_one_line_error(rc, err, "hidden_size: 64 -> 128")
    assert err.strip().count("\n") == 0, err


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
    from leanlm.runconfig import build_run_config
    from leanlm.train import Callback, Trainer

    class Poison(Callback):  # weights turn NaN after step 5, so step 6's loss is NaN
        def on_step_end(self, trainer, step):
            if step == 5:
                with torch.no_grad():
                    trainer.model.lm_head.weight.fill_(math.nan)

    raw = tiny_config(max_steps=8, ckpt_every=4, eval_every=100)
    trainer = Trainer(build_run_config(raw), callbacks=[Poison()])
    with pytest.raises(TrainingError, match=r"step 6: training loss is nan.*step-00000004"):
        trainer.fit()
    out = Path(raw["train"]["out_dir"])
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN / Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    # Through the CLI: an absurd learning rate diverges; exit 2, one line naming the step.
    rc, _, err = run(["train", write_cfg(tmp_path / "c.yaml", tiny_config(max_steps=8, out_dir=str(tmp_path / "d"))),
                      "--set", "train.lr=1e6", "--set", "train.grad_clip=0"])
    assert_one_line_error(rc, err, "step ", "loss is")


# ----------------------------------------------------------------------------------------- silent results
def test_bit_flip_in_weights_is_detected_on_load(trained):
    _, _, out = trained
    ckpt = out / "checkpoints" / "step-00000008"
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    for argv in (["generate", str(ckpt), "--prompt", "The king"], ["eval", str(ckpt), "--batches", "1"]):
        assert_one_line_error(*run(argv)[::2], "model.safetensors", "checksum")


SPARSE = {"attention": "nsa", "nsa_compress_block": 16, "nsa_compress_stride": 16, "nsa_select_block": 16,
          "nsa_select_count": 4, "nsa_window": 32}


@pytest.mark.parametrize("override, field", [
    ("train.lr=.inf", "train.lr"), ("model.rms_norm_eps=.nan", "model.rms_norm_eps"),
    ("model.rope_theta=.nan", "model.rope_theta"), ("train.beta1=.nan", "train.beta1"),
    ("data.source=''", "data.source"), ("data.source=a,", "data.source"), ("data.source=a,,b", "data.source"),
    ("data.seq_len=100000", "data.seq_len"), ("train.seed=18446744073709551616", "train.seed"),
    ("model.initializer_range=-1", "initializer_range"), ("model.tie_word_embeddings='no'", "tie_word_embeddings"),
    ("model.nsa_init_blocks=-1", "nsa_init_blocks"),
])
def test_bad_values_are_refused_before_any_work(tiny_config, tmp_path, override, field):
    raw = tiny_config()
    if "nsa_init_blocks" in override:
        raw["model"].update(SPARSE)
    rc, _, err = run(["train", write_cfg(tmp_path / "cfg.yaml", raw), "--set", override])
    assert_one_line_error(rc, err, field)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sparse_window_longer_than_the_sequence_is_refused(tiny_config, tmp_path):
    raw = tiny_config()
    raw["model"].update(SPARSE, nsa_window=64)  # data.seq_len is 32
    rc, _, err = run(["train", write_cfg(tmp_path / "cfg.yaml", raw)])
    assert_one_line_error(rc, err, "model.nsa_window")


@pytest.mark.parametrize("kw, field", [
    ({"rope_theta": float("nan")}, "rope_theta"), ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"), ({"hidden_sizee": 64}, "hidden_sizee"),
    ({"hidden_size": "big"}, "hidden_size"), ({"attention": None}, "attention"),
    ({"initializer_range": -1.0}, "initializer_range"), ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"nsa_select_count": [1.5]}, "nsa_select_count"),
])
def test_auto_config_refuses_bad_fields(kw, field):
    from transformers import AutoConfig

    import leanlm  # noqa: F401

    with pytest.raises(ConfigError, match=field):
        AutoConfig.for_model("leanlm", **kw)


def test_saved_configs_still_load(tmp_path):
    from transformers import AutoConfig

    from leanlm.config import LeanLMConfig

    cfg = LeanLMConfig(hidden_size=64, num_attention_heads=4, attention="asa", max_position_embeddings=256,
                       nsa_window=32)
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert {k: v for k, v in again.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}


def test_wisca_refuses_what_it_cannot_do_exactly():
    from leanlm.config import LeanLMConfig
    from leanlm.model import LeanLMForCausalLM
    from leanlm.wisca import WiscaConfig, wisca_transform

    with pytest.raises(ConfigError, match="wisca.ffn"):
        WiscaConfig(ffn="no")
    with pytest.raises(ConfigError, match="wisca.every"):
        WiscaConfig(every=2.5)
    torch.manual_seed(0)
    model = LeanLMForCausalLM(LeanLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2)).double().eval()
    x = torch.randint(0, 64, (1, 12))
    ref = model(x).logits
    with pytest.raises(ConfigError, match="wisca.rope_pairs"):  # leanlm rotates halves: interleaved would drift
        wisca_transform(model, WiscaConfig(qk="channel", rope_pairs="interleaved"))
    assert torch.equal(model(x).logits, ref)  # refused before touching a weight
    wisca_transform(model, WiscaConfig(qk="channel", rope_pairs="half"))
    assert (model(x).logits - ref).abs().max() < 1e-10
    for bad in (torch.nn.Linear(8, 8), None, {"model": model}):
        with pytest.raises(ModelError):
            wisca_transform(bad)


def test_single_text_file_is_cut_into_documents_and_trains(tmp_path, tiny_config, corpus_dir):
    from leanlm.corpus import load_documents
    from leanlm.data import DataConfig, prepare_data

    one = tmp_path / "book.txt"
    one.write_text("\n\n".join(p.read_text() for p in sorted(corpus_dir.glob("*.txt"))))
    docs = load_documents(str(one))
    assert len(docs) >= 16 and all(d.name.startswith("book.txt#") for d in docs)
    assert "".join("".join(d.text.split()) for d in docs) == "".join(one.read_text().split())  # nothing lost
    data = prepare_data(DataConfig(source=str(one), seq_len=32, val_fraction=0.1), 384)
    assert data.meta["val_docs"] >= 1 and data.meta["train_docs"] >= 1
    line = tmp_path / "line.txt"  # one line, no blank lines: cut at spaces
    line.write_text(" ".join(one.read_text().split()))
    assert len(load_documents(str(line))) >= 16


def test_pieces_tokenize_exactly_like_the_whole_text():
    import random

    from leanlm.corpus import Document
    from leanlm.data import text_pieces, train_bpe

    rng = random.Random(0)
    words = ["the", "king's", "  queen", "lord,", "123", "4567", "!!", "\n", "\n\n", "   ", " ", "night."]
    text = "".join(rng.choice(words) + rng.choice([" ", "  ", "", "\n "]) for _ in range(30_000))
    tok = train_bpe([Document("a", text)], 600)
    pieces = text_pieces(text, 2_000)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert [i for p in pieces for i in tok(p)["input_ids"]] == tok(text)["input_ids"]
    assert text_pieces("x" * 5000, 1000) == ["x" * 1000] * 5  # no space at all: cut at the limit


# --------------------------------------------------------------------------------------------- one line
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_dir):
    from conftest import tiny_raw_config

    root = tmp_path_factory.mktemp("rel")
    raw = tiny_raw_config(corpus_dir, root / "run", max_steps=2, ckpt_every=2, eval_every=2)
    rc, _, err = run(["train", write_cfg(root / "cfg.yaml", raw)])
    assert rc == 0, err
    return root / "run" / "checkpoints" / "step-00000002"


@pytest.mark.parametrize("argv, words", [
    (["generate", "{ckpt}", "--prompt", ""], ["--prompt"]),
    (["generate", "{ckpt}", "--prompt", "x", "--temperature", "nan"], ["--temperature"]),
    (["generate", "{ckpt}", "--prompt", "x", "--top-k", "-5"], ["--top-k"]),
    (["generate", "{ckpt}", "--prompt", "x", "--seed", str(2**70)], ["--seed"]),
    (["generate", "{ckpt}", "--prompt", "x", "--max-new-tokens", "1000000000"], ["context"]),
    (["generate", "{ckpt}", "--prompt", "x " * 300], ["context"]),
    (["generate", "{ckpt}", "--prompt", "x", "--spec", "c2t", "--draft", "d", "--classifier", "c", "--beta", "1.5"],
     ["--beta"]),
    (["eval", "{ckpt}", "--batches", "0"], ["--batches"]), (["eval", "{ckpt}", "--batches", "-2"], ["--batches"]),
    (["eval", "{ckpt}", "--batch-size", "0"], ["--batch-size"]),
    (["spec", "bench", "smollm2", "--draft", "d", "--limit", "0"], ["--limit"]),
    (["spec", "bench", "smollm2", "--draft", "d", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["train"], ["config"]), (["nonsense"], ["invalid choice"]),
])
def test_bad_arguments_are_one_line(ckpt, argv, words):
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv]
    assert_one_line_error(*run(argv)[::2], *words)


def test_broken_checkpoint_files_are_one_line(ckpt, tmp_path):
    import shutil

    def broken(edit) -> str:
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ckpt, d)
        (d / "manifest.json").unlink()  # the structural checks, not only the checksum, must catch these
        edit(d)
        return str(d)

    cases = [
        (lambda d: (d / "config.json").write_text("{garbage"), "config.json"),
        (lambda d: (d / "config.json").write_text('{"hidden_size": 64}'), "model_type"),
        (lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 128')), "do not match"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer"),
    ]
    for edit, word in cases:
        assert_one_line_error(*run(["generate", broken(edit), "--prompt", "x"])[::2], word)
    d = broken(lambda d: (d / "run_config.json").write_text("[1, 2"))
    assert_one_line_error(*run(["eval", d])[::2], "run_config.json")
    d = broken(lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]))
    assert_one_line_error(*run(["generate", d, "--prompt", "x"])[::2], "corrupt")


@pytest.mark.parametrize("text, words", [
    ("model:\n  - 1\n  - 2\n", ["mapping"]),
    ("train:\n  lr: 1e-3\n  lr: 2e-3\n", ["lr", "twice"]),
    ("model: [\n", ["valid YAML"]),
])
def test_bad_yaml_is_one_line(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert_one_line_error(*run(["train", str(path)])[::2], *words)
    path.write_bytes(b"model:\n  hidden_size: \xff\xfe\n")
    assert_one_line_error(*run(["train", str(path)])[::2], "UTF-8")


def test_kv_report_json_into_a_new_folder(tmp_path):
    out = tmp_path / "a" / "b" / "kv.json"
    rc, _, err = run(["kv-report", "tiny", "--json", str(out)])
    assert rc == 0, err
    assert json.loads(out.read_text())


def _tiny_head_and_classifier(tmp_path):
    from leanlm.config import LeanLMConfig
    from leanlm.speculative.c2t import C2TClassifier
    from leanlm.speculative.draft import EagleDraftHead, head_config

    target = LeanLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    EagleDraftHead(head_config(target)).save(tmp_path / "head")
    C2TClassifier(hidden=8, feature_scaling="log").save(tmp_path / "clf")
    return target


def test_draft_head_and_classifier_loaders_report_damage(tmp_path):
    import shutil

    from leanlm.speculative.c2t import C2TClassifier
    from leanlm.speculative.draft import EagleDraftHead

    target = _tiny_head_and_classifier(tmp_path)
    EagleDraftHead.load(tmp_path / "head", target)
    C2TClassifier.load(tmp_path / "clf")

    def damaged(name: str, edit, manifest: bool = False) -> Path:
        d = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / name, d)
        if not manifest:
            (d / "manifest.json").unlink()
        edit(d)
        return d

    cut = lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-7])  # noqa: E731
    for edit, word in [(lambda d: (d / "draft_config.json").write_text("nope"), "not valid JSON"),
                       (lambda d: (d / "draft_config.json").write_text("{}"), "lacks config"),
                       (cut, "truncated")]:
        with pytest.raises(CheckpointError, match=word):
            EagleDraftHead.load(damaged("head", edit), target)
    with pytest.raises(CheckpointError, match="checksum"):
        EagleDraftHead.load(damaged("head", cut, manifest=True), target)

    def nan_weights(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "model.safetensors"))
        t["fc2.weight"][:] = math.nan
        save_file(t, str(d / "model.safetensors"))

    def bigger(d: Path) -> None:
        meta = json.loads((d / "c2t_config.json").read_text())
        meta["classifier"]["hidden"] = 16
        (d / "c2t_config.json").write_text(json.dumps(meta))

    from leanlm.speculative.c2t import C2T

    broken = C2TClassifier(hidden=8)
    with torch.no_grad():
        broken.fc1.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        C2T(broken)
    for edit, word in [(nan_weights, "NaN"), (bigger, "does not match"), (cut, "truncated"),
                       (lambda d: (d / "c2t_config.json").write_text('{"classifier": {"hidden": "x"}}'), "invalid"),
                       (lambda d: (d / "c2t_config.json").write_text('[]'), "JSON object")]:
        with pytest.raises(CheckpointError, match=word):
            C2TClassifier.load(damaged("clf", edit))


def test_committed_assets_verify(tmp_path):
    from leanlm.checkpoint import verify_manifest

    for folder in sorted(p for p in (ROOT / "assets").iterdir() if p.is_dir()):
        assert verify_manifest(folder), f"{folder} has no manifest.json"


def test_loaded_heads_do_not_read_their_files_after_loading(tmp_path):
    """A draft head (with its reduced vocabulary) and a C2T classifier hold no tensor that still reads the file: a
    `spec bench` of 137 prompts died of SIGBUS when the head's folder was overwritten in place by `cp` while it ran
    (its `draft_vocab` buffer was the memory-mapped file). Run in a child process, since SIGBUS kills it."""
    script = """
import sys, torch
from pathlib import Path
from leanlm.config import LeanLMConfig
from leanlm.speculative.c2t import C2TClassifier
from leanlm.speculative.draft import EagleDraftHead, head_config
from leanlm.speculative.heads import load_head

out = Path(sys.argv[1])
target = LeanLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
EagleDraftHead(head_config(target), torch.arange(0, 64, 2)).save(out / "head")
C2TClassifier().save(out / "clf")
head, _ = load_head(out / "head", target)
clf, _ = C2TClassifier.load(out / "clf")
for f in (out / "head" / "model.safetensors", out / "clf" / "model.safetensors"):
    open(f, "w").close()  # what `cp` over the folder does first: truncate in place
total = sum(float(t.detach().double().sum()) for m in (head, clf) for t in list(m.parameters()) + list(m.buffers()))
print("read", len(list(head.buffers())), "buffers", total)
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                       env=dict(os.environ), timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7 (SIGBUS) before the fix
    assert r.stdout.startswith("read 2 buffers")  # draft_vocab and target_to_draft were read


def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path):
    """Files written atomically (results tables, run configs, metrics) are readable as a plain `open()` would leave
    them under the process umask, not mkstemp's private 0600."""
    from leanlm.checkpoint import atomic_write_text

    from safetensors.torch import save_file

    from leanlm.checkpoint import atomic_write_file

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    atomic_write_file(tmp_path / "t.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt") and mode("atomic.txt") & 0o044 == 0o044 & mode("plain.txt")
    from leanlm.config import LeanLMConfig
    from leanlm.speculative.draft import EagleDraftHead, head_config

    (tmp_path / "plain").mkdir()
    EagleDraftHead(head_config(LeanLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64))).save(tmp_path / "head")  # a folder written atomically
    assert mode("head") == mode("plain")
    assert {mode(f"head/{f.name}") for f in (tmp_path / "head").iterdir()} == {mode("plain.txt")}
