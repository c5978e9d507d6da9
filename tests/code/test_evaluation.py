import math

import numpy as np
import pytest

import dataclasses

from components.evaluation import gates as gates_module
from components.config import GatesConfig
from components.evaluation.policy import bootstrap_ci, bootstrap_diff_ci, compare, comparison_table, distinct_n, summarize, win_rate


def check_gates(comparison, kl, gates, champion_score=None):
    """The gates of a comparison whose candidate measured `kl` from the reference."""
    candidate = dataclasses.replace(comparison.candidate, kl=kl)
    return gates_module.check_gates(dataclasses.replace(comparison, candidate=candidate), gates, champion_score)

# --- statistics -------------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == 0.625


def test_win_rate_of_identical_policies_is_one_half():
    assert win_rate([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.5


def test_win_rate_needs_paired_scores():
    with pytest.raises(ValueError, match="paired by prompt"):
        win_rate([1.0, 2.0], [1.0])


def test_distinct2_by_hand():
    # "the film was good" -> (the film) (film was) (was good)
    # "the film was bad"  -> (the film) (film was) (was bad)
    # 6 bigrams, 4 distinct
    assert distinct_n(["the film was good", "the film was bad"], n=2) == pytest.approx(4 / 6)


def test_distinct_n_does_not_join_texts_and_ignores_short_ones():
    # "a b" has one bigram; "b" has none; no (b, b) bigram across the boundary.
    assert distinct_n(["a b", "b", "b a"], n=2) == 1.0
    assert distinct_n(["a a a a"], n=2) == pytest.approx(1 / 3)  # 3 bigrams, all (a, a)
    assert distinct_n(["a a a a"], n=1) == 0.25
    assert distinct_n(["", "one"], n=2) == 0.0


def test_bootstrap_ci_of_constant_values_is_the_value():
    assert bootstrap_ci([3.0, 3.0, 3.0], n_resamples=50, seed=0) == (3.0, 3.0)


def test_bootstrap_ci_contains_the_mean_and_is_deterministic_for_a_seed():
    values = np.arange(20, dtype=float)  # mean 9.5
    low, high = bootstrap_ci(values, n_resamples=500, seed=7)
    assert low < 9.5 < high
    assert bootstrap_ci(values, n_resamples=500, seed=7) == (low, high)
    assert bootstrap_ci(values, n_resamples=500, seed=8) != (low, high)
    # A higher confidence gives a wider interval from the same resamples.
    wide_low, wide_high = bootstrap_ci(values, n_resamples=500, seed=7, confidence=0.99)
    assert wide_low <= low and high <= wide_high


def test_bootstrap_diff_ci_is_the_ci_of_the_per_prompt_differences():
    candidate, reference = [1.0, 2.0, 4.0, 7.0], [0.0, 1.5, 1.0, 6.0]
    diffs = [1.0, 0.5, 3.0, 1.0]
    assert bootstrap_diff_ci(candidate, reference, n_resamples=200, seed=3) == bootstrap_ci(diffs, 200, 3)
    # A constant shift is known exactly.
    assert bootstrap_diff_ci([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], n_resamples=100, seed=0) == (1.0, 1.0)


def test_bootstrap_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], n_resamples=10, seed=0)


# --- summaries and comparison -----------------------------------------------------------------


def test_summarize_one_policy():
    result = summarize(
        [1.0, 2.0, 3.0], [4, 6, 8], ["the film was good", "the film", "good"], gold=[True, 0.2, 0.9]
    )
    assert result.n == 3
    assert result.mean_score == 2.0
    assert result.score_ci[0] <= 2.0 <= result.score_ci[1]
    assert result.mean_length == 6.0
    assert result.distinct2 == 0.75  # (the film) (film was) (was good) (the film): 3 distinct of 4
    assert result.gold_positive_share == pytest.approx(2 / 3)


def test_summarize_without_gold_has_no_gold_share():
    assert summarize([0.0], [1], ["x"]).gold_positive_share is None


