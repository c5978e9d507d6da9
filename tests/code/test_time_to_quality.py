"""The time-to-quality harness's figures and its algorithm table (benchmarks/, run by hand, not by the tests):
time and episodes to a gold share, curves over seeds, the save budgets, and which algorithms the engine has."""

import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))  # the workers import their helpers as top-level modules

from benchmarks import algorithms, time_to_quality as ttq  # noqa: E402
from benchmarks.measure import Budgets  # noqa: E402
from benchmarks.workloads import Workload  # noqa: E402


def run(points):
    return {"points": [{"episodes": e, "train_seconds": s, "gold": g, "score": g * 2} for e, s, g in points]}


def test_time_to_a_gold_share_is_the_first_save_that_reaches_it():
    points = run([(0, 0.0, 0.3), (64, 10.0, 0.7), (128, 21.0, 0.76), (192, 30.0, 0.74), (256, 41.0, 0.81)])["points"]
    assert ttq.first_reaching(points, 0.75) == {"episodes": 128, "seconds": 21.0}
    assert ttq.first_reaching(points, 0.80) == {"episodes": 256, "seconds": 41.0}
    assert ttq.first_reaching(points, 0.90) is None


def test_time_to_targets_counts_the_seeds_that_reached_and_spreads_over_them():
    runs = [run([(0, 0.0, 0.3), (64, 10.0, 0.76)]), run([(0, 0.0, 0.3), (64, 14.0, 0.70), (128, 30.0, 0.78)]),
            run([(0, 0.0, 0.3), (64, 12.0, 0.5)])]
    row = ttq.time_to_targets(runs)["0.75"]
    assert (row["seeds"], row["reached"]) == (3, 2)
    assert row["seconds"]["mean"] == 20.0 and row["seconds"]["min"] == 10.0 and row["seconds"]["max"] == 30.0
    assert row["episodes"]["per_seed"] == [64, 128]
    assert ttq.time_to_targets(runs)["0.80"]["reached"] == 0
    assert "not reached" == ttq._fmt_reach(ttq.time_to_targets(runs)["0.80"], "seconds", "s")
    assert ttq._fmt_reach(row, "seconds", "s").endswith("2/3 seeds")


def test_a_run_says_nothing_past_its_last_save_and_holds_its_last_policy_before():
    points = run([(0, 0.0, 0.3), (64, 10.0, 0.6), (128, 20.0, 0.8)])["points"]
    assert ttq.gold_at_seconds(points, 0.0)["gold"] == 0.3
    assert ttq.gold_at_seconds(points, 19.9)["gold"] == 0.6
    assert ttq.gold_at_seconds(points, 20.0)["gold"] == 0.8
    assert ttq.gold_at_seconds(points, 20.1) is None


def test_curves_average_over_seeds_by_episodes_and_by_seconds():
    runs = [run([(0, 0.0, 0.3), (64, 10.0, 0.6)]), run([(0, 0.0, 0.3), (64, 20.0, 0.8)])]
    c = ttq.curves(runs, seconds_step=10.0)
    last = c["by_episodes"][-1]
    assert last["episodes"] == 64 and last["gold"] == pytest.approx(0.7) and last["train_seconds"] == 15.0
    assert last["gold_se"] == pytest.approx(0.1)  # sd 0.1414 / sqrt 2
    assert [(p["seconds"], p["seeds"], round(p["gold"], 3)) for p in c["by_seconds"]] == [
        (0.0, 2, 0.3), (10.0, 2, 0.45), (20.0, 1, 0.8)]


def test_budgets_save_once_per_iteration_and_leave_the_saving_time_out(tmp_path):
    saved = []

    def save(path):
        saved.append(path)
        time.sleep(0.05)

    budgets = Budgets([64, 128, 256], str(tmp_path), save)
    budgets.reached(32)
    budgets.reached(64)
    budgets.reached(192)  # passes 128 only
    budgets.reached(200)
    assert [s["budgets"] for s in budgets.saved] == [[64], [128]]
    assert [s["episodes"] for s in budgets.saved] == [64, 192] and len(saved) == 2
    assert budgets.saved[1]["train_seconds"] < 0.05  # the first save's 50 ms are not training time
    with pytest.raises(ValueError):
        Budgets([64], None, save)


