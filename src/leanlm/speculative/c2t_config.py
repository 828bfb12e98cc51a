"""C2T classifier training settings, kept free of torch so that `leanlm spec c2t-train --help` shows them as its
defaults without loading a model stack (one source for both)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class C2TTrainConfig:
    """How `leanlm.speculative.c2t_train.train_classifier` trains. Defaults are the measured CPU-sized recipe (the
    paper's 10 epochs are for ~9M rows; a CPU collection of ~100k rows needs more passes, and log P separates the
    many tiny probabilities the paper's raw scale squashes near 0; see docs/c2t.md)."""

    hidden: int = 48
    feature_scaling: str = "log"  # log | raw (the paper's reading)
    entropy_top: int | None = 1000
    neg_ratio: float = 4.0  # negatives kept per positive in each training epoch (0 = keep all)
    epochs: int = 100
    lr: float = 3e-3
    batch_size: int = 256
    val_fraction: float = 0.1
    beta: float = 0.5  # threshold at which precision / recall / positive rate are reported
    seed: int = 0