def test_summarize_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="completions has 1 entries, scores has 2"):
        summarize([1.0, 2.0], [3, 4], ["only one"])


def _pair(base_scores, cand_scores, base_len=10.0, cand_len=10.0, cand_texts=None):
    n = len(base_scores)
    texts = cand_texts or [f"w{i} x{i} y{i}" for i in range(n)]
    reference = summarize(base_scores, [base_len] * n, [f"b{i} c{i}" for i in range(n)], n_resamples=200)
    candidate = summarize(cand_scores, [cand_len] * n, texts, n_resamples=200)
    return reference, candidate


def test_compare_is_paired_by_prompt():
    reference, candidate = _pair([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 4.0, 3.0], base_len=8.0, cand_len=12.0)
    result = compare(reference, candidate, n_resamples=200, seed=0)
    assert result.score_gain == 0.75  # diffs 1, 0, 2, 0
    assert result.score_gain_ci == bootstrap_ci([1.0, 0.0, 2.0, 0.0], 200, 0)
    assert result.win_rate == 0.75  # win, tie, win, tie
    assert result.length_ratio == 1.5
    metrics = result.as_metrics()
    assert metrics["eval/score_gain"] == 0.75
    assert metrics["eval/candidate/mean_length"] == 12.0


def test_compare_refuses_unpaired_evaluations():
    reference, _ = _pair([0.0, 1.0], [0.0, 1.0])
    _, candidate = _pair([0.0], [0.0])
    with pytest.raises(ValueError, match="same prompts"):
        compare(reference, candidate)


# --- gates ------------------------------------------------------------------------------------

GATES = GatesConfig(
    min_score_gain=0.1, min_win_rate=0.5, max_kl=10.0, min_length_ratio=0.5, max_length_ratio=2.0, min_distinct2=0.2
)


def _good_comparison(**overrides):
    # Every prompt improves by exactly 1 -> gain 1.0, CI (1.0, 1.0), win rate 1.0.
    settings = dict(base=[0.0, 1.0, 2.0, 3.0], cand=[1.0, 2.0, 3.0, 4.0], base_len=10.0, cand_len=10.0)
    settings.update(overrides)
    reference, candidate = _pair(
        settings["base"], settings["cand"], settings["base_len"], settings["cand_len"], settings.get("texts")
    )
    return compare(reference, candidate, n_resamples=200, seed=0)


def _row(report, name):
    (row,) = [gate for gate in report.gates if gate.name == name]
    return row


def test_all_gates_pass_for_a_clear_improvement():
    report = check_gates(_good_comparison(), kl=3.0, gates=GATES)
    assert report.passed
    assert report.failed_names == []
    assert [gate.name for gate in report.gates] == [
        "score_gain", "score_gain_ci_low", "win_rate", "kl", "length_ratio", "distinct2",
    ]
    assert _row(report, "kl").message == "kl 3.0 <= max_kl 10.0"
    assert "no champion yet" in report.notes[0]


def test_score_gain_gate_fails_below_min_score_gain():
    # gain 0.05 on every prompt: the CI is above 0 but the gain is below 0.1
    report = check_gates(_good_comparison(cand=[0.05, 1.05, 2.05, 3.05]), kl=3.0, gates=GATES)
    assert report.failed_names == ["score_gain"]
    assert _row(report, "score_gain").message == "score_gain 0.05 < min_score_gain 0.1"


def test_score_gain_ci_gate_fails_when_the_gain_may_be_noise():
    # diffs +3, -1, -1, +3: mean gain 1.0 >= 0.1 but resampling can pick only the losses
    report = check_gates(_good_comparison(cand=[3.0, 0.0, 1.0, 6.0]), kl=3.0, gates=GATES)
    row = _row(report, "score_gain_ci_low")
    assert not row.passed and row.value < 0
    assert row.message.startswith("score_gain_ci_low -") and row.message.endswith("<= 0.0")
    assert _row(report, "score_gain").passed


