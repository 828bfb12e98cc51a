"""Kernel locks between processes: `OutDirLock`, so that two trainers never write into the same run folder at once,
and `build_once` (on `build_lock`), so that a cache folder two processes want at once (the converted SmolLM2, a
token cache) is built by one of them while the other waits and then reads it.

Both are `fcntl.flock` on a small file (a real kernel lock: it is released when the holding process exits, even by
SIGKILL, so a crashed run never leaves a stale lock behind). The files stay; the run lock's holds the pid of the last
holder for the error message. POSIX only (Linux, macOS), like the rest of leanlm's training stack.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from leanlm.errors import RunLockedError


class OutDirLock:
    """`acquire()` takes the lock or raises RunLockedError naming the holder; `release()` gives it back."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / ".lock"
        self._fd: int | None = None
        self._created = False  # whether acquire() made out_dir (so a run refused before any work leaves none)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self._created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise RunLockedError(f"train.out_dir {self.out_dir} is in use by another trainer (pid {holder}). Fix: "
                                 f"wait for it to finish, or choose another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self, remove_if_unused: bool = False) -> None:
        """Give the lock back. `remove_if_unused`: also remove out_dir if acquire() created it and nothing but the
        lock file was written (a run that failed before any work)."""
        if self._fd is not None:
            try:
                if remove_if_unused and self._created and [p.name for p in self.out_dir.iterdir()] == [".lock"]:
                    self.path.unlink()
                    self.out_dir.rmdir()
            finally:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._fd)
                    self._fd = None

    def __del__(self) -> None:  # a Trainer dropped without close() must not keep its folder locked
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive, blocking lock for building folder or file `target` (on `.NAME.build-lock` beside it).

    The pattern: check that `target` is complete; if not, take the lock, check again (another process may have built
    it while this one waited), and build only if it is still missing. Parallel test workers, torchrun ranks and two
    commands started together then build a cache once instead of racing to rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.build-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def build_once(target: Path, built: Callable[[], bool], build: Callable[[], object]) -> None:
    """Run `build()` unless `built()` says `target` is complete, under `build_lock(target)` and checking again once
    the lock is held, so that of several processes wanting `target` at once exactly one builds it."""
    if built():
        return
    with build_lock(target):
        if not built():
            build()
