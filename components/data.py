"""Prompt datasets and the data version pinned by DVC.

Prompts load through Hugging Face `datasets` from a hub id, a local JSONL/CSV/Parquet file or a
directory of them. Rows whose prompt is missing, empty, not text or longer than `data.max_prompt_chars`
are counted and reported by row number (1-based, the first data row is row 1), never dropped silently.
A file that cannot be parsed fails with the file and line, and says why (not UTF-8, not JSON, empty...).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.config import DataConfig
from components.errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_REPORTED_ROWS = 20


class DataError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file, line or field."""


@dataclass
class PromptReport:
    """What happened to every row: kept, or left out with the reason and row number (1-based)."""

    source: str
    total: int = 0
    kept: int = 0
    missing: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    not_text: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.missing) + len(self.empty) + len(self.not_text) + len(self.too_long)

    def as_metrics(self) -> dict[str, float]:
        return {
            "data/rows": self.total,
            "data/kept": self.kept,
            "data/missing_prompt": len(self.missing),
            "data/empty_prompt": len(self.empty),
            "data/not_text_prompt": len(self.not_text),
            "data/too_long_prompt": len(self.too_long),
        }

    def summary(self) -> str:
        lines = [f"{self.source}: {self.kept} of {self.total} rows kept"]
        for reason, rows in (("missing prompt", self.missing), ("empty prompt", self.empty),
                             ("prompt is not text", self.not_text), ("prompt too long", self.too_long)):
            if rows:
                shown = ", ".join(map(str, rows[:MAX_REPORTED_ROWS])) + (" ..." if len(rows) > MAX_REPORTED_ROWS else "")
                lines.append(f"  {len(rows)} left out, {reason}: rows {shown}")
        return "\n".join(lines)


@dataclass
class PromptSet:
    prompts: list[str]
    report: PromptReport


def _text_lines(path: Path) -> list[str]:
    """The file's lines as text; a file that is empty or not UTF-8 fails naming the file and line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{number}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            ) from None
    return raw.decode("utf-8").split("\n")


def _check_jsonl(path: Path) -> None:
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")


def _check_csv(path: Path) -> None:
    _text_lines(path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty CSV file (no header)")
            for row in reader:
                if row and len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}"
                    )
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot parse CSV ({exc})") from None


def _data_files(source: Path, split: str) -> list[Path]:
    if source.is_file():
        files = [source]
    else:
        candidates = sorted(p for p in source.rglob("*") if p.suffix in FILE_BUILDERS)
        named = [p for p in candidates if p.stem == split or p.parent.name == split]
        files = named or candidates
        if not files:
            raise DataError(f"{source}: no {'/'.join(FILE_BUILDERS)} files in this directory")
    kinds = {FILE_BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"{source}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes file types {sorted(kinds)}; keep one type per dataset")
    return files


def load_rows(data: DataConfig, root: Path = Path(".")):
    """The raw rows as a `datasets.Dataset`, from a local file, a directory or the hub."""
    import datasets

    datasets.disable_progress_bars()
    local = Path(data.source) if Path(data.source).is_absolute() else root / data.source
    if local.exists():
        files = _data_files(local, data.split)
        for path in files:
            if path.suffix == ".jsonl":
                _check_jsonl(path)
            elif path.suffix == ".csv":
                _check_csv(path)
        builder = FILE_BUILDERS[files[0].suffix]
        try:
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        except Exception as exc:  # datasets wraps parser errors; keep the file name in front
            raise DataError(f"{local}: cannot read as {builder}: {type(exc).__name__}: {exc}") from None
    if data.source.startswith((".", "/")) or Path(data.source).suffix in FILE_BUILDERS:
        raise DataError(f"data.source: file or directory not found: {local}")
    try:
        return datasets.load_dataset(data.source, split=data.split)
    except Exception as exc:
        raise DataError(f"data.source: cannot load hub dataset {data.source!r} (split {data.split!r}): {exc}") from None


def load_prompts(data: DataConfig, root: Path = Path(".")) -> PromptSet:
    """Prompts ready for the policy: filtered, reported, and rendered with `data.prompt_template`."""
    rows = load_rows(data, root)
    if data.prompt_field not in rows.column_names:
        raise DataError(
            f"data.prompt_field: column {data.prompt_field!r} not in {data.source} (columns: {', '.join(rows.column_names)})"
        )
    report = PromptReport(source=data.source, total=len(rows))
    prompts: list[str] = []
    for row, value in enumerate(rows[data.prompt_field], start=1):
        if value is None:
            report.missing.append(row)
        elif not isinstance(value, str):
            report.not_text.append(row)
        elif not value.strip():
            report.empty.append(row)
        elif len(value) > data.max_prompt_chars:
            report.too_long.append(row)
        else:
            prompts.append(value.strip())
    if data.max_prompts is not None:
        prompts = prompts[: data.max_prompts]
    report.kept = len(prompts)
    if not prompts:
        raise DataError(f"{data.source}: no usable prompts\n{report.summary()}")
    if data.prompt_template:
        prompts = [data.prompt_template.replace("{prompt}", p) for p in prompts]
    return PromptSet(prompts=prompts, report=report)


def split_prompts(prompts: list[str], eval_size: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle, then (train, held-out eval). The eval set never overlaps train."""
    if eval_size >= len(prompts):
        raise DataError(f"data.eval_size ({eval_size}) must be smaller than the number of prompts ({len(prompts)})")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held_out = [prompts[i] for i in order[:eval_size]]
    train = [prompts[i] for i in order[eval_size:]]
    return train, held_out


# --- the data version pinned by DVC -------------------------------------------------------------


@dataclass(frozen=True)
class DataVersion:
    md5: str
    path: str
    files: int | None
    size: int | None


def data_version(dvc_file: Path) -> DataVersion:
    """The md5 that `data.dvc` pins: what every run records as its data version."""
    if not dvc_file.is_file():
        raise DataError(f"{dvc_file}: not found; run `dvc add data` to pin the data")
    spec = yaml.safe_load(dvc_file.read_text()) or {}
    outs = spec.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise DataError(f"{dvc_file}: no `outs` entry with an md5; is this a DVC file?")
    out = outs[0]
    return DataVersion(md5=str(out["md5"]).removesuffix(".dir"), path=out["path"], files=out.get("nfiles"), size=out.get("size"))


def check_data(dvc_file: Path) -> DataVersion:
    """Refuse data that does not match its DVC file; say how to get the pinned version."""
    version = data_version(dvc_file)
    from dvc.repo import Repo

    root = dvc_file.resolve().parent
    data_path = root / version.path
    fix = (
        f"Fix: `dvc pull {dvc_file.name}` fetches the pinned version from the DVC remote; for the demo data, "
        "`alignflow demo data` regenerates it exactly."
    )
    if not data_path.exists():
        raise DataError(f"{data_path} is missing; {dvc_file.name} pins md5 {version.md5}.\n{fix}")
    with Repo(str(root)) as repo:
        pinned = [out for out in repo.index.outs if out.fs_path == str(data_path)]
        if not pinned:
            raise DataError(f"{dvc_file}: does not track {data_path}")
        workspace = pinned[0].get_hash().value
    if workspace != pinned[0].hash_info.value:
        raise DataError(
            f"{version.path}/ does not match {dvc_file.name}: it hashes to {workspace.removesuffix('.dir')}, "
            f"the pinned version is {version.md5}.\n{fix}"
        )
    return version
