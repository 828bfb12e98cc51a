"""Matplotlib figures written as PNG files (headless backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss and validation loss against step."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_chart(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Speculative-decoding bench: τ and speed-up per strategy, one group of bars per prompt set."""
    sets = list(dict.fromkeys(r["prompts"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "none"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    width = 0.8 / max(1, len(strategies))
    for k, (key, title) in enumerate((("tau", "τ (accepted draft tokens / step)"), ("speedup", "speed-up vs plain"))):
        ax = axes[k]
        for i, s in enumerate(strategies):
            vals = [next((r[key] for r in rows if r["prompts"] == p and r["strategy"] == s), 0.0) for p in sets]
            ax.bar([j + i * width for j in range(len(sets))], vals, width, label=s)
        ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(sets))], sets)
        ax.set_title(title)
        if key == "speedup":
            ax.axhline(1.0, color="k", lw=0.6)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
