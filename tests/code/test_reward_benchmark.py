"""The reward benchmark's pure helpers (benchmarks/reward_vs_trl.py, benchmarks/trl_reward_worker.py): timing,
summaries, targets, the report's table and snippet, and how alignflow's settings map onto TRL's RewardConfig.
Nothing here trains a model or runs TRL."""

from __future__ import annotations

import pytest

from benchmarks import reward_vs_trl as bench
from benchmarks import trl_reward_worker
from components.config import REWARD_CONFIG, RewardRunConfig, load_config


def test_timing_warmup_is_ten_steps_or_fewer_for_short_runs():
    assert bench.timing_warmup(600) == 10
    assert bench.timing_warmup(50) == 5
    assert bench.timing_warmup(6) == 1
    assert bench.timing_warmup(2) == 1
    with pytest.raises(ValueError):
        bench.timing_warmup(1)


def test_pairs_per_second_times_from_the_end_of_the_warmup():
    step_ends = [5.0, 6.0, 7.0, 8.0, 9.0]  # the first step slow (lazy initialisation), then 1 s per step
    assert bench.pairs_per_second(step_ends, batch_size=32, warmup=1) == pytest.approx(4 * 32 / 4.0)
    assert bench.pairs_per_second(step_ends, batch_size=32, warmup=2) == pytest.approx(3 * 32 / 3.0)
    with pytest.raises(ValueError):
        bench.pairs_per_second(step_ends, 32, warmup=5)  # nothing left to time
    with pytest.raises(ValueError):
        bench.pairs_per_second(step_ends, 32, warmup=0)


def test_median_pairs_per_second_ignores_a_burst():
    step_ends = [1.0, 2.0, 3.0, 13.0, 14.0, 15.0]  # one 10 s step after the warm-up
    assert bench.pairs_per_second_median(step_ends, 32, warmup=1) == pytest.approx(32.0)
    assert bench.pairs_per_second(step_ends, 32, warmup=1) == pytest.approx(5 * 32 / 14.0)


def test_other_cpu_share():
    # 2 cores, 10 s: the worker used 19 CPU seconds of the 20 busy ones; others 1 of 20 possible
    assert bench.other_cpu_share(20.0, 19.0, 10.0, 2) == pytest.approx(0.05)
    assert bench.other_cpu_share(18.0, 19.0, 10.0, 2) == 0.0  # rounding of the two clocks: never negative


def test_mean_std():
    assert bench.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3, "values": [1.0, 2.0, 3.0]}
    assert bench.mean_std([4.0])["std"] == 0.0


def test_lr_points_pick_start_warmup_middle_and_end():
    lrs = [float(i) for i in range(600)]
    assert list(bench.lr_points(lrs, 30)) == ["0", "1", "29", "30", "300", "599"]
    assert list(bench.lr_points(lrs[:6], 0)) == ["0", "1", "3", "5"]


def run(pps: float, rss: float, accuracy: float) -> dict:
    return {"pairs_per_second": pps, "pairs_per_second_median": pps * 1.1, "peak_rss_mb": rss, "accuracy": accuracy,
            "accuracy_other_reading": accuracy - 0.01, "train_seconds": 19200 / pps, "setup_seconds": 3.0}


def report(alignflow: list[dict], trl: list[dict]) -> dict:
    summary = {"alignflow": bench.summarize(alignflow), "trl": bench.summarize(trl)}
    return {
        "command": "python -m benchmarks.reward_vs_trl", "date": "2025-01-01T00:00:00", "smoke": False,
        "machine": {"cpu": "test CPU", "cores": 2}, "versions": {"trl": "1.16.0", "transformers": "5.24.0", "torch": "2.13.0"},
        "seeds": [0, 1],
        "settings": {"threads": 2, "train_pairs": 5400, "held_out_pairs": 600, "steps": 600, "batch_size": 32,
                     "pairs_trained": 19200, "learning_rate": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.1,
                     "weight_decay": 0.01, "center_rewards_coef": 0.01, "max_grad_norm": 1.0, "timing_warmup": 10},
        "differences": ["EOS differs", "Centring differs"],
        "summary": summary, "targets": bench.targets(summary),
    }


