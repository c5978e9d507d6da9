"""Held-out evaluation of a reward model on human preference pairs, and its promotion gates.

Each pair has the reward model's score of the human-chosen answer and of the rejected one:

    result = evaluate_pairs(chosen_scores, rejected_scores, lengths, config.evaluation)
    report = check_reward_gates(result, config.gates, champion=...)   # the same GateReport as the policy gates
    figures: plot_score_distributions(...), plot_reliability(...)

Calibration reads the reward model as a Bradley-Terry model, P(chosen preferred) = sigmoid(r_chosen - r_rejected).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.config import RewardEvaluationConfig, RewardGatesConfig
from components.evaluation.policy import bootstrap_ci
from components.evaluation.gates import Gate, GateReport
from components.data.dialogue import render_transcript

Scores = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class RewardEval:
    """A reward model on the held-out pairs."""

    n: int
    accuracy: float  # share of pairs with r_chosen > r_rejected; a tie counts 1/2
    accuracy_ci: tuple[float, float]  # bootstrap 95% CI of the accuracy
    mean_margin: float  # mean(r_chosen - r_rejected)
    chosen_mean: float
    rejected_mean: float
    calibration_error: float  # symmetrised expected calibration error of sigmoid(r_chosen - r_rejected)
    by_length: list[dict]  # accuracy per quantile bucket of the answers' length, shortest first
    gold_accuracy: float | None = None  # where a ground truth exists (the demo): share of pairs ordered as it orders them

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """E.g. `eval/accuracy`, `eval/accuracy_ci_low`, ..., `eval/accuracy_length_q1` (shortest bucket), `eval/n`."""
        metrics = {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_ci_low": self.accuracy_ci[0],
            f"{prefix}/accuracy_ci_high": self.accuracy_ci[1],
            f"{prefix}/mean_margin": self.mean_margin,
            f"{prefix}/chosen_mean": self.chosen_mean,
            f"{prefix}/rejected_mean": self.rejected_mean,
            f"{prefix}/calibration_error": self.calibration_error,
        }
        for q, bucket in enumerate(self.by_length, start=1):
            metrics[f"{prefix}/accuracy_length_q{q}"] = bucket["accuracy"]
        metrics[f"{prefix}/n"] = float(self.n)
        if self.gold_accuracy is not None:
            metrics[f"{prefix}/gold_accuracy"] = self.gold_accuracy
        return metrics

    @classmethod
    def from_json(cls, value: dict) -> "RewardEval":
        """The evaluation back from its `dataclasses.asdict` JSON (where the CI became a list)."""
        return cls(**{**value, "accuracy_ci": tuple(value["accuracy_ci"]), "by_length": [dict(b) for b in value["by_length"]]})


def evaluate_pairs(
    chosen_scores: Scores, rejected_scores: Scores, lengths: Scores, evaluation: RewardEvaluationConfig
) -> RewardEval:
    """Accuracy (with a bootstrap CI), margins, calibration and accuracy per length bucket, on the held-out pairs.

    `lengths` holds one number per pair, the answers' length in tokens (e.g. the mean of chosen and rejected): a
    reward model that merely prefers long answers shows up as accuracy that changes across the buckets.
    """
    chosen, rejected = _pairs(chosen_scores, rejected_scores)
    lengths = np.asarray(lengths, dtype=float)
    if lengths.shape != chosen.shape:
        raise ValueError(f"lengths has shape {lengths.shape}, the scores {chosen.shape}: one length per pair")
    correct = _correct(chosen, rejected)
    return RewardEval(
        n=len(chosen),
        accuracy=float(correct.mean()),
        accuracy_ci=bootstrap_ci(correct, n_resamples=evaluation.bootstrap_samples, seed=evaluation.seed),
        mean_margin=float(np.mean(chosen - rejected)),
        chosen_mean=float(chosen.mean()),
        rejected_mean=float(rejected.mean()),
        calibration_error=_ece(reliability(chosen, rejected, evaluation.calibration_bins)),
        by_length=_by_length(correct, lengths, evaluation.length_buckets),
    )


def reliability(chosen_scores: Scores, rejected_scores: Scores, bins: int) -> list[dict]:
    """Predicted P(first text preferred) against how often it was, in `bins` equal-width bins on [0, 1].

    Symmetrised: with one human label per pair, (chosen, rejected) order alone would make `observed` always 1, so
    every pair counts in both orders: (p = sigmoid(r_c - r_r), outcome 1) and (1 - p, outcome 0); `n` sums to 2N.
    An empty bin has `n` 0 and `predicted`, `observed` None.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1 (got {bins})")
    chosen, rejected = _pairs(chosen_scores, rejected_scores)
    p = 0.5 * (1.0 + np.tanh((chosen - rejected) / 2))  # sigmoid, without overflow for large margins
    predicted = np.concatenate([p, 1.0 - p])
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    index = np.minimum((predicted * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append({
            "low": b / bins, "high": (b + 1) / bins, "n": count,
            "predicted": float(predicted[mask].mean()) if count else None,
            "observed": float(outcome[mask].mean()) if count else None,
        })
    return rows


def plot_score_distributions(chosen_scores: Scores, rejected_scores: Scores):
    """Overlaid histograms of the chosen and the rejected answers' scores (the same bins); the legend gives the means."""
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    chosen, rejected = _pairs(chosen_scores, rejected_scores)
    edges = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins="auto")
    figure = Figure(figsize=(7, 4), constrained_layout=True)
    ax = figure.subplots()
    ax.hist(chosen, bins=edges, alpha=0.5, label=f"chosen (mean {chosen.mean():.3g})")
    ax.hist(rejected, bins=edges, alpha=0.5, label=f"rejected (mean {rejected.mean():.3g})")
    ax.set_xlabel("reward score")
    ax.set_ylabel("answers")
    ax.set_title(f"Reward scores on {len(chosen)} held-out pairs")
    ax.legend()
    return figure


def plot_reliability(chosen_scores: Scores, rejected_scores: Scores, bins: int):
    """Reliability diagram: observed agreement against predicted P(chosen preferred) per bin, with the diagonal of
    perfect calibration; below it, the bin counts. The title gives the ECE."""
    from matplotlib.figure import Figure

    rows = reliability(chosen_scores, rejected_scores, bins)
    filled = [row for row in rows if row["n"]]
    figure = Figure(figsize=(6, 6), constrained_layout=True)
    curve_ax, count_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    curve_ax.plot([r["predicted"] for r in filled], [r["observed"] for r in filled], marker="o", label="reward model")
    curve_ax.set_ylabel("observed: first text human-preferred")
    curve_ax.set_ylim(0, 1)
    curve_ax.legend(loc="upper left")
    curve_ax.set_title(f"Reliability (ECE {_ece(rows):.3f})")
    count_ax.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["n"] for r in rows], width=1 / bins, edgecolor="white")
    count_ax.set_xlabel("predicted P(first text preferred) = sigmoid(score difference)")
    count_ax.set_ylabel("count (both orders)")
    count_ax.set_xlim(0, 1)
    return figure