def test_win_rate_gate():
    # wins 1 of 4, one big win carries the mean: win rate 0.25
    comparison = _good_comparison(cand=[10.0, 0.5, 1.5, 2.5])
    report = check_gates(comparison, kl=3.0, gates=GATES)
    assert _row(report, "win_rate").value == 0.25
    assert _row(report, "win_rate").message == "win_rate 0.25 < min_win_rate 0.5"
    # tie, tie, win, loss: exactly at the threshold passes
    ties = check_gates(_good_comparison(cand=[0.0, 1.0, 3.0, 2.5]), kl=3.0, gates=GATES)
    assert _row(ties, "win_rate").value == 0.5 and _row(ties, "win_rate").passed
    assert check_gates(comparison, 3.0, GATES.model_copy(update={"min_win_rate": 0.25})).gates[2].passed


def test_kl_gate_fails_above_max_kl_with_clear_wording():
    report = check_gates(_good_comparison(), kl=14.2, gates=GATES)
    assert report.failed_names == ["kl"]
    assert report.failures == ["kl 14.2 > max_kl 10.0"]
    assert not report.passed
    assert check_gates(_good_comparison(), kl=10.0, gates=GATES).passed  # boundary passes


def test_kl_gate_fails_on_nan():
    report = check_gates(_good_comparison(), kl=math.nan, gates=GATES)
    assert report.failed_names == ["kl"]


@pytest.mark.parametrize("cand_len, passed", [(4.0, False), (5.0, True), (20.0, True), (25.0, False)])
def test_length_ratio_gate_is_a_closed_interval(cand_len, passed):
    report = check_gates(_good_comparison(cand_len=cand_len), kl=3.0, gates=GATES)
    row = _row(report, "length_ratio")
    assert row.value == cand_len / 10.0
    assert row.passed is passed
    if not passed:
        assert row.message == (
            f"length_ratio {cand_len / 10.0} outside [min_length_ratio 0.5, max_length_ratio 2.0]"
        )


def test_distinct2_gate_fails_for_repetitive_completions():
    texts = ["good good good good"] * 4  # 12 bigrams, 1 distinct
    report = check_gates(_good_comparison(texts=texts), kl=3.0, gates=GATES)
    assert report.failed_names == ["distinct2"]
    assert report.failures == ["distinct2 0.08333 < min_distinct2 0.2"]


def test_candidate_must_beat_the_champion():
    comparison = _good_comparison()  # candidate mean score 2.5
    beaten = check_gates(comparison, kl=3.0, gates=GATES, champion_score=2.0)
    assert _row(beaten, "beats_champion").passed and beaten.passed
    lost = check_gates(comparison, kl=3.0, gates=GATES, champion_score=2.5)  # equal is not better
    assert lost.failed_names == ["beats_champion"]
    assert lost.failures == ["beats_champion 2.5 <= champion score 2.5"]


def test_champion_rule_can_be_switched_off():
    report = check_gates(
        _good_comparison(), kl=3.0, gates=GATES.model_copy(update={"beats_champion": False}), champion_score=99.0
    )
    assert report.passed
    assert "beats_champion" not in [gate.name for gate in report.gates]


def test_report_renders_as_markdown_metrics_tags_and_rich_table():
    report = check_gates(_good_comparison(), kl=14.2, gates=GATES, champion_score=1.0)
    markdown = report.to_markdown()
    assert "## Promotion gates: FAILED" in markdown
    assert "| kl | 14.2 | <= max_kl 10.0 | **FAIL** |" in markdown
    assert "kl 14.2 > max_kl 10.0" in markdown
    metrics = report.as_metrics()
    assert metrics["gate/kl"] == 0.0 and metrics["gate/kl/value"] == 14.2
    assert metrics["gate/win_rate"] == 1.0 and metrics["gate/passed"] == 0.0
    assert report.as_tags() == {"alignflow.gates_passed": "false", "alignflow.gates_failed": "kl"}
    assert report.as_tags(prefix="") == {"gates_passed": "false", "gates_failed": "kl"}
    assert report.to_rich_table().row_count == len(report.gates) == 7


