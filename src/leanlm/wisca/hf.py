"""WISCA inside Hugging Face's `Trainer` (and TRL's `SFTTrainer`, which is one): a `transformers.TrainerCallback`.

    from leanlm.wisca import WiscaConfig, WiscaTrainerCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[WiscaTrainerCallback(WiscaConfig(every=250))])

Transitions run where leanlm's own trainer runs them: before the first step (`on_train_begin`, if
`init_transition`) and at `on_step_end` every `every` optimizer steps, i.e. after `optimizer.step()` and the
scheduler step, before the next forward. The optimizer-state policy (`optimizer_state: keep | reset | rescale`)
is applied to the Trainer's optimizer (unwrapped from accelerate's `AcceleratedOptimizer`). Plain models and PEFT
LoRA models work as they do with `wisca_transform` (the model the Trainer hands to callbacks is unwrapped).

Each transition is appended to `state.log_history` (so it is in `trainer_state.json` and the Trainer's logs) and to
`self.log`. The schedule depends only on `state.global_step`, so a run resumed from a Trainer checkpoint transitions
at the same steps as an uninterrupted one; the callback is an `ExportableState`, so with
`TrainingArguments(restore_callback_states_from_checkpoint=True)` its log survives the resume too (transformers then
replaces the callback object by a restored copy: read it back from `trainer.callback_handler.callbacks`).

Not supported here: `apply: lr` (the learning-rate control needs its own optimizer param groups, which leanlm's
trainer builds; with HF's Trainer use `apply: weights`), and FSDP (WISCA rescales whole matrices; use DDP).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from leanlm.errors import ConfigError
from leanlm.wisca.config import WiscaConfig
from leanlm.wisca.transform import wisca_transform


class WiscaTrainerCallback(TrainerCallback, ExportableState):
    """Runs WISCA transitions in a `transformers.Trainer` (see the module docstring)."""

    def __init__(self, cfg: WiscaConfig | dict[str, Any] | None = None):
        cfg = WiscaConfig(**cfg) if isinstance(cfg, dict) else (cfg or WiscaConfig(every=250))
        if cfg.apply != "weights":
            raise ConfigError("wisca.apply", "the learning-rate control needs leanlm's own optimizer param groups",
                              "use apply: weights with the Hugging Face Trainer (or train with `leanlm train`)")
        self.cfg = cfg
        self.log: list[dict[str, Any]] = []
        self.seconds = 0.0

    # -- the transition ------------------------------------------------------------------------------------------
    def transition(self, model, optimizer, step: int, state=None) -> dict[str, Any]:
        """One transition of `model` at optimizer step `step`; returns (and records) what it did."""
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        t0 = time.perf_counter()
        report = wisca_transform(model, self.cfg, opt, norms_after=False)
        dt = time.perf_counter() - t0
        s = [r["s_mean"] for r in report.layers]
        t = [r["t_mean"] for r in report.layers]
        record = {"step": step, "wisca_seconds": dt, "wisca_layers": len(report.layers),
                  "wisca_s_mean": sum(s) / max(1, len(s)), "wisca_t_mean": sum(t) / max(1, len(t)),
                  "wisca_factor_min": min(s + t, default=1.0), "wisca_factor_max": max(s + t, default=1.0)}
        self.seconds += dt
        self.log.append(record)
        if state is not None:
            state.log_history.append(dict(record))
        return record

    def due(self, step: int, max_steps: int) -> bool:
        """Whether a periodic transition runs after optimizer step `step` (1-based count of finished steps)."""
        return bool(self.cfg.every) and step % self.cfg.every == 0 and (max_steps <= 0 or step < max_steps)

    # -- TrainerCallback hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fsdp", None):
            raise ConfigError("wisca", "WISCA rescales whole weight matrices, which FSDP shards",
                              "train with DDP (no --fsdp) when the WISCA callback is on")
        if state.global_step == 0 and self.cfg.init_transition:
            self.transition(model, optimizer, 0, state)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.due(state.global_step, state.max_steps):
            self.transition(model, optimizer, state.global_step, state)
        return control

    # -- ExportableState: saved in trainer_state.json, restored on resume when the Trainer is told to ---------------
    def state(self) -> dict[str, Any]:
        return {"args": {"cfg": dataclasses.asdict(self.cfg)}, "attributes": {"log": self.log, "seconds": self.seconds}}
