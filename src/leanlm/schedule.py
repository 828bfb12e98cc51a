"""The learning-rate schedule every leanlm training loop uses (the trainer, the draft head): linear warm-up, then
cosine decay to a floor."""

from __future__ import annotations

import math


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
