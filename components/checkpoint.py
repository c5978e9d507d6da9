"""Atomic directory writes: a checkpoint is either the previous one or the complete new one, never half.

A save writes a fresh temporary sibling directory, syncs it, renames the previous checkpoint aside, renames the
new one into place, then deletes the old one. A process killed at any point leaves either the checkpoint in place,
or (between the two renames) the previous one kept aside as `.NAME.previous`, which `recover` moves back before
anything reads or writes the checkpoint again. Temporary directories of an interrupted save are removed then too.

Storage faults are named: a full disk (ENOSPC), a read-only file system (EROFS) or a denied write (EACCES) raise a
`StorageError` naming the path and the configuration key it comes from, before training when `check_writable` is
called on the directory first, and at any later save.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from components.errors import UserError
from components.faults import crash_point

_CAUSES = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
}


class StorageError(UserError):
    """A directory that cannot take a checkpoint or an exported model: the message names the path, the key and why."""


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


# How writers that do not raise OSError say it: safetensors ("...(os error 28)"), torch's zip writer ("unexpected pos").
_MESSAGES = {"os error 28": errno.ENOSPC, "No space left": errno.ENOSPC, "os error 30": errno.EROFS,
             "Read-only file system": errno.EROFS, "os error 13": errno.EACCES}


def _storage_error(exc: BaseException, path: Path, key: str) -> StorageError | None:
    """A StorageError for a write that failed for lack of space or permission, else None."""
    code = getattr(exc, "errno", None)
    if code not in _CAUSES:
        code = next((number for text, number in _MESSAGES.items() if text in str(exc)), None)
    if code is None and ("unexpected pos" in str(exc) or "file write failed" in str(exc)) and _free_bytes(path) < 1 << 20:
        code = errno.ENOSPC
    cause = _CAUSES.get(code)
    if cause is None:
        return None
    return StorageError(f"{key}: cannot write {path}: {cause}. Free space or choose another directory "
                        f"(--set {key}=...); the last complete checkpoint, if any, is kept.")


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def write_atomically(target: str | Path, write: Callable[[Path], None], key: str = "checkpoint.dir") -> Path:
    """Call `write(tmp)` on a fresh temporary sibling directory, sync it, then move it into place. `key` is the
    configuration key the directory comes from, named when the storage fails."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise _storage_error(exc, target, key) or exc
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _storage_error(exc, target, key)
        if error is not None:
            raise error from exc
        raise
    crash_point("checkpoint.written")
    previous = _previous(target)
    if target.exists():
        os.rename(target, previous)
        crash_point("checkpoint.between_renames")
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def recover(directory: str | Path) -> bool:
    """Put back a checkpoint kept aside by a save that died between its two renames, and remove the temporary
    directories of saves that died before them. Returns whether a checkpoint is in place."""
    directory = Path(directory)
    previous = _previous(directory)
    if previous.is_dir():
        if directory.is_dir():  # the new one made it into place; the old one was not deleted yet
            shutil.rmtree(previous)
        else:
            os.rename(previous, directory)
    if directory.parent.is_dir():
        for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return directory.is_dir()


def resolve_checkpoint(directory: str | Path) -> Path:
    """`directory`, recovered if a save died between its renames; FileNotFoundError if there is no checkpoint."""
    if not recover(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}")
    return Path(directory)


def check_writable(directory: str | Path, key: str, need_bytes: int = 0) -> None:
    """Refuse, before any training, a checkpoint directory that cannot be created or written, or whose disk has less
    free space than `need_bytes` (a save holds the previous checkpoint and the new one at once)."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"alignflow")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise _storage_error(exc, directory, key) or StorageError(f"{key}: cannot write {directory}: {exc}") from None
    free = _free_bytes(directory)
    if free < need_bytes:
        raise StorageError(
            f"{key}: {directory} has {free / 2**20:.0f} MB free, a checkpoint of this run needs about "
            f"{need_bytes / 2**20:.0f} MB (no space left on the device, ENOSPC, would stop the run at its first save). "
            f"Free space or choose another directory (--set {key}=...)."
        )
