"""Preference pairs: what a reward model learns from.

A pair is a prompt and two answers, the chosen one preferred to the rejected one; the reward model learns
r(prompt + chosen) > r(prompt + rejected). `data.format` says how a row holds a pair:

- explicit: prompt, chosen and rejected columns of text. prompt + chosen is the text scored, kept as it is (an
  answer's leading space too). An empty answer is an answer: saying nothing is what a reward model must learn to rank
  low (the demo's degenerate completions), so only an empty prompt is a bad row.
- implicit: chosen and rejected whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts (Anthropic hh-rlhf). The
  prompt is their shared part up to and including its last "\\n\\nAssistant:" (`prompt_of_pair`), each answer what
  follows, so prompt + chosen is the chosen transcript exactly; dialogues that part before their last turn keep the
  later turns in the answers.
- conversational: chosen and rejected message lists (TRL's conversational form), after a prompt column of messages or
  as whole conversations that share all but the last assistant message. The prompt is the shared messages, each
  answer its last assistant message's text.
- auto: conversational if chosen holds lists, explicit if the prompt column holds text, implicit otherwise.

No row is left out silently. `PairReport` lists each bad row by number (1-based: row N of a JSONL file is line N)
under its first problem, in this order: empty, missing or not text, chosen identical to rejected, not a prompt and two
answers, bad margin; `drop_too_long` adds the pairs over the model's token limit.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from components.config import PreferenceDataConfig
from components.data.prompts import DataError, Prompt, load_rows
from components.data.dialogue import DialogueError, check_messages, parse_transcript, prompt_of_pair

MAX_LISTED_ROWS = 10

_PROBLEMS = {  # PairReport's list -> what is wrong with its rows
    "empty": "empty, missing or not text",
    "identical": "chosen identical to rejected",
    "unsplittable": "not a prompt and two answers",
    "bad_margin": "margin missing or not a finite number",
    "too_long": "too long for the model's max_length",
}


@dataclass(frozen=True)
class PreferencePair:
    """One judgement: `chosen` is the better answer to `prompt`, `rejected` the worse."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None  # how much better chosen is (data.margin_field), or None
    row: int  # 1-based row number in the source


@dataclass
class PairReport:
    """What happened to every row: kept, or left out under its problem; rows count from 1."""

    source: str
    total: int = 0
    kept: int = 0
    identical: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    unsplittable: list[int] = field(default_factory=list)
    bad_margin: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)
    other_shards: int = 0  # rows of the shards this run does not read (data.num_shards > 1)

    def as_metrics(self) -> dict[str, float]:
        metrics = {"data/pairs_total": float(self.total), "data/pairs_kept": float(self.kept),
                   "data/rows_other_shards": float(self.other_shards)}
        metrics.update({f"data/bad/{problem}": float(len(getattr(self, problem))) for problem in _PROBLEMS})
        return metrics

    def summary(self) -> str:
        """One line: the counts, then the rows of each problem."""
        parts = [f"{self.source}: {self.kept} of {self.total} pairs kept"]
        parts += [f"{_rows(rows)}: {text}" for problem, text in _PROBLEMS.items() if (rows := getattr(self, problem))]
        if self.other_shards:
            parts.append(f"{self.other_shards} rows in other shards")
        unused = self.total - self.kept - self.other_shards - sum(len(getattr(self, problem)) for problem in _PROBLEMS)
        if unused > 0:
            parts.append(f"{unused} good beyond data.max_pairs")
        return "; ".join(parts)

    def as_json(self) -> dict:
        return asdict(self)


def _rows(rows: list[int]) -> str:
    listed = ", ".join(map(str, rows[:MAX_LISTED_ROWS]))
    more = f" and {len(rows) - MAX_LISTED_ROWS} more" if len(rows) > MAX_LISTED_ROWS else ""
    return f"{'rows' if len(rows) > 1 else 'row'} {listed}{more}"


@dataclass
class PairSet:
    pairs: list[PreferencePair]
    report: PairReport
    files: list[Path]  # the local files read (empty for a hub dataset)
    format: str  # as resolved: explicit, implicit or conversational