def workload(batch=64):
    return Workload("demo", "p", "r", batch_size=batch, mini_batch_size=16, ppo_epochs=4, learning_rate=1e-4,
                    kl_coef=0.2, max_new_tokens=24, max_prompt_tokens=16)


def test_every_algorithm_gets_the_same_episodes_and_the_group_methods_k_per_prompt():
    base = workload()
    assert ttq.engine_workload("alignflow:ppo", base, 4, None, 1) == base
    assert ttq.engine_workload("trl-1.12:ppo", base, 4, None, 1) == base
    for engine in ("alignflow:grpo", "trl-1.16:grpo", "trl-1.16:rloo", "alignflow:reinforce_pp_baseline"):
        group = ttq.engine_workload(engine, base, 4, None, 1)
        assert (group.batch_size, group.samples_per_prompt, group.mini_batch_size, group.ppo_epochs) == (64, 4, 64, 1)
        assert (group.learning_rate, group.kl_coef, group.max_new_tokens) == (1e-4, 0.2, 24)
    assert ttq.engine_workload("alignflow:reinforce_pp", base, 4, 16, 2).samples_per_prompt == 1
    with pytest.raises(ValueError):
        ttq.engine_workload("alignflow:rloo", workload(batch=30), 4, None, 1)


def test_the_algorithm_table_sets_k_for_the_group_methods_and_has_no_critic_for_them():
    assert algorithms.alignflow_settings("ppo", 4) == {"rl": {}, "critic": True}
    rloo = algorithms.alignflow_settings("rloo", 8)
    assert rloo["rl"]["advantage_estimator"] == "rloo" and rloo["rl"]["samples_per_prompt"] == 8 and not rloo["critic"]
    assert algorithms.alignflow_settings("reinforce_pp", 8)["rl"]["samples_per_prompt"] == 1
    assert algorithms.trl_peer("grpo") == ("trl-1.16.0", "GRPOTrainer", {"loss_type": "grpo", "scale_rewards": "group"})
    assert algorithms.trl_peer("reinforce_pp") is None
    assert set(ttq.ENGINES) >= {f"alignflow:{name}" for name in algorithms.ALGORITHMS}


def test_the_worker_reports_which_algorithms_the_engine_has_and_never_stands_one_in():
    import alignflow_worker
    from components.config import RLConfig

    found = alignflow_worker.probe(list(algorithms.ALGORITHMS), k=4)
    assert found["ppo"] == {"available": True, "reason": ""}
    if RLConfig.model_fields["advantage_estimator"].annotation.__args__ == ("gae",):  # an engine with PPO only
        for name in algorithms.ALGORITHMS:
            if name != "ppo":
                assert not found[name]["available"] and "advantage_estimator" in found[name]["reason"]


def test_targets_say_not_measured_for_an_unavailable_algorithm():
    report = {"learning": None, "throughput": None, "engines": ["trl-1.16:rloo"],
              "unavailable": {"alignflow:rloo": "the engine's RLConfig refuses ..."}}
    rows = {t["target"]: t for t in ttq.targets(report)}
    rloo = rows["alignflow rloo gold share >= TRL 1.16's at equal episodes (within one standard error)"]
    assert rloo["met"] is None and "refuses" in rloo["measured"]


def test_trls_reward_tokenizer_keeps_its_special_tokens_when_trl_asks_for_none():
    import trl_group_worker  # imports without TRL: TRL is only imported inside its functions

    from components.demo.bootstrap import train_tokenizer

    tokenizer = train_tokenizer(["the film was good", "the plot was bad"] * 20, vocab_size=300, model_max_length=64)
    plain = tokenizer("the film", add_special_tokens=False)["input_ids"]
    kept = trl_group_worker.keep_special_tokens(tokenizer)
    # what TRL 1.16 calls for a reward model: padding on the right, add_special_tokens=False
    ids = kept(text=["the film"], padding=True, padding_side="right", add_special_tokens=False)["input_ids"][0]
    assert ids == [tokenizer.bos_token_id] + plain
    assert kept.pad_token_id == tokenizer.pad_token_id  # still the same tokenizer otherwise
