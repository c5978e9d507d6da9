"""Prompt datasets, in the forms people have them.

Rows load through Hugging Face `datasets` from a hub id (with its configuration name, sub-directory and split), a
local JSONL/JSON/CSV/Parquet file (compressed .gz/.bz2/.xz/.zst too) or a directory of them. `data.format` says what
a row holds: a text prompt (text), a message list (conversational), a Human:/Assistant: transcript (dialogue), or a
preference pair of whole transcripts whose shared part is the prompt (implicit; components/data/dialogue.py). A prompt
is a text or a conversation (a list of messages); the engine renders it for the policy (a chat template, or a
transcript).

Nothing is left out or cut silently: rows whose prompt is missing, empty, not text, not a conversation, or longer
than `data.max_prompt_chars` are counted and reported by row number (1-based: row N of a JSONL file is line N), and
`fit_prompts` counts, by row, the prompts over `generation.max_prompt_tokens` that it shortens (a conversation by its
oldest turns) or leaves out. A file that cannot be parsed fails naming the file and line, and says why.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from components.security import secrets
from components.config import DataConfig, GenerationConfig
from components.data.dialogue import (
    DialogueError, check_messages, drop_oldest_turns, ends_with_answer, parse_transcript, prompt_of_pair,
)
from components.errors import UserError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": None}
MAX_REPORTED_ROWS = 20
DEMO_DATA = Path("data") / "demo"

Prompt = str | list[dict[str, str]]


class DataError(UserError, ValueError):
    """A dataset that cannot be used; the message names the file, line or field."""


_REASONS = {
    "missing": ("missing prompt", "data/missing_prompt"),
    "empty": ("empty prompt", "data/empty_prompt"),
    "not_text": ("prompt is not text", "data/not_text_prompt"),
    "not_dialogue": ("not a conversation of this format", "data/not_dialogue"),
    "too_long": ("prompt too long (data.max_prompt_chars)", "data/too_long_prompt"),
    "dropped": ("over generation.max_prompt_tokens, left out", "data/dropped_over_token_limit"),
}


@dataclass
class PromptReport:
    """What happened to every row: kept (perhaps shortened), or left out with the reason; rows count from 1."""

    source: str
    total: int = 0
    kept: int = 0
    missing: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    not_text: list[int] = field(default_factory=list)
    not_dialogue: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)  # kept, shortened to fit generation.max_prompt_tokens
    notes: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(len(getattr(self, reason)) for reason in _REASONS)

    def as_metrics(self) -> dict[str, float]:
        metrics = {"data/rows": self.total, "data/kept": self.kept, "data/truncated_prompt": len(self.truncated)}
        metrics.update({metric: len(getattr(self, reason)) for reason, (_, metric) in _REASONS.items()})
        return metrics

    def summary(self) -> str:
        lines = [f"{self.source}: {self.kept} of {self.total} rows kept"]
        for reason, (text, _) in _REASONS.items():
            if rows := getattr(self, reason):
                lines.append(f"  {len(rows)} left out, {text}: rows {_rows(rows)}")
        if self.truncated:
            lines.append(f"  {len(self.truncated)} shortened to generation.max_prompt_tokens: rows {_rows(self.truncated)}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:MAX_REPORTED_ROWS])) + (" ..." if len(rows) > MAX_REPORTED_ROWS else "")


@dataclass
class PromptSet:
    prompts: list[Prompt]
    rows: list[int]  # each prompt's row number
    report: PromptReport
    files: list[Path]  # the local files read (empty for a hub dataset)


# --- reading rows -------------------------------------------------------------------------------


def kind_of(path: Path) -> tuple[str | None, str | None]:
    """(datasets builder, compression suffix) of a file name: `x.jsonl.gz` -> ("json", ".gz")."""
    suffixes = path.suffixes[-2:]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    data_suffix = (suffixes[-2] if len(suffixes) == 2 else None) if compression else (suffixes[-1] if suffixes else None)
    return FORMATS.get(data_suffix or ""), compression


def _open_binary(path: Path):
    opener = COMPRESSIONS.get(kind_of(path)[1] or "")
    if kind_of(path)[1] == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return zstandard.open(path, "rb")
    return opener(path, "rb") if opener else open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """What reading a broken archive raises: truncated (EOFError), not an archive of its kind (gzip.BadGzipFile and
    bz2's OSError), or corrupt inside a valid header (zlib.error, lzma.LZMAError, zstandard.ZstdError)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def _text_lines(path: Path) -> list[str]:
    """The file's lines as text, decompressed; a file that is empty, not UTF-8 or a broken archive (truncated, not
    of its kind, or corrupt) fails naming the file (and line)."""
    try:
        with _open_binary(path) as handle:
            raw = handle.read()
    except _decompression_errors() as exc:
        kind = kind_of(path)[1]
        if kind is None:
            raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
        name = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
        raise DataError(f"{path}: cannot decompress as {kind}: the file is truncated, corrupt or not {kind}-compressed "
                        f"({name}: {exc})") from None
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


def _check_csv(path: Path) -> list[str]:
    """The file's header, once every row is checked against it."""
    reader = csv.reader(io.StringIO("\n".join(_text_lines(path)), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty CSV file (no header)")
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}")
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot parse CSV ({exc})") from None
    return [name.lstrip("\ufeff") if column == 0 else name for column, name in enumerate(header)]


def _csv_as_text(header: list[str]) -> dict[str, Any]:
    """`datasets`' CSV settings that read every field as the text it is, and an empty one as missing (CSV cannot tell
    an empty text from none), so the rows read as the same rows in JSONL or Parquet do. By default pandas reads
    "NA", "null", "None", "nan" and a few more as missing and "007" as the number 7, guessing each column's type
    chunk by chunk."""
    import datasets

    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False, "na_values": [""]}


def data_files(source: Path, split: str, data_dir: str | None = None) -> list[Path]:
    """The files a local source stands for: itself, or the files of a directory (of its `data_dir`, as a hub
    repository's sub-directory; those named after the split, if any), one format per dataset."""
    if data_dir is not None:
        if not source.is_dir() or not (source / data_dir).is_dir():
            raise DataError(f"data.data_dir: {source / data_dir} is not a directory")
        source = source / data_dir
    if source.is_file():
        files = [source]
    else:
        candidates = sorted(p for p in source.rglob("*") if p.is_file() and kind_of(p)[0])
        named = [p for p in candidates if p.name.split(".")[0] == split or p.parent.name == split]
        files = named or candidates
        if not files:
            raise DataError(f"{source}: no {'/'.join(FORMATS)} files (compressed or not) in this directory")
    kinds = {kind_of(p)[0] for p in files}
    if None in kinds:
        raise DataError(f"{source}: unsupported file type; use one of {', '.join(FORMATS)}, optionally compressed "
                        f"({', '.join(COMPRESSIONS)})")
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes file types {sorted(kinds)}; keep one type per dataset")
    return files


def local_source(data: DataConfig, root: Path) -> Path | None:
    """The local file or directory `data.source` names, or None for a hub dataset; a path that looks local but does
    not exist fails naming the key."""
    local = Path(data.source) if Path(data.source).is_absolute() else root / data.source
    if local.exists():
        return local
    if data.source.startswith((".", "/")) or kind_of(Path(data.source))[0] or data.source.count("/") > 1:
        raise DataError(f"data.source: file or directory not found: {local}{_missing_hint(Path(data.source), root)}")
    return None


def _missing_hint(path: Path, root: Path) -> str:
    """What brings back a missing dataset: the .dvc file that pins it, or the demo's generator."""
    for candidate in [path, *path.parents][:-1]:
        if (root / f"{candidate}.dvc").is_file():
            return f"; `dvc pull {candidate}.dvc` fetches the version it pins"
    if path == DEMO_DATA or DEMO_DATA in path.parents:
        return "; `alignflow demo data` regenerates the demo data"
    return ""


def load_rows(data: DataConfig, root: Path = Path(".")):
    """(the rows as a `datasets.Dataset`, the local files read) from a local file, a directory or the hub."""
    import datasets

    datasets.disable_progress_bars()
    local = local_source(data, root)
    if local is not None and data.subset is not None:
        raise DataError(f"data.subset names a configuration of a hub dataset; {data.source} is local: point data.source "
                        "(or data.data_dir) at the files of that configuration")
    if local is not None:
        files = data_files(local, data.split, data.data_dir)
        settings: dict[str, Any] = {}
        for path in files:
            builder = kind_of(path)[0]
            if builder == "json":
                _check_jsonl(path)
            elif builder == "csv":
                settings = _csv_as_text(_check_csv(path))
        builder = kind_of(files[0])[0]
        try:
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **settings), files
        except Exception as exc:  # datasets wraps parser errors; keep the file name in front
            raise DataError(f"{local}: cannot read as {builder}: {type(exc).__name__}: {exc}") from None
    try:
        rows = datasets.load_dataset(data.source, name=data.subset, data_dir=data.data_dir, split=data.split)
    except Exception as exc:
        where = ", ".join(f"{k} {v!r}" for k, v in (("subset", data.subset), ("data_dir", data.data_dir),
                                                     ("split", data.split)) if v)
        raise DataError(f"data.source: cannot load hub dataset {data.source!r} ({where}): {type(exc).__name__}: {exc}") from None
    return rows, []


