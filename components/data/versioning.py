"""Which version of a dataset a run reads: the bytes it read, and the .dvc file that pins them.

Every dataset is tracked by DVC on its own: its own `.dvc` file (`dvc add data/mine.jsonl.gz` writes
`data/mine.jsonl.gz.dvc`), or a path inside a tracked directory (the demo's `data/demo/`, pinned by `data.dvc`). A run
records the md5 of the bytes it actually read (one file's md5, or of the files a directory source stands for), the
.dvc file and what it pins. Data DVC does not track, or whose bytes differ from what its .dvc file pins, is refused
with the fix that fits (never one that would delete the user's files), unless `data.check_dvc: false`: then the run
records the md5 of what it read and says the data was not versioned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from components.config import DataConfig
from components.data.prompts import DEMO_DATA, DataError, data_files, local_source

@dataclass(frozen=True)
class DatasetVersion:
    name: str  # the dataset's name: its file (or directory) name without extensions
    source: str  # data.source as configured
    md5: str  # of the bytes read; a hub dataset's own fingerprint
    dvc_file: str | None  # the .dvc file that tracks it, relative to the project root
    dvc_md5: str | None  # what that .dvc file pins (a directory's md5 ends in .dir)
    versioned: bool  # checked against its .dvc file

    def as_tags(self) -> dict[str, str]:
        return {"alignflow.data_md5": self.md5, "alignflow.data_name": self.name,
                "alignflow.data_dvc_file": self.dvc_file or "", "alignflow.data_versioned": str(self.versioned).lower()}


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_md5(files: list[Path], base: Path) -> str:
    """One file's md5 (what `dvc add` records for it), or the md5 of "relative path md5" lines of several."""
    if len(files) == 1:
        return file_md5(files[0])
    lines = "".join(f"{p.relative_to(base).as_posix()} {file_md5(p)}\n" for p in sorted(files))
    return hashlib.md5(lines.encode()).hexdigest()


def dataset_name(path: Path) -> str:
    return path.name.split(".")[0] or path.name


def _name(local: Path, data: DataConfig) -> str:
    """A file's name without extensions; a directory's, with its data_dir and split (hh-rlhf-harmless-base-test)."""
    if local.is_file():
        return dataset_name(local)
    return "-".join(part for part in (local.name, data.data_dir, data.split) if part)


def dataset_version(data: DataConfig, root: Path, rows=None) -> DatasetVersion:
    """The version of `data.source` this run reads, checked against DVC unless `data.check_dvc` is false. `rows` (the
    loaded hub dataset) gives a hub dataset's fingerprint."""
    local = local_source(data, root)
    if local is None:
        if data.check_dvc:
            raise DataError(
                f"data.source: the hub dataset {data.source!r} is not versioned by DVC. Either download it under data/ "
                "and `dvc add` it, or set data.check_dvc: false (the run then records the dataset's fingerprint)."
            )
        fingerprint = getattr(rows, "_fingerprint", None) or "unknown"
        return DatasetVersion(data.source.split("/")[-1], data.source, fingerprint[:32], None, None, False)
    files = data_files(local, data.split, data.data_dir)
    md5 = bytes_md5(files, local if local.is_dir() else local.parent)
    if not data.check_dvc:
        return DatasetVersion(_name(local, data), data.source, md5, None, None, False)
    dvc_file, pinned = _check_with_dvc(local, root)
    return DatasetVersion(_name(local, data), data.source, md5, dvc_file, pinned, True)


def _check_with_dvc(local: Path, root: Path) -> tuple[str, str]:
    """(the .dvc file tracking `local`, what it pins), after checking the workspace matches; else a DataError whose
    fix fits the situation."""
    from dvc.repo import Repo

    local = local.resolve()
    root = root.resolve()
    try:
        relative = local.relative_to(root)
    except ValueError:
        raise DataError(
            f"data.source: {local} is outside this DVC project ({root}): copy it under data/ and run "
            f"`dvc add data/{local.name}`, then commit the .dvc file; or set data.check_dvc: false to run on it "
            "unversioned"
        ) from None
    with Repo(str(root)) as repo:
        tracking = [out for out in repo.index.outs if Path(out.fs_path) == local or Path(out.fs_path) in local.parents]
        if not tracking:
            raise DataError(
                f"data.source: {relative} is not tracked by DVC. Version it: `dvc add {relative}`, then "
                f"`git add {relative}.dvc` and commit (and `dvc push` to share it); or set data.check_dvc: false to "
                "run on it unversioned."
            )
        out = tracking[0]
        dvc_file = Path(out.stage.path).resolve().relative_to(root).as_posix()
        tracked = Path(out.fs_path).resolve().relative_to(root).as_posix()
        pinned, workspace = out.hash_info.value, out.get_hash().value
    if workspace != pinned:
        demo = Path(tracked) == DEMO_DATA
        fix = ("`alignflow demo data` regenerates the demo data exactly." if demo else
               f"If you changed it on purpose, record the new version: `dvc add {tracked}`, then commit {dvc_file} "
               f"(and `dvc push`). To go back to the pinned version, first move your changed copy out of {tracked}, "
               f"then `dvc pull {dvc_file}`.")
        raise DataError(f"data.source: {tracked} does not match {dvc_file}: it hashes to {workspace}, "
                        f"{dvc_file} pins {pinned}. {fix}")
    return dvc_file, pinned
