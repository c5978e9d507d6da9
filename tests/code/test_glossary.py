"""The README's Glossary against the vocabulary the code uses: every key and metric it names exists, every key named
with one of its terms is in that term's row, and the renamed keys and values lead to names that exist."""

import ast
import re
import typing
from dataclasses import replace

import pytest
from pydantic import BaseModel

from components.config import (
    PROJECT_ROOT, RENAMED_KEYS, RENAMED_VALUES, RETIRED_KEYS, GatesConfig, RewardGatesConfig, RewardRunConfig, RunConfig,
)
from components.evaluation.gates import check_gates
from components.evaluation.policy import compare, summarize
from components.reward.evaluation import RewardEval, check_reward_gates

SCHEMAS = (RunConfig, RewardRunConfig)

# A key whose name holds one of these words (a whole word of its dotted, underscored name, section included) is
# named in one of the rows given: a new key named with a term is placed in the Glossary, or this test says where.
TERM_WORDS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("episode", "episodes"): ("episode",),
    ("iteration", "iterations"): ("iteration",),
    ("group", "groups"): ("group",),
    ("epoch", "epochs"): ("epoch",),
    ("batch",): ("batch sizes",),
    ("policy",): ("policy",),
    ("reference",): ("reference",),
    ("critic", "value"): ("critic",),
    ("reward", "rewards"): ("reward model", "reward"),
    ("score", "scores"): ("score",),
    ("kl",): ("KL", "KL penalty"),
    ("advantage", "advantages"): ("advantage estimator",),
    ("estimator",): ("advantage estimator", "KL"),
    ("checkpoint",): ("checkpoint",),
    ("format",): ("data format",),
    ("pair", "pairs", "margin", "chosen", "rejected"): ("preference pair",),
    ("judge",): ("judge",),
    ("gold",): ("gold scorer",),
    ("gate", "gates"): ("gate",),
    ("champion",): ("champion",),
}


def glossary() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    start = readme.index("\n## Glossary")
    end = readme.find("\n## ", start + 1)
    return readme[start:] if end < 0 else readme[start:end]


def rows() -> dict[str, str]:
    """The Glossary's table: term -> the whole row."""
    table = [line for line in glossary().splitlines() if line.startswith("| ") and not line.startswith("| term |")]
    return {line.split("|")[1].strip(): line for line in table}


def fields(model: type[BaseModel], prefix: str = "") -> dict[str, typing.Any]:
    """`section.key` -> the field's annotation, for every key of `model` (optional sections included)."""
    found = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        sections = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections:
            found.update(fields(sections[0], f"{prefix}{name}."))
        else:
            found[prefix + name] = annotation
    return found


KEYS = [fields(schema) for schema in SCHEMAS]
ALL_KEYS = {key for keys in KEYS for key in keys}
SECTIONS = {key.split(".")[0] for key in ALL_KEYS if "." in key}


