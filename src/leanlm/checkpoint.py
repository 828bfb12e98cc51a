"""Atomic training checkpoints.

A checkpoint is a folder `step-00000100/` under `<out_dir>/checkpoints/` that is also a Hugging Face model folder
(`config.json`, `model.safetensors`, tokenizer files; `from_pretrained` loads it) plus `trainer_state.pt` (optimizer,
scheduler, RNG states, step and data position) and `run_config.json`. It is written into a temporary folder and
renamed into place, and `latest` (a one-line file) is replaced atomically afterwards, so a process killed at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from leanlm.errors import CheckpointError

REQUIRED_FILES = ("config.json", "model.safetensors", "trainer_state.pt")


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoint folders left by a process that was killed while saving."""
    for tmp in root.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder_atomically(out: Path, write: Callable[[Path], None],
                            before_rename: Callable[[], None] | None = None) -> Path:
    """Create folder `out` by calling `write(tmp)` on a hidden temporary folder beside it, then renaming that into
    place (replacing an older `out`). On any failure the temporary folder is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if before_rename is not None:
            before_rename()
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int = 2,
                    before_rename: Callable[[], None] | None = None) -> Path:
    """Create `root/step-XXXXXXXX` by calling `write(tmp_dir)`, then rename it into place and update `latest`.

    `keep` > 0 keeps only that many newest checkpoints.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    final = write_folder_atomically(root / f"step-{step:08d}", write, before_rename)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep > 0:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by `root/latest`, or None if there is none yet."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    return root / pointer.read_text().strip()


def check_checkpoint(path: Path, need_trainer_state: bool = True) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint (or, without trainer state, a model folder)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist. Fix: pass a folder written by `leanlm train` "
                              f"(e.g. runs/tiny/checkpoints/step-00001000) or a Hugging Face model folder")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder. Fix: pass the checkpoint folder, not a file in it")
    needed = REQUIRED_FILES if need_trainer_state else REQUIRED_FILES[:2]
    missing = [f for f in needed if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}. Fix: use another "
                              f"checkpoint (see {path.parent}/latest) or retrain")
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            list(f.keys())
        json.loads((path / "config.json").read_text())
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc}). Fix: delete it and "
                              f"resume from an earlier one, or retrain") from exc


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} has a corrupt trainer_state.pt ({exc}). Fix: delete the "
                              f"checkpoint and resume from an earlier one") from exc