class _BadRow(Exception):
    """A row that gives no pair; `problem` names the PairReport list it goes to."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


# --- loading ------------------------------------------------------------------------------------


def load_pairs(data: PreferenceDataConfig, root: Path = Path(".")) -> PairSet:
    """The pairs of `data.source` read per `data.format` (of its shard `data.shard` of `data.num_shards`, by row
    number), the first `data.max_pairs` of the good ones; bad rows are reported, never used. DataError names the key to fix, or summarizes the rows when none is good."""
    rows, files = load_rows(data, root)
    columns = rows.column_names
    _require(data, columns, "chosen_field", "rejected_field", *(["margin_field"] if data.margin_field else []))
    chosen, rejected = list(rows[data.chosen_field]), list(rows[data.rejected_field])
    prompts = list(rows[data.prompt_field]) if data.prompt_field in columns else None
    form = data.format if data.format != "auto" else _detect(prompts, chosen)
    if form == "explicit":
        _require(data, columns, "prompt_field")
    if form == "implicit" or prompts is None:
        prompts = [None] * len(rows)
    margins = list(rows[data.margin_field]) if data.margin_field else [None] * len(rows)

    report = PairReport(source=data.source, total=len(rows))
    pairs: list[PreferencePair] = []
    for row, (prompt_value, chosen_value, rejected_value, margin_value) in enumerate(
        zip(prompts, chosen, rejected, margins), start=1
    ):
        if (row - 1) % data.num_shards != data.shard:  # another shard's row: not bad, not this run's
            report.other_shards += 1
            continue
        try:
            prompt, chosen_answer, rejected_answer = _split(form, prompt_value, chosen_value, rejected_value)
            margin = _margin(margin_value) if data.margin_field else None
        except _BadRow as bad:
            getattr(report, bad.problem).append(row)
            continue
        pairs.append(PreferencePair(prompt, chosen_answer, rejected_answer, margin, row))
    pairs = pairs[: data.max_pairs]
    report.kept = len(pairs)
    if not pairs:
        how = f"format {form}" + (" (detected; set data.format if it is not)" if data.format == "auto" else "")
        raise DataError(f"data.source: no usable preference pair, read as {how}: {report.summary()}")
    return PairSet(pairs=pairs, report=report, files=files, format=form)


def _require(data: PreferenceDataConfig, columns: list[str], *keys: str) -> None:
    for key in keys:
        if (column := getattr(data, key)) not in columns:
            raise DataError(f"data.{key}: column {column!r} not in {data.source} (columns: {', '.join(columns)})")


def _detect(prompts: list[Any] | None, chosen: list[Any]) -> str:
    """The format the columns and their first values (past missing ones) tell."""
    if isinstance(_first(chosen), list):
        return "conversational"
    if prompts is not None and isinstance(_first(prompts), str):
        return "explicit"
    return "implicit"


def _first(values: list[Any]) -> Any:
    return next((value for value in values if value is not None), None)


def _split(form: str, prompt: Any, chosen: Any, rejected: Any) -> tuple[Prompt, str, str]:
    """(prompt, chosen answer, rejected answer) of one row, or _BadRow."""
    if form == "explicit":
        if not all(isinstance(text, str) for text in (prompt, chosen, rejected)) or not prompt.strip():
            raise _BadRow("empty")
        if chosen == rejected:
            raise _BadRow("identical")
        return prompt, chosen, rejected
    if form == "implicit":
        if not all(isinstance(text, str) and text.strip() for text in (chosen, rejected)):
            raise _BadRow("empty")
        if chosen == rejected:
            raise _BadRow("identical")
        try:
            shared, chosen_answer, rejected_answer = prompt_of_pair(chosen, rejected)
            parse_transcript(shared)  # the shared part reads as a dialogue, not just text before a cue
        except DialogueError:
            raise _BadRow("unsplittable") from None
        return shared, chosen_answer, rejected_answer
    # conversational: both sides as whole conversations, then all but their last (assistant) message is the prompt
    if any(value is None or value == [] for value in (chosen, rejected)) or prompt == []:
        raise _BadRow("empty")
    if chosen == rejected:
        raise _BadRow("identical")
    try:
        history = check_messages(prompt) if prompt is not None else []
        chosen_whole, rejected_whole = history + check_messages(chosen), history + check_messages(rejected)
    except DialogueError:
        raise _BadRow("unsplittable") from None
    shared = chosen_whole[:-1]
    answers_are_assistant = chosen_whole[-1]["role"] == rejected_whole[-1]["role"] == "assistant"
    if not shared or shared != rejected_whole[:-1] or not answers_are_assistant:
        raise _BadRow("unsplittable")
    if chosen_whole[-1]["content"] == rejected_whole[-1]["content"]:
        raise _BadRow("identical")
    return shared, chosen_whole[-1]["content"], rejected_whole[-1]["content"]


def _margin(value: Any) -> float:
    """A finite number (or its text: a CSV column with one bad value is read as text), or _BadRow. A missing value is
    bad too: JSON's NaN and CSV's "nan" are read as missing, and must not pass as "no margin"."""
    if isinstance(value, bool):
        raise _BadRow("bad_margin")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadRow("bad_margin") from None
    if not math.isfinite(number):
        raise _BadRow("bad_margin")
    return number


# --- fitting and splitting ----------------------------------------------------------------------


def drop_too_long(pairs: PairSet, count_tokens: Callable[[PreferencePair], int], max_length: int) -> PairSet:
    """The pairs whose longer side (prompt + chosen or prompt + rejected; `count_tokens` reads it as the model does)
    fits in `max_length` tokens. The others are left out and reported, not cut: cutting could remove the very part
    where the two answers differ."""
    kept: list[PreferencePair] = []
    too_long: list[PreferencePair] = []
    for pair in pairs.pairs:
        (kept if count_tokens(pair) <= max_length else too_long).append(pair)
    report = replace(pairs.report, kept=len(kept), too_long=pairs.report.too_long + [pair.row for pair in too_long])
    if not kept:
        raise DataError(f"no preference pair fits in {max_length} tokens (model.max_length): {report.summary()}")
    return PairSet(pairs=kept, report=report, files=pairs.files, format=pairs.format)


def split_pairs(
    pairs: list[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): a permutation by random.Random(seed), the same on every machine, whose first
    max(1, round(n * eval_fraction)) pairs are held out (at most n - 1, so that training keeps one)."""
    if len(pairs) < 2:
        raise DataError(f"data: {len(pairs)} preference pair(s) cannot be split into training and held-out pairs; "
                        "at least 2 are needed")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    size = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction)))
    return [pairs[i] for i in order[size:]], [pairs[i] for i in order[:size]]
