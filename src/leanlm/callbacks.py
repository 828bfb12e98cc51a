"""The hooks leanlm's `Trainer` calls at step boundaries; WISCA and user code plug into training through them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from leanlm.train import Trainer


class Callback:
    """Hooks called by `Trainer` at step boundaries. Override what you need."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int) -> None:
        """After optimizer.step() of step `step` (1-based count of finished steps), before the next forward."""

    def on_eval(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def isolated_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters that need an optimizer param group of their own (e.g. for per-tensor learning rates)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