# --- prompts ------------------------------------------------------------------------------------


def load_prompts(data: DataConfig, root: Path = Path(".")) -> PromptSet:
    """The prompts of each row, per `data.format`; rows that give none are counted by reason."""
    rows, files = load_rows(data, root)
    needed = [data.chosen_field, data.rejected_field] if data.format == "implicit" else [data.prompt_field]
    for column in needed:
        if column not in rows.column_names:
            key = {data.chosen_field: "chosen_field", data.rejected_field: "rejected_field"}.get(column, "prompt_field")
            raise DataError(f"data.{key}: column {column!r} not in {data.source} (columns: {', '.join(rows.column_names)})")
    report = PromptReport(source=secrets.redact_text(data.source), total=len(rows))  # kept in Prefect's result cache
    prompts: list[Prompt] = []
    kept_rows: list[int] = []
    answered = 0  # dialogues that end with the assistant's answer: a whole dialogue given as a prompt
    columns = [rows[c] for c in needed]
    for row, values in enumerate(zip(*columns), start=1):
        prompt = _prompt_of(data, values, row, report)
        if prompt is None:
            continue
        if _is_answered_dialogue(prompt):
            answered += 1
        size = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if size > data.max_prompt_chars:
            report.too_long.append(row)
            continue
        prompts.append(prompt)
        kept_rows.append(row)
    if prompts and answered > len(prompts) / 2:
        raise DataError(
            f"data.prompt_field: {answered} of the {len(prompts)} prompts in column {data.prompt_field!r} of {data.source} "
            "end with the assistant's answer: they are whole dialogues, not prompts. For preference pairs (chosen / "
            "rejected), set data.format: implicit; the prompt is then what the two share before the last answer."
        )
    if data.max_prompts is not None:
        prompts, kept_rows = prompts[: data.max_prompts], kept_rows[: data.max_prompts]
    report.kept = len(prompts)
    if not prompts:
        raise DataError(f"{data.source}: no usable prompts\n{report.summary()}")
    return PromptSet(prompts=prompts, rows=kept_rows, report=report, files=files)


