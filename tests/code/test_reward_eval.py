import dataclasses
import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from components.config import RewardEvaluationConfig, RewardGatesConfig
from components.reward.evaluation import (
    RewardEval,
    check_reward_gates,
    evaluate_pairs,
    plot_reliability,
    plot_score_distributions,
    reliability,
)

EVALUATION = RewardEvaluationConfig(bootstrap_samples=500, seed=7)


def evaluate(chosen, rejected, lengths=None, evaluation=EVALUATION) -> RewardEval:
    return evaluate_pairs(chosen, rejected, lengths if lengths is not None else [10] * len(chosen), evaluation)


def with_accuracy(accuracy: float, n: int) -> RewardEval:
    """`n` pairs of which a share `accuracy` is ranked right (chosen 1, rejected 0), the rest wrong."""
    right = round(accuracy * n)
    chosen = [1.0] * right + [0.0] * (n - right)
    return evaluate(chosen, [1.0 - c for c in chosen])


def bradley_terry(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of two answers per pair, the human choosing the first with probability sigmoid(s1 - s2):
    a perfectly calibrated reward model. Returns (chosen scores, rejected scores)."""
    rng = np.random.default_rng(seed)
    first, second = rng.normal(0, 2, n), rng.normal(0, 2, n)
    first_chosen = rng.random(n) < 1 / (1 + np.exp(-(first - second)))
    return np.where(first_chosen, first, second), np.where(first_chosen, second, first)


# --- accuracy, margins ------------------------------------------------------------------------


def test_accuracy_counts_ties_as_half():
    # right, tie, wrong, right -> (1 + 0.5 + 0 + 1) / 4
    assert evaluate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]).accuracy == 0.625


def test_accuracy_ci_contains_the_accuracy_and_narrows_with_more_pairs():
    few, many = with_accuracy(0.7, 20), with_accuracy(0.7, 2000)
    for result in (few, many):
        low, high = result.accuracy_ci
        assert result.accuracy == pytest.approx(0.7)
        assert low <= result.accuracy <= high
    assert many.accuracy_ci[1] - many.accuracy_ci[0] < (few.accuracy_ci[1] - few.accuracy_ci[0]) / 4


def test_accuracy_ci_is_reproducible_with_the_seed():
    chosen, rejected = bradley_terry(200)
    again = evaluate(chosen, rejected)
    assert again.accuracy_ci == evaluate(chosen, rejected).accuracy_ci
    other_seed = evaluate(chosen, rejected, evaluation=RewardEvaluationConfig(bootstrap_samples=500, seed=8))
    assert other_seed.accuracy_ci != again.accuracy_ci


def test_margin_and_means_by_hand():
    result = evaluate([3.0, 1.0, -1.0], [1.0, 2.0, -4.0])
    assert result.n == 3
    assert result.mean_margin == pytest.approx((2 - 1 + 3) / 3)
    assert result.chosen_mean == pytest.approx(1.0)
    assert result.rejected_mean == pytest.approx(-1 / 3)


def test_mismatched_or_broken_scores_are_refused():
    with pytest.raises(ValueError, match="one of each per pair"):
        evaluate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        evaluate([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="one length per pair"):
        evaluate([1.0, 2.0], [0.0, 0.0], lengths=[5])


# --- length buckets ---------------------------------------------------------------------------


def test_length_buckets_show_a_model_that_is_wrong_on_long_answers():
    lengths = [40, 10, 80, 30, 70, 20, 60, 50]
    chosen = [1.0 if length <= 40 else -1.0 for length in lengths]  # short pairs ranked right, long ones wrong
    result = evaluate(chosen, [0.0] * 8, lengths)
    assert [(b["bucket"], b["low"], b["high"], b["n"], b["accuracy"]) for b in result.by_length] == [
        ("[10, 20]", 10, 20, 2, 1.0),
        ("[30, 40]", 30, 40, 2, 1.0),
        ("[50, 60]", 50, 60, 2, 0.0),
        ("[70, 80]", 70, 80, 2, 0.0),
    ]
    assert result.accuracy == 0.5


def test_length_buckets_keep_equal_lengths_together_and_are_never_empty():
    result = evaluate([1.0] * 7, [0.0] * 7, lengths=[5, 5, 5, 5, 5, 9, 12])
    # 4 buckets of 7 pairs would split the 5s; they stay in one bucket, and no bucket is left empty
    assert [(b["bucket"], b["n"]) for b in result.by_length] == [("[5, 5]", 5), ("[9, 9]", 1), ("[12, 12]", 1)]
    top_heavy = evaluate([1.0] * 5, [0.0] * 5, lengths=[1, 9, 9, 9, 9]).by_length
    assert [(b["bucket"], b["n"]) for b in top_heavy] == [("[1, 1]", 1), ("[9, 9]", 4)]
    assert len(evaluate([1.0, 0.0], [0.0, 1.0], lengths=[3, 8]).by_length) == 2  # fewer pairs than buckets


def test_length_bucket_counts_add_up_to_n():
    chosen, rejected = bradley_terry(1001)
    lengths = np.random.default_rng(1).integers(5, 300, 1001)
    result = evaluate(chosen, rejected, lengths)
    assert len(result.by_length) == 4
    assert sum(b["n"] for b in result.by_length) == 1001
    lows, highs = [b["low"] for b in result.by_length], [b["high"] for b in result.by_length]
    assert all(high < next_low for high, next_low in zip(highs, lows[1:]))


# --- calibration ------------------------------------------------------------------------------


def test_a_bradley_terry_model_is_calibrated_and_a_scaled_one_is_not():
    chosen, rejected = bradley_terry(5000)
    calibrated = evaluate(chosen, rejected).calibration_error
    overconfident = evaluate(10 * chosen, 10 * rejected).calibration_error
    assert calibrated < 0.03
    assert overconfident > 0.1
    assert overconfident > 5 * calibrated


def test_reliability_counts_every_pair_in_both_orders():
    chosen, rejected = bradley_terry(300)
    rows = reliability(chosen, rejected, bins=10)
    assert len(rows) == 10
    assert sum(row["n"] for row in rows) == 600
    assert (rows[0]["low"], rows[-1]["high"]) == (0.0, 1.0)


def test_reliability_by_hand():
    # margin 0: p = 0.5 in both orders, outcome 1 then 0 -> the upper bin, observed 1/2;
    # margin +inf-like: p ~ 1 (outcome 1) and ~ 0 (outcome 0) -> perfectly calibrated extremes
    rows = reliability([0.0, 50.0], [0.0, 0.0], bins=2)
    assert [row["n"] for row in rows] == [1, 3]
    assert rows[0]["predicted"] == pytest.approx(0.0) and rows[0]["observed"] == 0.0
    assert rows[1]["predicted"] == pytest.approx(2 / 3) and rows[1]["observed"] == pytest.approx(2 / 3)
    empty = reliability([0.0], [0.0], bins=4)[0]
    assert (empty["n"], empty["predicted"], empty["observed"]) == (0, None, None)


# --- figures ----------------------------------------------------------------------------------


def test_score_distributions_figure_overlays_two_histograms(tmp_path):
    chosen, rejected = bradley_terry(200)
    figure = plot_score_distributions(chosen, rejected)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert len(ax.containers) == 2
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0].startswith("chosen (mean") and labels[1].startswith("rejected (mean")
    assert ax.get_xlabel() and ax.get_ylabel()
    figure.savefig(tmp_path / "scores.png")
    assert (tmp_path / "scores.png").stat().st_size > 0


def test_reliability_figure_has_the_diagonal_the_curve_and_the_counts(tmp_path):
    chosen, rejected = bradley_terry(500)
    figure = plot_reliability(chosen, rejected, bins=10)
    curve_ax, count_ax = figure.axes
    diagonal, curve = curve_ax.get_lines()
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    assert len(curve.get_xdata()) == sum(1 for row in reliability(chosen, rejected, 10) if row["n"])
    (bars,) = count_ax.containers
    assert len(bars) == 10
    assert f"ECE {evaluate(chosen, rejected).calibration_error:.3f}" in curve_ax.get_title()
    figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0


# --- gates ------------------------------------------------------------------------------------


def test_accuracy_gate_passes_and_fails_on_min_accuracy():
    result = with_accuracy(0.7, 2000)
    assert check_reward_gates(result, RewardGatesConfig(min_accuracy=0.65)).passed
    report = check_reward_gates(result, RewardGatesConfig(min_accuracy=0.75))
    assert report.failed_names == ["accuracy"]
    assert report.failures == ["accuracy 0.7 < min_accuracy 0.75"]


def test_significance_gate_needs_enough_pairs():
    gates = RewardGatesConfig(min_accuracy=0.6)
    few = check_reward_gates(with_accuracy(0.6, 20), gates)
    assert few.failed_names == ["accuracy_ci_low"]
    assert check_reward_gates(with_accuracy(0.6, 2000), gates).passed
    assert [g.name for g in check_reward_gates(with_accuracy(0.6, 20), RewardGatesConfig(significant=False)).gates] == [
        "accuracy"
    ]


def test_champion_gate_needs_a_strictly_higher_accuracy_and_shows_both_figures():
    gates = RewardGatesConfig(min_accuracy=0.6)
    champion = with_accuracy(0.72, 2000)
    worse = check_reward_gates(with_accuracy(0.7, 2000), gates, champion=champion)
    assert worse.failed_names == ["beats_champion"]
    row = worse.gates[-1]
    assert (row.value, row.threshold) == (pytest.approx(0.7), pytest.approx(0.72))  # each model's own figure
    assert row.rule == "> champion accuracy 0.72" and worse.failures == ["beats_champion 0.7 <= champion accuracy 0.72"]
    assert worse.champion_score == pytest.approx(0.72)
    assert worse.notes[0].startswith("the champion on the same 2000 pairs: accuracy 0.72, mean margin 0.44")
    assert "(the candidate: accuracy 0.7, mean margin" in worse.notes[0]
    # A tie keeps the champion: a candidate must be better, not merely as good (the barely-learned model).
    tied = check_reward_gates(with_accuracy(0.72, 2000), gates, champion=champion)
    assert tied.failed_names == ["beats_champion"] and "a tie keeps the champion" in tied.notes[-1]
    assert "beats_champion 0.72 <= champion accuracy 0.72" in tied.summary()
    better = check_reward_gates(with_accuracy(0.7205, 2000), gates, champion=champion)
    assert better.passed and [g.name for g in better.gates][-1] == "beats_champion"
    off = check_reward_gates(with_accuracy(0.7, 2000), RewardGatesConfig(beats_champion=False), champion)
    assert off.passed and "beats_champion" not in [g.name for g in off.gates]


def test_the_old_champion_switch_still_loads_under_its_new_name():
    from components.config import ConfigDeprecation, load_config
    from components.config import RewardRunConfig

    with pytest.warns(ConfigDeprecation, match="gates.beats_champion"):
        config = load_config(None, ["gates.not_worse_than_champion=false"], schema=RewardRunConfig)
    assert config.gates.beats_champion is False


def test_champion_on_other_pairs_is_refused():
    with pytest.raises(ValueError, match="same held-out pairs"):
        check_reward_gates(with_accuracy(0.7, 2000), RewardGatesConfig(), champion=with_accuracy(0.7, 1000))


def test_report_has_the_policy_gates_form():
    report = check_reward_gates(with_accuracy(0.7, 2000), RewardGatesConfig(), champion=with_accuracy(0.6, 2000))
    markdown = report.to_markdown()
    for name in ("accuracy", "accuracy_ci_low", "beats_champion"):
        assert f"| {name} |" in markdown
    assert "> chance 0.5" in markdown and "| > champion accuracy 0.6 |" in markdown
    assert math.isnan(report.kl)
    assert report.as_metrics()["gate/beats_champion/value"] == pytest.approx(0.7)  # the candidate's, not a difference
    assert "no champion yet" in check_reward_gates(with_accuracy(0.7, 2000), RewardGatesConfig()).notes[0]


# --- recording --------------------------------------------------------------------------------


def test_as_metrics_keys():
    chosen, rejected = bradley_terry(100)
    metrics = evaluate(chosen, rejected, lengths=np.arange(100)).as_metrics()
    assert sorted(metrics) == sorted([
        "eval/accuracy", "eval/accuracy_ci_low", "eval/accuracy_ci_high", "eval/mean_margin", "eval/chosen_mean",
        "eval/rejected_mean", "eval/calibration_error", "eval/n",
        "eval/accuracy_length_q1", "eval/accuracy_length_q2", "eval/accuracy_length_q3", "eval/accuracy_length_q4",
    ])
    assert metrics["eval/n"] == 100.0
    assert "heldout/accuracy" in evaluate([1.0], [0.0]).as_metrics(prefix="heldout")


def test_json_round_trip():
    chosen, rejected = bradley_terry(100)
    result = evaluate(chosen, rejected, lengths=np.arange(100) / 2)
    assert RewardEval.from_json(json.loads(json.dumps(dataclasses.asdict(result)))) == result


def test_gold_accuracy_is_agreement_with_the_truth_where_it_decides():
    from components.data.preferences import PreferencePair
    from components.reward.evaluation import gold_accuracy_of

    pairs = [PreferencePair("p", " good", " bad", None, 1), PreferencePair("p", " bad", " good", None, 2),  # 2: a flipped label
             PreferencePair("p", " fine", " fine!", None, 3)]  # the truth ties: left out
    truth = {"p good": 1.0, "p bad": 0.0, "p fine": 0.5, "p fine!": 0.5}.__getitem__
    # The model prefers " good" both times: right on the truth twice (the flipped label cannot fool it), a tie on 3 ignored.
    assert gold_accuracy_of(pairs, [2.0, 1.0, 0.3], [1.0, 2.0, 0.1], truth) == 1.0
    assert gold_accuracy_of(pairs, [1.0, 2.0, 0.3], [2.0, 1.0, 0.1], truth) == 0.0
    assert gold_accuracy_of(pairs, [1.0, 1.0, 0.0], [1.0, 2.0, 0.0], truth) == 0.75  # a model tie counts half, pair 2 right
