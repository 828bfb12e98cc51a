"""The `wisca:` section of a run config, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from leanlm.errors import ConfigError

GRANULARITIES = ("tensor", "group", "channel", "none")


@dataclass
class WiscaConfig:
    """The `wisca:` section of a run config. `every: 250` turns it on (with a transition at step 0 too)."""

    every: int = 0  # steps between transitions; 0 = no periodic transitions
    at_init: bool | None = None  # transition before the first step; None = yes iff every > 0 (init-only: every=0, at_init=true)
    qk: str = "tensor"
    vo: str = "tensor"
    norm: str = "l1"
    ffn: bool = False
    lora: str = "effective"
    optimizer_state: str = "keep"
    rope_pairs: str = "half"  # RoPE channel pairing: half (HF rotate_half: c, c+d/2) | interleaved (2c, 2c+1)
    apply: str = "weights"  # weights (WISCA) | lr (control: change per-tensor learning rates by the same ratios)

    def __post_init__(self) -> None:
        self.check()  # an invalid WiscaConfig cannot exist (e.g. ffn="no" would otherwise be truthy)

    @property
    def enabled(self) -> bool:
        return self.every > 0 or bool(self.at_init)

    @property
    def init_transition(self) -> bool:
        return self.every > 0 if self.at_init is None else bool(self.at_init)

    def check(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool):
            raise ConfigError("wisca.every", f"must be an integer, got {self.every!r}", "use e.g. 250")
        for name in ("at_init", "ffn"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (name == "at_init" and value is None)):
                raise ConfigError(f"wisca.{name}", f"must be true or false, got {value!r}", f"use {name}: true")
        if self.every < 0:
            raise ConfigError("wisca.every", f"must be >= 0, got {self.every}", "use e.g. 250, or 0 for init only")
        for name in ("qk", "vo"):
            if getattr(self, name) not in GRANULARITIES:
                raise ConfigError(f"wisca.{name}", f"unknown granularity {getattr(self, name)!r}",
                                  f"use one of {GRANULARITIES}")
        choices = {"norm": ("l1", "l2"), "lora": ("effective", "factors", "both"),
                   "optimizer_state": ("keep", "reset", "rescale"), "rope_pairs": ("half", "interleaved"),
                   "apply": ("weights", "lr")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"wisca.{name}", f"unknown value {getattr(self, name)!r}", f"use one of {allowed}")
