"""WISCA during leanlm's training: a `leanlm.callbacks.Callback` the CLI and the demo add when the run config's
`wisca` section is on (the trainer itself knows nothing of WISCA), and the `apply: lr` control."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from leanlm.callbacks import Callback
from leanlm.errors import ConfigError
from leanlm.wisca.config import WiscaConfig
from leanlm.wisca.sites import LatentSite
from leanlm.wisca.transform import plan, wisca_transform


def control_multipliers(model: nn.Module, cfg: WiscaConfig) -> dict[nn.Parameter, float]:
    """Learning-rate multipliers of the `apply: lr` control: under Adam, scaling a tensor by f changes its
    effective relative learning rate by 1/f, so the control multiplies each tensor's lr by 1/f instead of rescaling
    the weights (f computed from the current weights, as a transition would). Tensor granularity only."""
    ops, report = plan(model, cfg)
    if any(isinstance(site, LatentSite) for site in report.sites):
        raise ConfigError("wisca.apply", "the learning-rate control needs one factor per tensor, and latent "
                          "attention mixes factors inside q_proj / kv_b_proj", "use wisca.apply: weights")
    return {op.param: 1.0 / float(op.factor.flatten()[0]) for op in ops if op.offset == 0.0}


class WiscaCallback(Callback):
    """Runs WISCA transitions during training: at step 0 (if `init_transition`) and every `every` steps, after
    optimizer.step() and before the next forward. With `apply: lr` it runs the learning-rate control instead.
    Records per-transition factors and time spent in `self.log`."""

    def __init__(self, cfg: WiscaConfig):
        cfg.check()
        self.cfg = cfg
        self.log: list[dict[str, Any]] = []
        self.seconds = 0.0

    def isolated_params(self, model: nn.Module) -> list[nn.Parameter]:
        if self.cfg.apply != "lr":
            return []
        if self.cfg.qk not in ("tensor", "none") or self.cfg.vo not in ("tensor", "none"):
            raise ConfigError("wisca.apply", "the learning-rate control needs one factor per tensor",
                              "use wisca.qk/vo: tensor with wisca.apply: lr")
        return list(control_multipliers(model, self.cfg))

    def _transition(self, trainer) -> None:
        t0 = time.perf_counter()
        if self.cfg.apply == "weights":
            report = wisca_transform(trainer.raw_model, self.cfg, trainer.optimizer, norms_after=False)
            s = [r["s_mean"] for r in report.layers]
            t = [r["t_mean"] for r in report.layers]
        else:
            mult = control_multipliers(trainer.raw_model, self.cfg)
            lam = trainer.scheduler.lr_lambdas[0](trainer.step)
            for i, group in enumerate(trainer.optimizer.param_groups):
                if len(group["params"]) == 1 and group["params"][0] in mult:
                    trainer.scheduler.base_lrs[i] = trainer.cfg.lr * mult[group["params"][0]]
                    group["lr"] = trainer.scheduler.base_lrs[i] * lam
            s = t = list(mult.values())
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.log.append({"step": trainer.step, "seconds": dt, "factor_min": min(s + t, default=1.0),
                         "factor_max": max(s + t, default=1.0)})
        trainer.log({"step": trainer.step, "wisca_seconds": dt, "wisca_s_mean": sum(s) / max(1, len(s)),
                     "wisca_t_mean": sum(t) / max(1, len(t))})

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0 and self.cfg.init_transition:
            self._transition(trainer)

    def on_step_end(self, trainer, step: int) -> None:
        if self.cfg.every and step % self.cfg.every == 0 and step < trainer.cfg.max_steps:
            self._transition(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds, self.log = state.get("seconds", 0.0), list(state.get("log", []))
