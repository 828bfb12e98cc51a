"""Loading any draft head folder: leanlm's EAGLE-1 heads (`draft_config.json` + `model.safetensors`, see
`leanlm.speculative.draft`) and EAGLE-3 heads in vLLM's speculators format (`config.json` with
`speculators_model_type` + `model.safetensors`, see `leanlm.speculative.eagle3`), whether leanlm, speculators or
a speculators converter wrote them."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from leanlm.errors import CheckpointError
from leanlm.speculative.draft import EagleDraftHead
from leanlm.speculative.eagle3 import Eagle3DraftHead, is_speculators_folder

DraftHead = EagleDraftHead | Eagle3DraftHead


def is_head_folder(path: str | Path) -> bool:
    """Whether `path` looks like a draft head folder of either kind (what `load_head` reads)."""
    path = Path(path)
    return (path / "draft_config.json").is_file() or is_speculators_folder(path)


def load_head(path: str | Path, target_config=None) -> tuple[nn.Module, dict]:
    """(head, its config/meta object) from a draft head folder of either kind; anything else is one
    CheckpointError naming both layouts."""
    path = Path(path)
    if is_speculators_folder(path):
        return Eagle3DraftHead.load(path, target_config)
    if (path / "draft_config.json").exists() or not path.exists():
        return EagleDraftHead.load(path, target_config)
    raise CheckpointError(f"{path} is not a draft head: it has neither leanlm's draft_config.json nor a speculators "
                          f"config.json. Fix: pass a folder written by `leanlm spec train-draft` or a speculators "
                          f"EAGLE-3 folder")
