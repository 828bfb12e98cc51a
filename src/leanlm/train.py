"""Training: AdamW, warm-up + cosine schedule, clipping, accumulation, bf16 autocast, validation, checkpoints with
exact resume, callbacks, and data parallelism (DDP, or FSDP2 `fully_shard`) under `torchrun`.

The loop is built from small parts, in the spirit of torchtitan:

- `build_optimizer`, `lr_lambda` (leanlm.schedule)     optimizer and schedule
- `Trainer.train_step`                                 one optimizer step over the global batch
- `Trainer.evaluate`                                   validation loss / perplexity
- `Trainer.save` / `Trainer.resume`                    atomic checkpoints, exact resume
- `Callback` (leanlm.callbacks)                        hooks at step boundaries (WISCA plugs in here)

Exact resume: a checkpoint stores model, optimizer, scheduler, every RNG state and the global sample counter
(the data order is a pure function of it, see `leanlm.data.SampleOrder`), so a run killed with SIGKILL and resumed
from its last checkpoint continues with the same losses as a run never interrupted (on CPU, bit for bit).

Data parallelism: the global batch of a step is `batch_size * grad_accum * world_size` windows; slot j of it
(j = micro * world_size + rank) goes to `rank` at micro-step `micro`, so one process with `grad_accum = 2` and two
processes with `grad_accum = 1` see the same windows and compute the same loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.callbacks import Callback
from leanlm.checkpoint import (atomic_write_text, check_checkpoint, list_checkpoints, load_tensors, load_trainer_state,
                               read_json_object, remove_stale_temporaries, save_checkpoint)
from leanlm.config import LeanLMConfig
from leanlm.data import DataConfig, PreparedData, SampleOrder, TokenWindows, prepare_data
from leanlm.errors import CheckpointError, ConfigError, LeanLMError, TrainingError
from leanlm.evals.perplexity import windows_loss
from leanlm.lock import OutDirLock
from leanlm.model import LeanLMForCausalLM
from leanlm.plots import plot_loss_curves
from leanlm.schedule import lr_lambda

if TYPE_CHECKING:
    from leanlm.runconfig import RunConfig


@dataclass
class TrainConfig:
    """The `train:` section of a run config."""

    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 16  # sequences per process per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500  # 0 disables periodic checkpoints (the final one is always written)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    dtype: str = "auto"  # auto (bf16 autocast on GPUs that support it, else fp32) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = False  # FSDP2 fully_shard instead of DDP when world_size > 1
    compile: bool = False
    resume: str = "auto"  # auto (from out_dir's newest complete checkpoint if any) | never | <checkpoint path>
    overwrite: bool = False  # start from scratch in an out_dir that holds another run, deleting that run's files
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True

    def check(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}", f"must be > 0, got {getattr(self, name)}", "use a positive integer")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints", "num_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}", "use 0 or more")
        if not self.lr > 0:
            raise ConfigError("train.lr", f"learning rate must be > 0, got {self.lr}", "use e.g. 1e-3")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}", "use e.g. 0.1")
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay", f"must be >= 0, got {self.weight_decay}", "use e.g. 0.1")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be in [0, 1), got {getattr(self, name)}", "use 0.9 / 0.95")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", f"must be >= 0, got {self.grad_clip}", "use 1.0, or 0 to disable")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.dtype", f"unknown dtype {self.dtype!r}", "use auto, fp32 or bf16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device", f"unknown device {self.device!r}", "use auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda was asked for but no GPU is visible", "use auto or cpu")
        if not 0 <= self.seed < 2**32:
            raise ConfigError("train.seed", f"must be in [0, 2**32), got {self.seed}", "use e.g. 1337")
        if not str(self.out_dir).strip():
            raise ConfigError("train.out_dir", "is empty", "name a folder, e.g. runs/my-run")
        if not str(self.resume).strip():
            raise ConfigError("train.resume", "is empty", "use auto, never or a checkpoint path")
        if self.overwrite and self.resume not in ("auto", "never"):
            raise ConfigError("train.overwrite", "starts a run from scratch, which contradicts resuming from "
                              f"{self.resume!r}", "drop train.overwrite, or set train.resume=never")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool,
                    isolated: Iterable[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D parameters). Parameters in `isolated`
    get a param group of their own (so a callback can give them their own learning rate)."""
    decay, no_decay, own = [], [], []
    alone = {id(p) for p in isolated}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in alone:
            own.append({"params": [p], "weight_decay": cfg.weight_decay if p.dim() >= 2 else 0.0})
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}] + own
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def _fault(kind: str, step: int) -> None:
    """Test-only fault injection: LEANLM_FAULT=<kind>:<step> sends SIGKILL to this process at that point."""
    spec = os.environ.get("LEANLM_FAULT", "")
    if spec and spec == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains a `LeanLMForCausalLM` described by a `RunConfig` (its model, data and train sections). Call `fit()`.
    `callbacks` run at step boundaries; the trainer knows nothing of what they do (WISCA is one: by default the
    run config's own callbacks, `run.callbacks()`, are used)."""

    def __init__(self, run: "RunConfig", callbacks: Iterable[Callback] | None = None,
                 data: PreparedData | None = None):
        self.run = run
        self.cfg: TrainConfig = run.train
        self.data_cfg: DataConfig = run.data
        # None: the run config's own callbacks (`run.callbacks()`: WISCA's when its section is on); a list replaces
        # them, so add `*run.callbacks()` to keep those
        self.callbacks = list(run.callbacks() if callbacks is None else callbacks)
        self.model_config = run.model_config()
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = self.cfg
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.last_checkpoint: Path | None = None
        self._started = False
        # One trainer per out_dir (rank 0 holds the lock for the whole job); released by fit()/close() or on exit.
        self._lock = OutDirLock(self.out_dir) if self.rank == 0 else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._setup(data)
        except BaseException:
            if self._lock is not None:
                self._lock.release(remove_if_unused=True)
            raise

    def _setup(self, data: PreparedData | None) -> None:
        cfg = self.cfg
        # Decide what this run does with out_dir before any work, so a bad checkpoint or a foreign run fails fast.
        self._resume_state: dict[str, Any] | None = None  # the checked trainer state, kept for resume()
        plan = self._plan_out_dir() if self.rank == 0 else None
        if self.distributed:
            box = [plan]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        self.resume_from: Path | None = plan["resume"]
        self._clear_out_dir: bool = plan["clear"]
        self._corrupt: list[tuple[Path, str]] = plan["corrupt"]

        # Data: rank 0 builds the cache, the others wait and then read it.
        if data is None:
            if self.rank == 0:
                data = prepare_data(self.data_cfg, self.model_config.vocab_size)
            self._barrier()
            if self.rank != 0:
                data = prepare_data(self.data_cfg, self.model_config.vocab_size)
        self.data = data
        self.train_windows = TokenWindows(data.train, self.data_cfg.seq_len)
        self.val_windows = TokenWindows(data.val, self.data_cfg.seq_len)
        self.order = SampleOrder(len(self.train_windows), cfg.seed)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = LeanLMForCausalLM(self.model_config).to(self.device)
        self._check_weights_finite("at initialisation")
        self.raw_model = self.model
        self.wrapped = self._wrap(self.model)
        isolated = [p for cb in self.callbacks for p in cb.isolated_params(self.model)]
        self.optimizer = build_optimizer(self.model, cfg, fused=self.device.type == "cuda", isolated=isolated)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.step = 0
        self.samples_seen = 0
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * self.data_cfg.seq_len
        self.history: list[dict[str, Any]] = []

    # --------------------------------------------------------------------------------------------- out_dir
    def _used_by(self) -> str | None:
        """What of an earlier run `out_dir` holds (None when it holds nothing of one)."""
        found = list_checkpoints(self.ckpt_dir)
        if found:
            return f"checkpoints up to step {found[-1][0]}"
        if self.metrics_path.exists() or (self.ckpt_dir / "latest").exists():
            return "metrics.jsonl of a run" if self.metrics_path.exists() else "a checkpoints/latest pointer"
        return None

    def _same_run_config(self) -> bool:
        try:
            return json.loads((self.out_dir / "run_config.json").read_text()) == json.loads(
                json.dumps(self.run.to_dict()))
        except (OSError, ValueError):
            return False

    def _plan_out_dir(self) -> dict[str, Any]:
        """Where to resume from, whether to clear an earlier run's files first, and which corrupt checkpoints to move
        aside; raises before any work if this run would mix with (or delete) another run's files."""
        cfg = self.cfg
        used = self._used_by()
        plan: dict[str, Any] = {"resume": None, "clear": False, "corrupt": []}
        fix = ("choose a new train.out_dir, resume that run with train.resume=auto, or pass train.overwrite=true to "
               "delete its files and start over")
        if cfg.overwrite:
            plan["clear"] = used is not None
            return plan
        if cfg.resume == "never":
            if used is not None:
                raise ConfigError("train.resume", f"never starts from scratch, but train.out_dir {self.out_dir} holds "
                                  f"another run ({used})", fix)
            return plan
        if cfg.resume == "auto":
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                if used is not None and not self._same_run_config():
                    raise ConfigError("train.out_dir", f"{self.out_dir} holds {used} of a run with another config "
                                      "and no checkpoint to resume", fix)
                return plan
            errors: list[tuple[Path, str]] = []
            for _, path in reversed(found):
                try:
                    self._resume_state = self._validate_checkpoint(path)
                except CheckpointError as exc:
                    errors.append((path, str(exc)))
                    continue
                plan.update(resume=path, corrupt=errors)
                return plan
            raise CheckpointError(f"no complete checkpoint to resume in {self.ckpt_dir}: {errors[0][1]} (and "
                                  f"{len(errors) - 1} older ones failed too)" if len(errors) > 1 else errors[0][1])
        path = Path(cfg.resume)
        self._resume_state = self._validate_checkpoint(path)
        step = self._resume_state["step"]
        later = [s for s, _ in list_checkpoints(self.ckpt_dir) if s > step]
        own = path.resolve().parent == self.ckpt_dir.resolve()
        if later or (used is not None and not own):
            what = f"checkpoints past step {step} (up to {later[-1]})" if later else f"another run ({used})"
            raise ConfigError("train.resume", f"resuming {path} into train.out_dir {self.out_dir} would mix with "
                              f"{what}", "resume into a new train.out_dir (the checkpoint is only read)")
        plan["resume"] = path
        return plan

    def _validate_checkpoint(self, path: Path) -> dict[str, Any]:
        """Check `path` fully (files, checksums, trainer state, model config unchanged); returns its trainer state."""
        check_checkpoint(path)
        state = load_trainer_state(path)
        run_file = path / "run_config.json"
        if run_file.exists():
            saved = read_json_object(run_file, "run config", "use another checkpoint", required=("model",))
            self._check_same_model(saved.get("model") or {}, path)
        return state

    def _check_same_model(self, saved: dict[str, Any], path: Path) -> None:
        """One line naming the model fields that differ between the checkpoint and this run."""

        try:
            before = LeanLMConfig(**saved).to_dict()
        except LeanLMError as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid run_config.json ({exc})") from None
        now = self.model_config.to_dict()
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in LeanLMConfig.__annotations__
                   if before.get(k) != now.get(k)]
        if changed:
            raise ConfigError("model", f"differs from checkpoint {path} ({'; '.join(changed[:6])}"
                              f"{'; ...' if len(changed) > 6 else ''})",
                              "resume with the checkpoint's model section (see its run_config.json), or train into "
                              "a new train.out_dir")

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _check_weights_finite(self, when: str) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingError(f"model weights are NaN or infinite {when} ({bad[0]}). Fix: check model."
                                f"initializer_range and the other model fields")

    def _prepare_out_dir(self) -> None:
        """Rank 0, at the start of fit(): apply the out_dir plan (clear a replaced run, move corrupt checkpoints
        aside so nothing is lost) and clean up half-written temporaries."""

        if self._clear_out_dir:
            for _, path in list_checkpoints(self.ckpt_dir):
                shutil.rmtree(path)
            for name in ("latest",):
                (self.ckpt_dir / name).unlink(missing_ok=True)
            for name in ("metrics.jsonl", "loss.png", "run_config.json"):
                (self.out_dir / name).unlink(missing_ok=True)
            print(f"note: train.overwrite: removed the earlier run's checkpoints and metrics in {self.out_dir}",
                  file=sys.stderr)
        for path, why in self._corrupt:
            aside = path.with_name("corrupt-" + path.name)
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(path, aside)
            print(f"note: {why.split('. Fix:')[0]}; moved it to {aside} and resumed from {self.resume_from}",
                  file=sys.stderr)
        self._corrupt = []
        remove_stale_temporaries(self.ckpt_dir)

    # ------------------------------------------------------------------------------------------------ set-up
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.distributed:
            if self.cfg.fsdp:
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                wrapped = model
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            wrapped = model
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    # ------------------------------------------------------------------------------------------------ steps
    def _forward_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of `batch` [B, L+1]."""
        inputs, targets = batch[:, :-1].to(self.device), batch[:, 1:].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.wrapped(input_ids=inputs, use_cache=False).logits  # [B, L, V]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss (averaged over ranks)."""
        cfg = self.cfg
        self.wrapped.train()
        bs, world = cfg.batch_size, self.world
        idx = self.order.indices(self.samples_seen, bs * cfg.grad_accum * world)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            slot = micro * world + self.rank
            batch = self.train_windows.batch(idx[slot * bs : (slot + 1) * bs])
            last = micro == cfg.grad_accum - 1
            sync_ctx = self.wrapped.no_sync() if (self.distributed and not cfg.fsdp and not last) else nullcontext()
            if self.distributed and cfg.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync_ctx:
                loss = self._forward_loss(batch) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        _fault("step", self.step + 1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += bs * cfg.grad_accum * world
        self.step += 1
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= world
        return float(total)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over `eval_batches` batches spread evenly over the validation split (the
        loop of `leanlm.evals.perplexity.windows_loss`, each rank a share, then summed over ranks)."""
        self.wrapped.eval()
        picks = self.val_windows.spread(self.cfg.eval_batches * self.cfg.batch_size)
        steps = math.ceil(len(picks) / self.world / self.cfg.batch_size)  # equal on all ranks (FSDP)
        loss_sum, count = windows_loss(self.wrapped, self.val_windows, picks[self.rank :: self.world],
                                       self.cfg.batch_size, self.device, steps=steps, filler=picks[:1],
                                       autocast_dtype=self.autocast_dtype)
        if self.distributed:
            dist.all_reduce(loss_sum)
            dist.all_reduce(count)
        val_loss = float(loss_sum / count)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, self.optimizer, options=opts)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part in gathering)."""
        model_sd, optim_sd = self._state_dicts()
        path = None
        if self.rank == 0:
            state = {"step": self.step, "samples_seen": self.samples_seen, "optimizer": optim_sd,
                     "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                     "callbacks": [cb.state_dict() for cb in self.callbacks], "world_size": self.world}

            def write(tmp: Path) -> None:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                self.raw_model.save_pretrained(str(tmp), state_dict=model_sd)
                self.data.tokenizer.save_pretrained(str(tmp))
                torch.save(state, tmp / "trainer_state.pt")
                (tmp / "run_config.json").write_text(json.dumps(self.run.to_dict(), indent=1))

            path = save_checkpoint(self.ckpt_dir, self.step, write, keep=self.cfg.keep_checkpoints,
                                   before_rename=lambda: _fault("checkpoint", self.step))
            self.last_checkpoint = path
        self._barrier()
        return path

    def resume(self, path: Path, state: dict[str, Any] | None = None) -> None:
        """Restore everything from checkpoint `path` (`state`: its trainer state, if already loaded and checked)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if state is None:
            state = self._validate_checkpoint(path)
        model_sd = load_tensors(path / "model.safetensors", "checkpoint weights", "use another checkpoint")
        expected = set(self.raw_model.state_dict())
        for key in expected - set(model_sd):  # tied weights are stored once
            tied = self.raw_model._tied_weights_keys or {}
            if key in tied and tied[key] in model_sd:
                model_sd[key] = model_sd[tied[key]]
        missing = expected - set(model_sd)
        if missing:
            raise CheckpointError(f"checkpoint {path} does not match the model config: missing {sorted(missing)[:3]}. "
                                  f"Fix: resume with the config the checkpoint was trained with "
                                  f"({path}/run_config.json)")
        try:
            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd,
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({first}). Fix: resume with "
                                  f"the config it was trained with ({path}/run_config.json)") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(cb_state)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.last_checkpoint = path
        if self.rank == 0 and self.metrics_path.exists():
            # Keep the records up to the checkpoint; drop those the interrupted run wrote after it, and any line it
            # left half-written (a kill during a write) or that is not a JSON record.
            kept = []
            for ln in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(ln)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step:
                    kept.append(rec)
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            self.history = kept

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON (non-finite values stop before)

    def plot(self) -> Path | None:
        """Loss curves (train and validation against step) as `loss.png` in out_dir."""
        if self.rank != 0:
            return None

        return plot_loss_curves(self.history, self.out_dir / "loss.png", title=self.out_dir.name)

    # ------------------------------------------------------------------------------------------------ driver
    def fit(self) -> dict[str, float]:
        """Train to `max_steps` (resuming if configured); returns the final validation metrics."""
        if self._lock is not None:
            self._lock.acquire()  # again, if an earlier fit() released it
        try:
            return self._fit()
        finally:
            self._unlock()

    def _fit(self) -> dict[str, float]:
        cfg = self.cfg
        if not self._started:  # out_dir and resume are settled once; a second fit() continues in memory
            self._started = True
            if self.rank == 0:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._prepare_out_dir()
                atomic_write_text(self.out_dir / "run_config.json", json.dumps(self.run.to_dict(), indent=1))
            if self.resume_from is not None:
                self.resume(self.resume_from, self._resume_state)
                self._resume_state = None
            elif self.rank == 0 and self.metrics_path.exists():
                self.metrics_path.unlink()  # this run's own records from before its first checkpoint
        for cb in self.callbacks:
            cb.on_train_start(self)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc="train", unit="step", dynamic_ncols=True)
        t_last, steps_since = time.perf_counter(), 0
        metrics: dict[str, float] = {}
        while self.step < cfg.max_steps:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise self._diverged(f"training loss is {loss}")
            for cb in self.callbacks:
                cb.on_step_end(self, self.step)
            steps_since += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                tps = steps_since * self.tokens_per_step / (now - t_last)
                self.log({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                          "tokens": self.step * self.tokens_per_step, "tok_per_s": tps})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                t_last, steps_since = now, 0
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps:
                metrics = self.evaluate()
                if not math.isfinite(metrics["val_loss"]):
                    raise self._diverged(f"validation loss is {metrics['val_loss']}")
                self.log({"step": self.step, **metrics})
                for cb in self.callbacks:
                    cb.on_eval(self, self.step, metrics)
                if self.rank == 0 and cfg.progress:
                    bar.write(f"step {self.step}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}")
                t_last = time.perf_counter()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps:
                self.save()
                t_last = time.perf_counter()
        bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        if not metrics:
            metrics = self.evaluate()
        self.plot()
        return metrics

    def _diverged(self, what: str) -> TrainingError:
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        return TrainingError(f"step {self.step}: {what}, so training stopped ({kept}). Fix: lower train.lr, keep "
                             f"train.grad_clip on, or check the model fields (e.g. rms_norm_eps)")

    def close(self) -> None:
        self._unlock()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

