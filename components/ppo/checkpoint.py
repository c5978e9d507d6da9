"""Atomic directory writes: a checkpoint is either the previous one or the complete new one, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def write_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh temporary sibling directory, fsync it, then move it into place.

    The previous `target` is renamed aside and removed only once the new one is in place; if the
    process dies between the two renames, `resolve_checkpoint` finds the previous one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = _previous(target)
    if target.exists():
        if previous.exists():  # a stale leftover: `target` itself is complete
            shutil.rmtree(previous)
        os.rename(target, previous)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def resolve_checkpoint(directory: str | Path) -> Path:
    """`directory`, or the previous checkpoint kept aside if a save died between its two renames."""
    directory = Path(directory)
    if directory.is_dir():
        return directory
    if _previous(directory).is_dir():
        return _previous(directory)
    raise FileNotFoundError(f"no checkpoint at {directory}")