# --- a policy on the held-out prompts ---------------------------------------------------------


def test_the_reward_model_hears_which_evaluation_completions_ended_with_eos_as_in_training(tiny_lm_dir):
    import torch

    from components.config import EvaluationConfig, GenerationConfig
    from components.evaluation.policy import evaluate_policy
    from components.models.loading import load_causal_lm, load_tokenizer

    seen = {}

    def scorer(prompts, completions, ended_with_eos):
        seen["ended"] = list(ended_with_eos)
        return torch.tensor([2.0 if ended else 0.0 for ended in ended_with_eos])

    prompts = ["the film was", "I loved the movie", "the plot is", "it was a"] * 4
    summary, samples, scores = evaluate_policy(
        load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), prompts, scorer,
        GenerationConfig(max_new_tokens=6), EvaluationConfig(bootstrap_samples=10),
    )
    assert seen["ended"] == samples.ended_with_eos and 0 < sum(seen["ended"]) < len(prompts)
    assert scores == [2.0 if ended else 0.0 for ended in samples.ended_with_eos]


def test_the_comparison_table_has_a_row_per_measure_the_candidate_has():
    reference = summarize([0.0, 1.0], [4.0, 6.0], ["a b", "c d"], gold=[0, 1], n_resamples=10)
    candidate = summarize([1.0, 2.0], [5.0, 5.0], ["e f", "g h"], gold=[1, 1], kl=0.75, n_resamples=10)
    rows = comparison_table(reference, candidate)
    assert [row["metric"] for row in rows] == ["mean_score", "mean_length", "distinct2", "gold_positive_share", "kl"]
    assert rows[0] == {"metric": "mean_score", "reference": 0.5, "candidate": 1.5}
    assert rows[-1] == {"metric": "kl", "reference": 0.0, "candidate": 0.75}  # the reference is 0 nats from itself


# --- the judge: a held-out reward model beside the one trained against --------------------------------


def _judged(proxy_gain: float, judge_gain: float, n: int = 200):
    rng = np.random.default_rng(0)
    base, judge_base = rng.normal(size=n), rng.normal(size=n)
    texts = [f"text {i} here" for i in range(n)]
    reference = summarize(base, [5.0] * n, texts, judge_scores=judge_base, kl=0.0)
    candidate = summarize(base + proxy_gain + 0.1 * rng.normal(size=n), [5.0] * n, texts,
                          judge_scores=judge_base + judge_gain + 0.1 * rng.normal(size=n), kl=1.0)
    return compare(reference, candidate, n_resamples=300, seed=0)


def test_a_gain_the_judge_does_not_see_fails_the_judge_gate_while_the_proxy_gates_pass():
    comparison = _judged(proxy_gain=1.0, judge_gain=-0.5)
    assert comparison.score_gain == pytest.approx(1.0, abs=0.05) and comparison.judge_gain == pytest.approx(-0.5, abs=0.05)
    report = gates_module.check_gates(comparison, GatesConfig())
    assert report.failed_names == ["judge_gain_ci_low"]
    assert any("by the reward model 1.0" in note and "by the judge -0.5" in note for note in report.notes)
    assert "judge_gain_ci_low" in report.to_markdown() and comparison.as_metrics()["eval/judge_gain"] < 0
    assert gates_module.check_gates(_judged(proxy_gain=1.0, judge_gain=0.5), GatesConfig()).passed
    assert gates_module.check_gates(comparison, GatesConfig(judge_gain=False)).passed  # off: reported, not gated


def test_without_a_judge_there_is_no_judge_gate():
    reference = summarize([0.0, 1.0], [3, 3], ["a b c", "d e f"])
    candidate = summarize([1.0, 2.0], [3, 3], ["a b c", "d e g"], kl=0.5)
    comparison = compare(reference, candidate, n_resamples=100)
    assert comparison.judge_gain is None and "eval/judge_gain" not in comparison.as_metrics()
    assert "judge_gain_ci_low" not in [gate.name for gate in gates_module.check_gates(comparison, GatesConfig()).gates]