def check_reward_gates(evaluation: RewardEval, gates: RewardGatesConfig, champion: RewardEval | None = None) -> GateReport:
    """Every reward-model promotion gate as a row, in the policy gates' report form (its `kl` is NaN: no policy).

    `champion` is the current champion reward model evaluated on the same held-out pairs (same `n`, else ValueError).
    Its rule (`gates.beats_champion`) asks for evidence that the candidate is better: held-out accuracy strictly above
    the champion's on the same pairs, so a tie keeps the champion (as the policy stage's `beats_champion` and the
    registry's compare-and-set). The row holds the candidate's accuracy and the champion's own, never a difference;
    the notes give both models' mean margin and calibration error beside them.
    """
    accuracy, ci_low = evaluation.accuracy, evaluation.accuracy_ci[0]
    rows = [Gate("accuracy", accuracy, gates.min_accuracy, accuracy >= gates.min_accuracy, ">=", "min_accuracy")]
    if gates.significant:
        rows.append(Gate("accuracy_ci_low", ci_low, 0.5, ci_low > 0.5, ">", "chance"))
    notes: list[str] = []
    if champion is None:
        notes.append("no champion yet: beats_champion not checked")
    else:
        if champion.n != evaluation.n:
            raise ValueError(f"the champion was evaluated on {champion.n} pairs, the candidate on {evaluation.n}: "
                             "evaluate both on the same held-out pairs")
        notes.append(f"the champion on the same {champion.n} pairs: {_figures(champion)} (the candidate: "
                     f"{_figures(evaluation)})")
        if gates.beats_champion:
            rows.append(Gate("beats_champion", accuracy, champion.accuracy, accuracy > champion.accuracy, ">",
                             "champion accuracy"))
            if accuracy == champion.accuracy:
                notes.append("accuracy tied with the champion's: a tie keeps the champion (gates.beats_champion)")
        else:
            notes.append("gates.beats_champion is off: beats_champion not checked")
    return GateReport(gates=tuple(rows), champion_score=None if champion is None else champion.accuracy, notes=tuple(notes))


