"""Training: loss goes down, accumulation, exact resume after SIGKILL, atomic checkpoints, DDP/FSDP2 on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leanlm import CheckpointError
from leanlm.runconfig import build_run_config
from leanlm.train import Trainer, lr_lambda

ROOT = Path(__file__).resolve().parents[1]


def fit(raw: dict) -> tuple[Trainer, dict]:
    trainer = Trainer(build_run_config(raw))
    return trainer, trainer.fit()


def train_losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_cli(raw: dict, tmp: Path, env_extra: dict | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    cfg = tmp / f"cfg-{nproc}-{len(list(tmp.glob('cfg-*')))}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "leanlm", "train", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "leanlm", "train", str(cfg)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_lr_schedule_shape():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_training_lowers_validation_loss(tiny_config):
    raw = tiny_config(max_steps=40, eval_every=40, ckpt_every=0)
    trainer = Trainer(build_run_config(raw))
    before = trainer.evaluate()["val_loss"]
    after = trainer.fit()["val_loss"]
    assert after < before - 1.0, (before, after)
    assert (trainer.out_dir / "loss.png").stat().st_size > 1000
    assert (trainer.ckpt_dir / "step-00000040" / "model.safetensors").exists()


def test_grad_accumulation_matches_bigger_batch(tiny_config, tmp_path):
    a = tiny_config(max_steps=5, batch_size=4, grad_accum=2, ckpt_every=0, out_dir=str(tmp_path / "a"))
    b = tiny_config(max_steps=5, batch_size=8, grad_accum=1, ckpt_every=0, out_dir=str(tmp_path / "b"))
    fit(a)
    fit(b)
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5)


@pytest.mark.parametrize("fault, wisca", [("step:7", None), ("checkpoint:8", None), ("step:7", {"every": 3})],
                         ids=["mid-step", "mid-checkpoint", "mid-step-with-wisca"])
def test_sigkill_and_resume_gives_identical_losses(tiny_config, tmp_path, fault, wisca):
    ref_raw = tiny_config(out_dir=str(tmp_path / "ref"))
    killed_raw = tiny_config(out_dir=str(tmp_path / "killed"))
    if wisca:
        ref_raw["wisca"] = killed_raw["wisca"] = wisca
    ref = run_cli(ref_raw, tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    # Killed mid-step (after backward, before the optimizer step) or mid-checkpoint (before the rename).
    killed = run_cli(killed_raw, tmp_path, {"LEANLM_FAULT": fault})
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["latest", "step-00000004"]  # no half-written checkpoint is visible
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    resumed = run_cli(killed_raw, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_l, res_l = train_losses(tmp_path / "ref"), train_losses(tmp_path / "killed")
    assert sorted(ref_l) == sorted(res_l) == list(range(1, 13))
    assert ref_l == res_l  # bit-identical on CPU
    assert not list((tmp_path / "killed" / "checkpoints").glob(".step-*"))  # stale temporaries were cleaned


def test_corrupt_and_missing_checkpoints_are_reported(tiny_config, tmp_path):
    raw = tiny_config(max_steps=4, ckpt_every=4)
    trainer, _ = fit(raw)
    ckpt = trainer.ckpt_dir / "step-00000004"
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(build_run_config(raw))
    os.remove(ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="missing trainer_state.pt"):
        Trainer(build_run_config(raw))
    bad = dict(raw, train={**raw["train"], "resume": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(build_run_config(bad))


def test_callbacks_fire_at_step_boundaries(tiny_config):
    from leanlm.train import Callback

    class Recorder(Callback):
        def __init__(self):
            self.steps, self.evals, self.started, self.ended = [], [], 0, 0

        def on_train_start(self, trainer):
            self.started += 1

        def on_step_end(self, trainer, step):
            assert trainer.optimizer.state  # after optimizer.step()
            self.steps.append(step)

        def on_eval(self, trainer, step, metrics):
            self.evals.append(step)

        def on_train_end(self, trainer):
            self.ended += 1

    rec = Recorder()
    Trainer(build_run_config(tiny_config(max_steps=6, eval_every=3, ckpt_every=0)), callbacks=[rec]).fit()
    assert rec.steps == [1, 2, 3, 4, 5, 6] and rec.evals == [3, 6] and rec.started == rec.ended == 1


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_data_parallel_matches_one_process(tiny_config, tmp_path, fsdp):
    one = tiny_config(max_steps=6, batch_size=4, grad_accum=2, ckpt_every=6, eval_every=6,
                      out_dir=str(tmp_path / "one"))
    two = tiny_config(max_steps=6, batch_size=4, grad_accum=1, ckpt_every=6, eval_every=6, fsdp=fsdp,
                      out_dir=str(tmp_path / "two"))
    r1 = run_cli(one, tmp_path)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_cli(two, tmp_path, nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), (s, l1[s], l2[s])
    # The 2-process checkpoint is a full model that loads and resumes in one process.
    assert (tmp_path / "two" / "checkpoints" / "step-00000006" / "model.safetensors").exists()
