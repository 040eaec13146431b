"""Writing files that survive a crash: fsync a file, fsync a folder (so a rename in it is on disk), and put a
complete folder in place of another. Standard library only: the engine (adapters), the trainer (checkpoints)
and the platform (batch output files) all write this way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data of the directory); a no-op where a
    directory cannot be opened or synced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_directory(staging: Path, target: Path) -> None:
    """Rename a complete `staging` folder to `target`. A folder cannot be renamed over a non-empty one, so an
    existing target is first renamed aside (and removed once the new one is in place)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
