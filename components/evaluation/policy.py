"""Evaluation: a policy on the held-out prompts, the candidate against the reference, and the promotion gates.

The reference (the policy the run started from, which training holds it near) and the candidate (the trained
policy) are sampled on the same held-out prompts with the same seed, so every comparison is paired by prompt.

    reference = summarize(ref_scores, ref_lengths, ref_texts)                   # or evaluate_policy(...)
    candidate = summarize(cand_scores, cand_lengths, cand_texts, kl=kl)
    comparison = compare(reference, candidate, n_resamples=1000, seed=1234)
    report = check_gates(comparison, config.gates, champion_score=...)
    report.passed, report.failed_names, report.to_markdown(), report.to_rich_table()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from components.config import ConfigError, GOLD_SCORER_PACKAGES, gold_scorer_allowed
from components.data.dialogue import render_transcript
from components.rl.reward import score_completions
from components.rl.generation import generate, sequence_kl



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
    reference: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap CI of the mean paired difference `candidate[i] - reference[i]` (prompts resampled)."""
    candidate, reference = _paired(candidate, reference)
    return bootstrap_ci(candidate - reference, n_resamples=n_resamples, seed=seed, confidence=confidence)


def win_rate(candidate_scores: Sequence[float] | np.ndarray, reference_scores: Sequence[float] | np.ndarray) -> float:
    """Share of prompts where the candidate scores higher than the reference; a tie counts 1/2."""
    candidate, reference = _paired(candidate_scores, reference_scores)
    return float(np.mean((candidate > reference) + 0.5 * (candidate == reference)))


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
    kl: float | None = None  # nats per completion from the reference (the candidate's; the reference's is 0)
    judge_scores: tuple[float, ...] | None = None  # the judge's (a held-out reward model's) scores, per prompt
    judge_mean: float | None = None

    @classmethod
    def from_json(cls, value: dict) -> "PolicyEval":
        judge = value.get("judge_scores")
        return cls(**{**value, "scores": tuple(value["scores"]), "score_ci": tuple(value["score_ci"]),
                      "judge_scores": None if judge is None else tuple(judge)})

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """E.g. prefix `eval/candidate` -> `eval/candidate/mean_score`, ..., `eval/candidate/kl`."""
        metrics = {
            f"{prefix}/mean_score": self.mean_score,
            f"{prefix}/mean_score_ci_low": self.score_ci[0],
            f"{prefix}/mean_score_ci_high": self.score_ci[1],
            f"{prefix}/mean_length": self.mean_length,
            f"{prefix}/distinct2": self.distinct2,
        }
        if self.gold_positive_share is not None:
            metrics[f"{prefix}/gold_positive_share"] = self.gold_positive_share
        if self.kl is not None:
            metrics[f"{prefix}/kl"] = self.kl
        if self.judge_mean is not None:
            metrics[f"{prefix}/judge_mean_score"] = self.judge_mean
        return metrics


