"""Atomic, checksummed training checkpoints.

A checkpoint is a folder `step-00000100/` under `<out_dir>/checkpoints/` that is also a Hugging Face model folder
(`config.json`, `model.safetensors`, tokenizer files; `from_pretrained` loads it) plus `trainer_state.pt` (optimizer,
scheduler, RNG states, step and data position) and `run_config.json`. It is written into a temporary folder and
renamed into place, and `latest` (a one-line file) is replaced atomically afterwards, so a process killed at any
moment leaves either the previous checkpoint or the new one, never a half-written one.

Every folder leanlm writes through `write_folder_atomically` (checkpoints, draft heads, C2T classifiers, WISCA
outputs) carries `manifest.json`: the size and sha256 of each file in it. `verify_manifest` recomputes them on load,
so a flipped bit or a truncated file is one clear `CheckpointError` instead of garbage output (hashing runs at
roughly 300 MB/s on one CPU core; `LEANLM_VERIFY_CHECKSUMS=0` skips it). Folders without a manifest (Hugging Face
model folders, files written before manifests existed) are checked structurally only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from leanlm.errors import CheckpointError

REQUIRED_FILES = ("config.json", "model.safetensors", "trainer_state.pt")
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step-(\d{8,})$")


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Create file `path` by calling `write(tmp)` on a temporary file beside it, syncing it to disk and renaming it
    into place: readers see the old file or the complete new one, never a part. On failure `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's (and safetensors') 0600 would keep the file private to its writer
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_file` for text."""
    atomic_write_file(path, lambda tmp: tmp.write_text(text))


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoint folders left by a process that was killed while saving (the caller holds the
    out_dir lock, so no live writer owns them)."""
    for tmp in root.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ manifests
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json` listing size and sha256 of every file under `folder` (written last, inside the folder)."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def verify_manifest(folder: Path) -> bool:
    """Check every file listed in `folder/manifest.json` (size, then sha256). Returns False when there is no
    manifest; raises CheckpointError naming the first file that is missing or changed."""
    path = folder / MANIFEST
    if not path.exists():
        return False
    if os.environ.get("LEANLM_VERIFY_CHECKSUMS", "1") == "0":  # opt-out for very large folders (see docs)
        return True
    try:
        files = json.loads(path.read_text())["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is the same problem for the user
        raise CheckpointError(f"{folder} has an unreadable {MANIFEST} ({type(exc).__name__}). Fix: restore the folder "
                              f"from a copy, or delete {MANIFEST} to skip the integrity check") from None
    for name, size, digest in entries:
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} (listed in {MANIFEST}) is missing. Fix: restore "
                                  f"it, or use another checkpoint")
        if f.stat().st_size != size or sha256_file(f) != digest:
            raise CheckpointError(f"{folder} is corrupt: {name} does not match its checksum in {MANIFEST} (changed "
                                  f"or damaged on disk). Fix: use another checkpoint (or a backup of this one)")
    return True


# -------------------------------------------------------------------------------------------------- reading files
def read_json(path: Path, what: str, fix: str) -> Any:
    """`json.loads` of a file, with any failure (missing, not UTF-8, not JSON) as one CheckpointError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist. Fix: {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({type(exc).__name__}: {exc}). Fix: {fix}") from None


def read_json_object(path: Path, what: str, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`read_json` that must give a JSON object holding the keys in `required`."""
    obj = read_json(path, what, fix)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}. Fix: {fix}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{what} {path} lacks {', '.join(missing)}. Fix: {fix}")
    return obj


def load_tensors(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with a truncated or garbage file reported as one CheckpointError.

    The tensors are copied out of the file: `load_file` maps it into memory, and a tensor kept as it is (a buffer
    such as a draft head's `draft_vocab`) would still read the file's pages, so a process decoding with it died of
    SIGBUS when the file was overwritten in place (`cp` over the folder) while it ran."""

    try:
        return {k: v.clone() for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist. Fix: {fix}") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean the file is unusable
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({type(exc).__name__}: {exc}). Fix: {fix}") \
            from None


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise CheckpointError if a floating-point tensor holds NaN or infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{what}: tensor {name} holds NaN or infinite values. Fix: {fix}")


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """`module.load_state_dict(tensors)` with missing/unexpected keys or wrong shapes as one CheckpointError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                  f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"{what} does not match its config ({detail}). Fix: {fix}")
    module.load_state_dict(tensors)


# ------------------------------------------------------------------------------------------------ atomic folders
def write_folder_atomically(out: Path, write: Callable[[Path], None],
                            before_rename: Callable[[], None] | None = None, manifest: bool = True) -> Path:
    """Create folder `out` by calling `write(tmp)` on a hidden temporary folder beside it, adding `manifest.json`
    (checksums), then renaming it into place. An older `out` is first renamed aside and removed only once the new one
    is in place, so a kill at any moment leaves a complete folder (old or new, the old one possibly under its hidden
    `.NAME.old-*` name). On any failure the temporary folder is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700 (and safetensors' 0600 files) would keep it private
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)
        if before_rename is not None:
            before_rename()
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    """The step of a `step-XXXXXXXX` folder name, or None for any other name."""
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-XXXXXXXX` folder under `root`, oldest first (by step number, not name)."""
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int = 2,
                    before_rename: Callable[[], None] | None = None) -> Path:
    """Create `root/step-XXXXXXXX` by calling `write(tmp_dir)`, then rename it into place and update `latest`.

    `keep` > 0 keeps this checkpoint and the `keep - 1` newest ones before it; checkpoints of later steps are never
    pruned here (the trainer refuses to start in an out_dir that holds them unless told to overwrite).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = write_folder_atomically(root / f"step-{step:08d}", write, before_rename)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep > 0:
        earlier = [p for s, p in list_checkpoints(root) if s < step]
        for old in earlier[: max(0, len(earlier) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by `root/latest` (or, if that pointer is missing or unreadable, the highest step folder),
    or None if there is none yet."""
    pointer = root / "latest"
    if pointer.exists():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if STEP_RE.match(name) and (root / name).is_dir():
            return root / name
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def check_checkpoint(path: Path, need_trainer_state: bool = True) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint (or, without trainer state, a model folder):
    required files present, checksums (if the folder has a manifest) equal, config and weights readable."""
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
    verify_manifest(path)
    fix = "use another checkpoint, or retrain"
    try:

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc}). Fix: {fix}") from None
    cfg = read_json_object(path / "config.json", "model config", fix)
    if "model_type" not in cfg:
        raise CheckpointError(f"model config {path / 'config.json'} has no model_type. Fix: restore the file (a "
                              f"leanlm checkpoint says \"model_type\": \"leanlm\")")


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} has a corrupt trainer_state.pt ({type(exc).__name__}). Fix: resume "
                              f"from an earlier checkpoint") from None
    needed = ("step", "samples_seen", "optimizer", "scheduler", "rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise CheckpointError(f"checkpoint {path} has an incomplete trainer_state.pt. Fix: resume from an earlier "
                              f"checkpoint")
    return state
