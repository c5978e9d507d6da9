"""Evaluation statistics and promotion gates: pure functions on per-prompt arrays.

The evaluation scores the baseline (reference) policy and the candidate (trained) policy on
the same held-out prompts, so every comparison is paired by prompt. The KL of the candidate
from the reference needs the models and is computed elsewhere; it enters here as a number.

    baseline = summarize(base_scores, base_lengths, base_texts)
    candidate = summarize(cand_scores, cand_lengths, cand_texts)
    comparison = compare(baseline, candidate, n_resamples=1000, seed=1234)
    report = check_gates(comparison, kl, config.gates, champion_score=...)
    report.passed, report.failed_names, report.to_markdown()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from components.config import GatesConfig


# --- statistics -------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean; deterministic for a given seed."""
    values = _as_1d(values, "values")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1 (got {n_resamples})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    rng = np.random.default_rng(seed)
    resampled = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_diff_ci(
    candidate: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap CI of the mean paired difference `candidate[i] - baseline[i]` (prompts resampled)."""
    candidate, baseline = _paired(candidate, baseline)
    return bootstrap_ci(candidate - baseline, n_resamples=n_resamples, seed=seed, confidence=confidence)


def win_rate(candidate_scores: Sequence[float] | np.ndarray, baseline_scores: Sequence[float] | np.ndarray) -> float:
    """Share of prompts where the candidate scores higher than the baseline; a tie counts 1/2."""
    candidate, baseline = _paired(candidate_scores, baseline_scores)
    return float(np.mean((candidate > baseline) + 0.5 * (candidate == baseline)))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / total n-grams over whitespace tokens (n-grams never cross texts); 0 if none."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# --- one policy, and a paired comparison ------------------------------------------------------


@dataclass(frozen=True)
class PolicyEval:
    """One policy's evaluation on the held-out prompts; `scores` keeps the per-prompt order."""

    scores: tuple[float, ...]
    mean_score: float
    score_ci: tuple[float, float]
    mean_length: float
    distinct2: float
    gold_positive_share: float | None
    n: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """E.g. prefix `eval/candidate` -> `eval/candidate/mean_score`, ..."""
        metrics = {
            f"{prefix}/mean_score": self.mean_score,
            f"{prefix}/mean_score_ci_low": self.score_ci[0],
            f"{prefix}/mean_score_ci_high": self.score_ci[1],
            f"{prefix}/mean_length": self.mean_length,
            f"{prefix}/distinct2": self.distinct2,
        }
        if self.gold_positive_share is not None:
            metrics[f"{prefix}/gold_positive_share"] = self.gold_positive_share
        return metrics


def summarize(
    scores: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray,
    completions: Sequence[str],
    gold: Sequence[float] | np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PolicyEval:
    """Summarise one policy: reward-model scores, completion lengths (tokens) and texts, per prompt.

    `gold` holds an optional independent judge's verdict per completion (bools, 0/1 labels or
    probabilities; positive means > 0.5).
    """
    scores = _as_1d(scores, "scores")
    lengths = _as_1d(lengths, "lengths")
    n = len(scores)
    for name, other in (("lengths", lengths), ("completions", completions)):
        if len(other) != n:
            raise ValueError(f"{name} has {len(other)} entries, scores has {n}: one per prompt")
    gold_share = None
    if gold is not None:
        gold = _as_1d(gold, "gold")
        if len(gold) != n:
            raise ValueError(f"gold has {len(gold)} entries, scores has {n}: one per prompt")
        gold_share = float(np.mean(gold > 0.5))
    return PolicyEval(
        scores=tuple(float(s) for s in scores),
        mean_score=float(scores.mean()),
        score_ci=bootstrap_ci(scores, n_resamples=n_resamples, seed=seed, confidence=confidence),
        mean_length=float(lengths.mean()),
        distinct2=distinct_n(completions, 2),
        gold_positive_share=gold_share,
        n=n,
    )


@dataclass(frozen=True)
class Comparison:
    """Candidate against baseline on the same prompts."""

    baseline: PolicyEval
    candidate: PolicyEval
    reward_gain: float  # mean(candidate - baseline) per prompt
    reward_gain_ci: tuple[float, float]
    win_rate: float
    length_ratio: float  # candidate mean length / baseline mean length

    @property
    def n(self) -> int:
        return self.candidate.n

    @property
    def gold_gain(self) -> float | None:
        if self.candidate.gold_positive_share is None or self.baseline.gold_positive_share is None:
            return None
        return self.candidate.gold_positive_share - self.baseline.gold_positive_share

    def as_metrics(self) -> dict[str, float]:
        """`eval/...` metrics, with per-policy summaries under `eval/baseline/` and `eval/candidate/`."""
        metrics = {
            "eval/reward_gain": self.reward_gain,
            "eval/reward_gain_ci_low": self.reward_gain_ci[0],
            "eval/reward_gain_ci_high": self.reward_gain_ci[1],
            "eval/win_rate": self.win_rate,
            "eval/length_ratio": self.length_ratio,
            "eval/num_prompts": float(self.n),
            **self.baseline.as_metrics("eval/baseline"),
            **self.candidate.as_metrics("eval/candidate"),
        }
        if self.gold_gain is not None:
            metrics["eval/gold_gain"] = self.gold_gain
        return metrics


def compare(
    baseline: PolicyEval, candidate: PolicyEval, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Comparison:
    """Paired comparison: score gain with a bootstrap CI, win rate and length ratio."""
    if baseline.n != candidate.n:
        raise ValueError(
            f"baseline has {baseline.n} prompts, candidate has {candidate.n}: evaluate both on the same prompts"
        )
    cand, base = np.asarray(candidate.scores), np.asarray(baseline.scores)
    if baseline.mean_length > 0:
        length_ratio = candidate.mean_length / baseline.mean_length
    else:
        length_ratio = 1.0 if candidate.mean_length == 0 else math.inf
    return Comparison(
        baseline=baseline,
        candidate=candidate,
        reward_gain=float(np.mean(cand - base)),
        reward_gain_ci=bootstrap_diff_ci(cand, base, n_resamples=n_resamples, seed=seed, confidence=confidence),
        win_rate=win_rate(cand, base),
        length_ratio=length_ratio,
    )


# --- gates ------------------------------------------------------------------------------------

_NEGATION = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


@dataclass(frozen=True)
class Gate:
    """One promotion check: `value op threshold`, or `value in [low, high]` for op `in`."""

    name: str
    value: float
    threshold: float | tuple[float, float]
    passed: bool
    op: str
    threshold_name: str | tuple[str, str] | None = None  # the config key(s) the threshold comes from

    @property
    def rule(self) -> str:
        """The requirement, e.g. `<= max_kl 10.0` or `in [min_length_ratio 0.5, max_length_ratio 2.0]`."""
        if self.op == "in":
            (low, high), (low_name, high_name) = self.threshold, self.threshold_name
            return f"in [{low_name} {_fmt(low)}, {high_name} {_fmt(high)}]"
        return f"{self.op} {_named(self.threshold_name, self.threshold)}"

    @property
    def message(self) -> str:
        """What happened, e.g. `kl 14.2 > max_kl 10.0` (a failure states the violated relation)."""
        if self.passed:
            return f"{self.name} {_fmt(self.value)} {self.rule}"
        if self.op == "in":
            return f"{self.name} {_fmt(self.value)} outside {self.rule.removeprefix('in ')}"
        return f"{self.name} {_fmt(self.value)} {_NEGATION[self.op]} {_named(self.threshold_name, self.threshold)}"


@dataclass(frozen=True)
class GateReport:
    gates: tuple[Gate, ...]
    kl: float
    champion_score: float | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @property
    def failed_names(self) -> list[str]:
        return [gate.name for gate in self.gates if not gate.passed]

    @property
    def failures(self) -> list[str]:
        """One sentence per failed gate, e.g. `kl 14.2 > max_kl 10.0`."""
        return [gate.message for gate in self.gates if not gate.passed]

    def summary(self) -> str:
        if self.passed:
            return f"all {len(self.gates)} gates passed"
        return f"{len(self.failures)} of {len(self.gates)} gates failed: " + "; ".join(self.failures)

    def to_markdown(self) -> str:
        """A Markdown table (e.g. for a Prefect markdown artifact)."""
        lines = [
            f"## Promotion gates: {'PASSED' if self.passed else 'FAILED'}",
            "",
            "| gate | value | requirement | result |",
            "|---|---:|---|---|",
        ]
        for gate in self.gates:
            lines.append(f"| {gate.name} | {_fmt(gate.value)} | {gate.rule} | {'pass' if gate.passed else '**FAIL**'} |")
        lines.append("")
        lines.append(self.summary() + ".")
        lines.extend(f"\n_{note}_" for note in self.notes)
        return "\n".join(lines) + "\n"

    def to_rich_table(self):
        """A `rich.table.Table` for the terminal."""
        from rich.table import Table

        table = Table(title=f"Promotion gates: {'[green]PASSED' if self.passed else '[red]FAILED'}")
        table.add_column("gate")
        table.add_column("value", justify="right")
        table.add_column("requirement")
        table.add_column("result")
        for gate in self.gates:
            table.add_row(
                gate.name, _fmt(gate.value), gate.rule, "[green]pass" if gate.passed else "[bold red]FAIL"
            )
        return table

    def as_metrics(self) -> dict[str, float]:
        """`gate/<name>` is 1.0 or 0.0, `gate/<name>/value` the checked value; `gate/passed` overall."""
        metrics: dict[str, float] = {"gate/passed": float(self.passed)}
        for gate in self.gates:
            metrics[f"gate/{gate.name}"] = float(gate.passed)
            metrics[f"gate/{gate.name}/value"] = float(gate.value)
        return metrics

    def as_tags(self, prefix: str = "alignflow.") -> dict[str, str]:
        """`<prefix>gates_passed` true/false and `<prefix>gates_failed` (comma-separated names)."""
        return {
            f"{prefix}gates_passed": "true" if self.passed else "false",
            f"{prefix}gates_failed": ",".join(self.failed_names),
        }


def check_gates(
    comparison: Comparison, kl: float, gates: GatesConfig, champion_score: float | None = None
) -> GateReport:
    """Every promotion gate as a row; `champion_score` is the current champion's mean score, if any.

    The champion rule applies when a champion exists and `gates.beat_champion` is on; its score
    must come from the same evaluation prompts as the candidate's.
    """
    gain, (gain_low, _) = comparison.reward_gain, comparison.reward_gain_ci
    ratio, distinct2 = comparison.length_ratio, comparison.candidate.distinct2
    low, high = gates.min_length_ratio, gates.max_length_ratio
    rows = [Gate("reward_gain", gain, gates.min_reward_gain, gain >= gates.min_reward_gain, ">=", "min_reward_gain")]
    if gates.significant_gain:
        rows.append(Gate("reward_gain_ci_low", gain_low, 0.0, gain_low > 0.0, ">"))
    rows += [
        Gate("win_rate", comparison.win_rate, gates.min_win_rate, comparison.win_rate >= gates.min_win_rate, ">=", "min_win_rate"),
        Gate("kl", kl, gates.max_kl, kl <= gates.max_kl, "<=", "max_kl"),
        Gate("length_ratio", ratio, (low, high), low <= ratio <= high, "in", ("min_length_ratio", "max_length_ratio")),
        Gate("distinct2", distinct2, gates.min_distinct2, distinct2 >= gates.min_distinct2, ">=", "min_distinct2"),
    ]
    notes: list[str] = []
    if champion_score is not None and gates.beat_champion:
        score = comparison.candidate.mean_score
        rows.append(Gate("beats_champion", score, champion_score, score > champion_score, ">", "champion score"))
    elif champion_score is None:
        notes.append("no champion yet: beats_champion not checked")
    else:
        notes.append("gates.beat_champion is off: beats_champion not checked")
    if math.isnan(kl):
        notes.append("kl is NaN: the kl gate fails")
    return GateReport(gates=tuple(rows), kl=float(kl), champion_score=champion_score, notes=tuple(notes))


# --- helpers ----------------------------------------------------------------------------------


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one number per prompt (got shape {array.shape})")
    if array.size == 0:
        raise ValueError(f"{name} is empty: evaluate at least one prompt")
    return array


def _paired(candidate, baseline) -> tuple[np.ndarray, np.ndarray]:
    candidate, baseline = _as_1d(candidate, "candidate scores"), _as_1d(baseline, "baseline scores")
    if candidate.shape != baseline.shape:
        raise ValueError(
            f"candidate has {len(candidate)} scores, baseline has {len(baseline)}: they must be paired by prompt"
        )
    return candidate, baseline


def _fmt(value: float) -> str:
    """Four significant digits, keeping a trailing `.0` (10.0, 14.2, 0.3333)."""
    if not math.isfinite(value):
        return str(value)
    return str(float(f"{value:.4g}"))


def _named(name: str | None, value: float) -> str:
    return f"{name} {_fmt(value)}" if name else _fmt(value)


# --- a policy on the held-out prompts ---------------------------------------------------------


def load_gold_scorer(spec: str | None):
    """`package.module:function` (text -> bool or float) as configured in `evaluation.gold_scorer`."""
    if spec is None:
        return None
    import importlib

    module_name, _, function_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"evaluation.gold_scorer: cannot import {spec!r} ({exc})") from None


def evaluate_policy(policy, tokenizer, prompts: Sequence, scorer, generation, evaluation, use_chat_template: bool = False):
    """Sample each prompt once with `evaluation.seed`, score prompt + completion with the reward model as training
    does (it reads its EOS after a completion that ended with one, `reward.append_eos`), and with the gold judge,
    if configured. The same seed makes baseline and candidate comparable. A prompt is a text or a conversation; the
    gold judge reads a conversation as a Human:/Assistant: transcript.

    Returns (PolicyEval, the samples, the per-prompt scores); `samples.prompts_seen` is each prompt as the policy read it.
    """
    from components.dialogue import render_transcript
    from components.ppo.rollout import generate
    from components.reward import score_completions

    samples = generate(policy, tokenizer, prompts, generation, seed=evaluation.seed, use_chat_template=use_chat_template)
    raw = score_completions(scorer, list(prompts), samples.completions, samples.ended_with_eos)
    scores = [float(s) for s in raw.tolist()]
    judge = load_gold_scorer(evaluation.gold_scorer)
    texts = [p if isinstance(p, str) else render_transcript(p) for p in prompts]
    gold = None if judge is None else [float(judge(p + c)) for p, c in zip(texts, samples.completions)]
    summary = summarize(scores, samples.lengths, samples.completions, gold,
                        n_resamples=evaluation.bootstrap_samples, seed=evaluation.seed)
    return summary, samples, scores