def summarize(
    scores: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray,
    completions: Sequence[str],
    gold: Sequence[float] | np.ndarray | None = None,
    *,
    kl: float | None = None,
    judge_scores: Sequence[float] | np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PolicyEval:
    """Summarise one policy: reward-model scores, completion lengths (tokens) and texts, per prompt.

    `gold` holds the gold scorer's verdict per completion, if there is one (`evaluation.gold_scorer`: bools, 0/1 labels
    or probabilities; positive means > 0.5); `judge_scores` the judge's (a held-out reward model's) scores.
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
        kl=kl,
        judge_scores=None if judge_scores is None else tuple(float(x) for x in _paired(judge_scores, scores)[0]),
        judge_mean=None if judge_scores is None else float(np.mean(judge_scores)),
    )


@dataclass(frozen=True)
class Comparison:
    """Candidate against reference on the same prompts."""

    reference: PolicyEval
    candidate: PolicyEval
    score_gain: float  # mean(candidate - reference) of the reward model's scores, per prompt
    score_gain_ci: tuple[float, float]
    win_rate: float
    length_ratio: float  # candidate mean length / reference mean length
    judge_gain: float | None = None  # the judge's mean(candidate - reference), where a judge scored both
    judge_gain_ci: tuple[float, float] | None = None

    @property
    def n(self) -> int:
        return self.candidate.n

    @property
    def gold_gain(self) -> float | None:
        if self.candidate.gold_positive_share is None or self.reference.gold_positive_share is None:
            return None
        return self.candidate.gold_positive_share - self.reference.gold_positive_share

    def as_metrics(self) -> dict[str, float]:
        """`eval/...` metrics, with per-policy summaries under `eval/reference/` and `eval/candidate/`."""
        metrics = {
            "eval/score_gain": self.score_gain,
            "eval/score_gain_ci_low": self.score_gain_ci[0],
            "eval/score_gain_ci_high": self.score_gain_ci[1],
            "eval/win_rate": self.win_rate,
            "eval/length_ratio": self.length_ratio,
            "eval/num_prompts": float(self.n),
            **self.reference.as_metrics("eval/reference"),
            **self.candidate.as_metrics("eval/candidate"),
        }
        if self.gold_gain is not None:
            metrics["eval/gold_gain"] = self.gold_gain
        if self.judge_gain is not None:
            metrics.update({"eval/judge_gain": self.judge_gain, "eval/judge_gain_ci_low": self.judge_gain_ci[0],
                            "eval/judge_gain_ci_high": self.judge_gain_ci[1]})
        return metrics


def comparison_table(reference: PolicyEval, candidate: PolicyEval) -> list[dict[str, float | str]]:
    """Reference against candidate, a row per measure: what the flow's Prefect artifact and the CLI show."""
    rows = []
    for key in ("mean_score", "judge_mean", "mean_length", "distinct2", "gold_positive_share", "kl"):
        ref, cand = getattr(reference, key), getattr(candidate, key)
        if cand is not None:
            rows.append({"metric": key, "reference": round(ref if ref is not None else 0.0, 4), "candidate": round(cand, 4)})
    return rows


def compare(
    reference: PolicyEval, candidate: PolicyEval, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Comparison:
    """Paired comparison: score gain with a bootstrap CI, win rate and length ratio."""
    if reference.n != candidate.n:
        raise ValueError(
            f"the reference has {reference.n} prompts, the candidate {candidate.n}: evaluate both on the same prompts"
        )
    cand, base = np.asarray(candidate.scores), np.asarray(reference.scores)
    if reference.mean_length > 0:
        length_ratio = candidate.mean_length / reference.mean_length
    else:
        length_ratio = 1.0 if candidate.mean_length == 0 else math.inf
    judged = reference.judge_scores is not None and candidate.judge_scores is not None
    if judged:
        judge_cand, judge_base = np.asarray(candidate.judge_scores), np.asarray(reference.judge_scores)
    return Comparison(
        reference=reference,
        candidate=candidate,
        score_gain=float(np.mean(cand - base)),
        score_gain_ci=bootstrap_diff_ci(cand, base, n_resamples=n_resamples, seed=seed, confidence=confidence),
        win_rate=win_rate(cand, base),
        length_ratio=length_ratio,
        judge_gain=float(np.mean(judge_cand - judge_base)) if judged else None,
        judge_gain_ci=bootstrap_diff_ci(judge_cand, judge_base, n_resamples=n_resamples, seed=seed,
                                        confidence=confidence) if judged else None,
    )


# --- helpers ----------------------------------------------------------------------------------


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one number per prompt (got shape {array.shape})")
    if array.size == 0:
        raise ValueError(f"{name} is empty: evaluate at least one prompt")
    return array


def _paired(candidate, reference) -> tuple[np.ndarray, np.ndarray]:
    candidate, reference = _as_1d(candidate, "candidate scores"), _as_1d(reference, "reference scores")
    if candidate.shape != reference.shape:
        raise ValueError(
            f"candidate has {len(candidate)} scores, reference has {len(reference)}: they must be paired by prompt"
        )
    return candidate, reference


def load_gold_scorer(spec: str | None):
    """`package.module:function` (text -> bool or float) as configured in `evaluation.gold_scorer`: a function of this
    project's own packages (config.GOLD_SCORER_PACKAGES), defined there, not one they import from elsewhere."""
    if spec is None:
        return None
    import importlib
    import inspect


    module_name, _, function_name = spec.partition(":")
    if not gold_scorer_allowed(module_name, function_name):
        raise ConfigError(f"evaluation.gold_scorer: {spec!r} is not a gold scorer alignflow may import: name a public "
                          f"function of this project's own packages ({', '.join(GOLD_SCORER_PACKAGES)})")
    try:
        gold_scorer = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"evaluation.gold_scorer: cannot import {spec!r} ({exc})") from None
    defined_in = getattr(gold_scorer, "__module__", None) or ""
    if not (inspect.isfunction(gold_scorer) and gold_scorer_allowed(defined_in, function_name)):
        raise ConfigError(f"evaluation.gold_scorer: {spec!r} is not a function of this project's own packages "
                          f"({', '.join(GOLD_SCORER_PACKAGES)})" + (f" (it comes from {defined_in})" if defined_in else ""))
    return gold_scorer


def evaluate_policy(policy, tokenizer, prompts: Sequence, scorer, generation, evaluation, use_chat_template: bool = False,
                    reference=None, judge=None):
    """Sample each prompt once with `evaluation.seed`, score prompt + completion with the reward model as training
    does (it reads its EOS after a completion that ended with one, `reward.append_eos`), and with the gold scorer,
    if configured. The same seed makes reference and candidate comparable. A prompt is a text or a conversation; the
    gold scorer reads a conversation as a Human:/Assistant: transcript.

    With a `reference` policy, the summary holds the policy's KL from it on its own completions; with a `judge` (a
    held-out reward model's RewardScorer, scoring as the reward model does), its scores of the same completions.
    Returns (PolicyEval, the completions (`components.rl.generation.Completions`, whose `prompts_seen` is each prompt
    as the policy read it), the per-prompt scores).
    """

    generated = generate(policy, tokenizer, prompts, generation, seed=evaluation.seed, use_chat_template=use_chat_template)
    raw = score_completions(scorer, list(prompts), generated.completions, generated.ended_with_eos)
    scores = [float(s) for s in raw.tolist()]
    gold_scorer = load_gold_scorer(evaluation.gold_scorer)
    texts = [p if isinstance(p, str) else render_transcript(p) for p in prompts]
    gold = None if gold_scorer is None else [float(gold_scorer(p + c)) for p, c in zip(texts, generated.completions)]
    kl = None
    if reference is not None:
        kl = sequence_kl(policy, reference, tokenizer, prompts, generated.completions, generation, generated.ended_with_eos,
                         use_chat_template=use_chat_template)
    judge_scores = None if judge is None else [
        float(s) for s in score_completions(judge, list(prompts), generated.completions, generated.ended_with_eos).tolist()]
    summary = summarize(scores, generated.lengths, generated.completions, gold, kl=kl, judge_scores=judge_scores,
                        n_resamples=evaluation.bootstrap_samples, seed=evaluation.seed)
    return summary, generated, scores