def choices(annotation) -> set[str]:
    """The values a Literal key (optional or not) allows; empty for any other."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return {value for arg in typing.get_args(annotation) for value in choices(arg)}


def table_names(path: str) -> set[str]:
    """The first column of the metric table in the module docstring of `path` (without importing it)."""
    docstring = ast.get_docstring(ast.parse((PROJECT_ROOT / path).read_text()))
    names = set()
    for line in docstring.splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        if cell and cell != "name" and not cell.startswith("-"):
            names.add(cell)
    return names


def evaluation_metrics() -> set[str]:
    """What the evaluations and the gates of both stages log, with every optional part present (judge, gold, champion)."""
    scores, texts = [0.0, 1.0, 2.0, 3.0], ["a good film", "a bad film", "a fine film", "an odd film"]
    reference = summarize(scores, [5] * 4, texts, [1.0, 0.0, 1.0, 0.0], judge_scores=scores, n_resamples=10)
    candidate = summarize([s + 1 for s in scores], [6] * 4, texts, [1.0, 1.0, 1.0, 0.0], kl=1.0,
                          judge_scores=scores, n_resamples=10)
    comparison = compare(reference, candidate, n_resamples=10)
    metrics = {**comparison.as_metrics(), **check_gates(comparison, GatesConfig(), champion_score=0.0).as_metrics()}
    pairs = RewardEval(n=4, accuracy=0.75, accuracy_ci=(0.5, 1.0), mean_margin=1.0, chosen_mean=1.0, rejected_mean=0.0,
                       calibration_error=0.1, by_length=[{"accuracy": 0.75}], gold_accuracy=0.75)
    for name in ("candidate", "champion"):
        metrics.update(pairs.as_metrics(f"eval/{name}"))
    metrics.update(check_reward_gates(pairs, RewardGatesConfig(), champion=replace(pairs, accuracy=0.5)).as_metrics())
    return set(metrics)


METRICS = table_names("components/rl/trainer.py") | table_names("components/reward/training.py") | evaluation_metrics()
METRIC_PREFIXES = {name.split("/")[0] for name in METRICS if "/" in name}


def named() -> list[str]:
    """Everything the Glossary writes in backticks, a `key: value` as it is written."""
    return re.findall(r"`([^`]+)`", glossary())


def words(key: str) -> set[str]:
    return set(re.split(r"[._]", key))


def covers(row: str, key: str) -> bool:
    """Whether `row` names `key`, itself or through its section (`section.*`)."""
    spans = re.findall(r"`([^`:= ]+)", row)
    return key in spans or any(span.endswith(".*") and key.startswith(span[:-1]) for span in spans)


def test_the_glossary_has_a_row_for_each_term_a_key_is_checked_against():
    found = rows()
    assert [term for terms in TERM_WORDS.values() for term in terms if term not in found] == []
    assert all(row.count("|") == 4 for row in found.values()), "a row is | term | meaning | keys and metrics |"


def test_every_key_and_value_the_glossary_names_exists_in_a_stage_configuration():
    wrong = []
    for span in named():
        key, value = (part.strip() for part in (re.split(r"[:=]", span, maxsplit=1) + [""])[:2])
        if key.split(".")[0] not in SECTIONS or "." not in key:
            continue  # a tag (alignflow.stage), a metric, a value, a command
        if key.endswith(".*"):
            if not any(k.startswith(key[:-1]) for k in ALL_KEYS):
                wrong.append(f"{span}: no such section")
        elif key not in ALL_KEYS:
            wrong.append(f"{span}: no such key")
        elif value and (allowed := set().union(*(choices(keys[key]) for keys in KEYS if key in keys))) and \
                value not in allowed:
            wrong.append(f"{span}: {key} takes {sorted(allowed)}")
    assert wrong == []


def test_every_metric_the_glossary_names_is_one_the_stages_log():
    assert {"objective/scores", "train/loss", "eval/score_gain", "gate/score_gain"} <= METRICS  # the tables were read
    spans = [span for span in named() if re.fullmatch(r"[a-z0-9_]+(/[a-z0-9_]+)+", span)]
    assert [span for span in spans if span.split("/")[0] in METRIC_PREFIXES and span not in METRICS] == []


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.__name__)
def test_every_key_named_with_a_term_is_in_that_terms_row(schema):
    found = rows()
    missing = []
    for key in fields(schema):
        for forms, terms in TERM_WORDS.items():
            if words(key) & set(forms) and not any(covers(found.get(term, ""), key) for term in terms):
                missing.append(f"{key}: name it in the row of {' or '.join(terms)}")
    assert missing == []


def test_renamed_and_retired_keys_lead_to_names_that_exist():
    assert [new for new in RENAMED_KEYS.values() if new not in ALL_KEYS] == []
    assert [old for old in RENAMED_KEYS if old in ALL_KEYS] == []  # an old name is no longer a key
    assert [old for old in RETIRED_KEYS if old in ALL_KEYS] == []
    for key, values in RENAMED_VALUES.items():
        assert key in ALL_KEYS
        allowed = [choices(keys[key]) for keys in KEYS if key in keys]
        assert all(set(values.values()) <= each for each in allowed), (key, values, allowed)
        assert not any(set(values) & each for each in allowed), (key, values, allowed)  # the old values are gone