def _is_answered_dialogue(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        try:
            prompt = parse_transcript(prompt)
        except DialogueError:
            return False
    return ends_with_answer(prompt)


def _prompt_of(data: DataConfig, values: tuple[Any, ...], row: int, report: PromptReport) -> Prompt | None:
    """The prompt of one row, or None after counting why there is none."""
    if any(value is None for value in values):
        report.missing.append(row)
        return None
    if data.format == "conversational":
        try:
            return check_messages(values[0])
        except DialogueError:
            report.not_dialogue.append(row)
            return None
    if not all(isinstance(value, str) for value in values):
        report.not_text.append(row)
        return None
    if not all(value.strip() for value in values):
        report.empty.append(row)
        return None
    if data.format == "text":
        text = values[0].strip()
        return data.prompt_template.replace("{prompt}", text) if data.prompt_template else text
    try:
        transcript = prompt_of_pair(*values)[0] if data.format == "implicit" else values[0]
        messages = parse_transcript(transcript)
    except DialogueError:
        report.not_dialogue.append(row)
        return None
    return messages


def fit_prompts(prompts: PromptSet, count_tokens: Callable[[Prompt], int], generation: GenerationConfig) -> PromptSet:
    """The prompts as the policy will read them, each within `generation.max_prompt_tokens` (`count_tokens` renders
    and tokenizes a prompt as the engine does). Over the limit, per `generation.prompt_overflow`: a conversation loses
    its oldest turns (then, if its last turn alone is too long, it is shortened as text is), a text its start;
    or the prompt is left out; or the run stops naming the row. Every shortened or dropped row is counted."""
    limit = generation.max_prompt_tokens
    kept, rows = [], []
    report = prompts.report
    for prompt, row in zip(prompts.prompts, prompts.rows):
        length = count_tokens(prompt)
        if length <= limit:
            kept.append(prompt)
            rows.append(row)
            continue
        if generation.prompt_overflow == "reject":
            raise DataError(
                f"{prompts.report.source}: row {row}: the prompt has {length} tokens, more than "
                f"generation.max_prompt_tokens={limit} (generation.prompt_overflow: reject); shorten it, raise the "
                "limit, or set generation.prompt_overflow: truncate or drop"
            )
        if generation.prompt_overflow == "drop":
            report.dropped.append(row)
            continue
        shortened = None
        if isinstance(prompt, list):
            shortened = drop_oldest_turns(prompt, lambda messages: count_tokens(messages) <= limit)
        if shortened is None:
            shortened = _keep_end(prompt, count_tokens, limit)
        kept.append(shortened)
        rows.append(row)
        report.truncated.append(row)
    report.kept = len(kept)
    if not kept:
        raise DataError(f"{report.source}: no prompt fits generation.max_prompt_tokens={limit}\n{report.summary()}")
    return PromptSet(prompts=kept, rows=rows, report=report, files=prompts.files)


def _keep_end(prompt: Prompt, count_tokens: Callable[[Prompt], int], limit: int) -> Prompt:
    """The prompt with as much of its start cut as needed to fit: a text, or a conversation's last turn."""
    if isinstance(prompt, list):  # its last turn alone is over the limit: that turn, its start cut
        last = prompt[-1]
        text = last["content"]
        rebuild = lambda cut: [{**last, "content": cut}]  # noqa: E731
    else:
        text = prompt
        rebuild = lambda cut: cut  # noqa: E731
    low, high = 0, len(text)  # the fewest leading characters to cut, by bisection on the token count
    while low < high:
        middle = (low + high) // 2
        if count_tokens(rebuild(text[middle:])) <= limit:
            high = middle
        else:
            low = middle + 1
    return rebuild(text[low:])


@dataclass
class PreparedData:
    """The prompts of a run: training and held-out, as the policy reads them, and what happened to every row."""

    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    report: dict[str, float]  # data/* metrics
    summary: str


def prepare(data: DataConfig, generation: GenerationConfig, count_tokens: Callable[[Prompt], int], seed: int,
            root: Path = Path(".")) -> PreparedData:
    """Load the prompts, fit them to `generation.max_prompt_tokens`, and split off the held-out ones with `seed`."""
    prompts = fit_prompts(load_prompts(data, root), count_tokens, generation)
    train, held_out = split_prompts(prompts.prompts, data.eval_size, seed)
    return PreparedData(train, held_out, prompts.report.as_metrics(), prompts.report.summary())


def split_prompts(prompts: list[Prompt], eval_size: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """A seeded shuffle, then (train, held-out eval). The eval set never overlaps train."""
    if eval_size >= len(prompts):
        raise DataError(f"data.eval_size ({eval_size}) must be smaller than the number of prompts ({len(prompts)})")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held_out = [prompts[i] for i in order[:eval_size]]
    train = [prompts[i] for i in order[eval_size:]]
    return train, held_out