def _figures(evaluation: RewardEval) -> str:
    return (f"accuracy {evaluation.accuracy:.4g}, mean margin {evaluation.mean_margin:.4g}, calibration error "
            f"{evaluation.calibration_error:.4g}")


# --- helpers ----------------------------------------------------------------------------------


def _pairs(chosen_scores: Scores, rejected_scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    chosen, rejected = np.asarray(chosen_scores, dtype=float), np.asarray(rejected_scores, dtype=float)
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen scores have shape {chosen.shape}, rejected {rejected.shape}: one of each per pair")
    if chosen.size == 0:
        raise ValueError("no pairs: evaluate at least one preference pair")
    if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
        raise ValueError("a reward score is NaN or infinite: the reward model's output is broken")
    return chosen, rejected


def _correct(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 where the chosen answer scores higher, 1/2 on a tie, else 0."""
    return (chosen > rejected) + 0.5 * (chosen == rejected)


def _ece(rows: list[dict]) -> float:
    """Expected calibration error: sum over bins of n_b / N * |observed_b - predicted_b|."""
    total = sum(row["n"] for row in rows)
    return float(sum(row["n"] / total * abs(row["observed"] - row["predicted"]) for row in rows if row["n"]))


def _by_length(correct: np.ndarray, lengths: np.ndarray, buckets: int) -> list[dict]:
    """Accuracy per quantile bucket of length: pairs sorted by length in `buckets` equal-count groups, equal lengths
    together (in the group of their mid-rank), so ties or few pairs give fewer buckets, never an empty one.
    `low`/`high` are the bucket's shortest and longest length, rounded outwards to whole tokens."""
    values, inverse, counts = np.unique(lengths, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts + 1) / 2  # 0-based mean rank of each distinct length
    index = (mid_rank * buckets // len(lengths)).astype(int)[inverse]
    rows = []
    for b in np.unique(index):
        mask = index == b
        low, high = int(np.floor(lengths[mask].min())), int(np.ceil(lengths[mask].max()))
        rows.append({"bucket": f"[{low}, {high}]", "low": low, "high": high, "n": int(mask.sum()),
                     "accuracy": float(correct[mask].mean())})
    return rows


def gold_accuracy(chosen_scores: Scores, rejected_scores: Scores, gold_chosen: Scores, gold_rejected: Scores) -> float:
    """The share of pairs the reward model orders as a ground truth does (the demo's gold scorer), pairs the ground
    truth ties left out; ties of the reward model count half. Human labels are noisy (the demo flips 10%): against
    them no model can be right on every pair, against the ground truth it can."""
    chosen, rejected = _pairs(chosen_scores, rejected_scores)
    gold = np.sign(np.asarray(gold_chosen, dtype=float) - np.asarray(gold_rejected, dtype=float))
    model = np.sign(chosen - rejected)
    decided = gold != 0
    if not decided.any():
        return float("nan")
    return float(np.mean(np.where(model[decided] == 0, 0.5, model[decided] == gold[decided])))


def gold_accuracy_of(pairs, chosen_scores: Scores, rejected_scores: Scores, gold_scorer) -> float:
    """`gold_accuracy` against `gold_scorer(text) -> float` (e.g. the demo's `gold_score`), reading each pair's prompt and
    answer as one text (a conversation as a Human:/Assistant: transcript)."""

    def text(prompt, answer: str) -> str:
        return (prompt if isinstance(prompt, str) else render_transcript(prompt)) + answer

    gold_chosen = [float(gold_scorer(text(pair.prompt, pair.chosen))) for pair in pairs]
    gold_rejected = [float(gold_scorer(text(pair.prompt, pair.rejected))) for pair in pairs]
    return gold_accuracy(chosen_scores, rejected_scores, gold_chosen, gold_rejected)