def test_targets_met_and_missed():
    mine = [run(900, 500, 0.90), run(1100, 520, 0.92)]
    theirs = [run(500, 600, 0.91), run(700, 640, 0.91)]
    by_name = {t["target"]: t for t in bench.targets({"alignflow": bench.summarize(mine), "trl": bench.summarize(theirs)})}
    assert by_name["held-out accuracy >= TRL's"]["met"] is True  # 0.91 mean against 0.91
    assert by_name["pairs/s >= TRL's"]["met"] is True
    assert by_name["pairs/s >= TRL's"]["ratio"] == pytest.approx(1000 / 600)
    assert by_name["peak memory <= TRL's"]["met"] is True
    slower = [run(400, 700, 0.85), run(400, 700, 0.86)]
    by_name = {t["target"]: t for t in bench.targets({"alignflow": bench.summarize(slower), "trl": bench.summarize(theirs)})}
    assert [by_name[name]["met"] for name in ("held-out accuracy >= TRL's", "pairs/s >= TRL's", "peak memory <= TRL's")] == [False] * 3
    assert "alignflow 400 ± 0 pairs/s vs TRL 600 ± 141 pairs/s" in by_name["pairs/s >= TRL's"]["measured"]


def test_table_and_markdown():
    r = report([run(1000, 500, 0.90), run(1000, 520, 0.92)], [run(500, 600, 0.91), run(500, 640, 0.91)])
    header, rows = bench.table(r)
    assert len(rows) == 3 and all(len(row) == len(header) for row in rows)
    assert rows[2][2] == "2.00x" and rows[2][5] == "+0.0000"
    text = bench.markdown(r)
    assert text.startswith("| engine |")
    assert "held-out accuracy >= TRL's met (1x)" in text and "pairs/s >= TRL's met (2x)" in text
    assert "What still differs: EOS differs; Centring differs." in text
    assert "19,200 pairs" in text and "2 seeds each" in text
    assert "Why." not in text and "other processes used" not in text
    r["runs"] = {"alignflow": [{"others_cpu_share_during": 0.02}], "trl": [{"others_cpu_share_during": 0.10}]}
    assert "other processes used 6% of the CPUs on average during a run, 10% at most" in bench.markdown(r)
    assert "still disturbed" not in bench.markdown(r)
    r["runs"]["trl"][0].update(disturbed=True, seed=1)
    assert "unreliable: trl seed 1)" in bench.markdown(r)
    assert "Why." in bench.markdown({**r, "analysis": "Why."})


def test_differences_follow_the_settings():
    text = " ".join(bench.differences({"warmup_steps": 30, "pairs_trained": 19200, "train_pairs": 5400,
                                       "center_rewards_coef": 0.01}))
    assert "3.6 epochs" in text and "step/30" in text and "0.01 x mean over pairs" in text
    assert "no warm-up" in " ".join(bench.differences({"warmup_steps": 0, "pairs_trained": 192, "train_pairs": 5400,
                                                        "center_rewards_coef": 0.01}))


def test_trl_settings_follow_alignflows_config():
    config = load_config(REWARD_CONFIG, ["training.max_steps=600"], schema=RewardRunConfig)
    training = config.training
    spec = {"steps": 600, "seed": 3, "max_length": config.model.max_length,
            "warmup_steps": round(600 * training.warmup_ratio), "training": training.model_dump(mode="json")}
    settings = trl_reward_worker.trl_settings(spec)
    assert settings["max_steps"] == 600 and settings["warmup_steps"] == 30
    assert settings["per_device_train_batch_size"] == training.batch_size == 32
    assert settings["gradient_accumulation_steps"] == 1
    assert settings["learning_rate"] == training.learning_rate == 1e-3
    assert settings["lr_scheduler_type"] == "cosine_with_min_lr"
    assert settings["lr_scheduler_kwargs"] == {"min_lr_rate": training.min_lr_ratio}
    assert settings["weight_decay"] == training.weight_decay
    assert settings["center_rewards_coefficient"] == training.center_rewards_coef == 0.01
    assert settings["max_grad_norm"] == training.max_grad_norm == 1.0
    assert settings["max_length"] == 128
    assert settings["gradient_checkpointing"] is False and settings["bf16"] is False and settings["use_cpu"] is True
    assert settings["seed"] == settings["data_seed"] == 3
