"""The reward-model stage end to end: the demo's preference pairs in, a gated, registered, promoted reward model out;
a second, worse run kept from the alias; promote and rollback by hand; a policy trained against the reward-model
champion carries its lineage (a run killed at each crash point: test_reward_crash_points.py).

One demo-size stage run (600 steps, ~25 s) is shared by the tests that check it; the others are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from support import alignflow, one_thread  # noqa: F401 - one intra-op thread, as in the children

from components.config import PROJECT_ROOT, PreferenceDataConfig
from components.data.versioning import dataset_version

MODEL = "stage-reward"
POLICY = "stage-policy"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reward-stage")


def stage_overrides(store: Path, *extra: str) -> list[str]:
    return [f"tracking.tracking_uri=sqlite:///{store}/mlflow.db", f"tracking.registered_model={MODEL}",
            "tracking.experiment=reward-stage", f"checkpoint.dir={store}/checkpoints", "evaluation.bootstrap_samples=300",
            *extra]


def run_stage(*overrides: str):
    from flows.reward_pipeline import reward_pipeline

    try:
        return reward_pipeline(None, list(overrides))
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def first(demo_kit, store):
    """The demo's reward stage as configs/reward.yaml has it: 600 steps of 32 pairs from the demo instruct model."""
    return run_stage(*stage_overrides(store, "checkpoint.keep=true"))


@pytest.fixture(scope="module")
def second(first, store):
    """A short second run: worse than the champion on the same held-out pairs, so kept from the alias."""
    return run_stage(*stage_overrides(store, "training.max_steps=30"))


def client(store: Path) -> MlflowClient:
    uri = f"sqlite:///{store}/mlflow.db"
    return MlflowClient(uri, registry_uri=uri)


def test_the_demo_reward_model_is_accurate_on_held_out_pairs_and_promoted(first):
    evaluation = first.evaluation
    assert evaluation.n == 600 and first.steps == 600 and first.pairs_seen == 600 * 32
    # Against the truth (the demo's gold scorer); the labels are noisy by design (10% flipped): see configs/reward.yaml.
    assert evaluation.gold_accuracy >= 0.85, evaluation
    assert evaluation.accuracy >= 0.75 and evaluation.accuracy_ci[0] > 0.5
    assert first.gates.passed and first.promoted and first.model_version == "1" and first.champion_version is None
    assert len(evaluation.by_length) == 4 and sum(b["n"] for b in evaluation.by_length) == 600


def test_a_version_carries_its_data_base_model_and_evaluation(first, store):
    version = client(store).get_model_version(MODEL, first.model_version)
    tags = version.tags
    pinned = dataset_version(PreferenceDataConfig(), PROJECT_ROOT)
    assert (tags["alignflow.data_md5"], tags["alignflow.data_dvc_file"], tags["alignflow.data_versioned"]) == (pinned.md5, "data.dvc", "true")
    assert tags["alignflow.base_model"] == "artifacts/demo/instruct"  # as configured (configs/reward.yaml)
    assert float(tags["eval/accuracy"]) == pytest.approx(first.evaluation.accuracy)
    assert float(tags["eval/accuracy_ci_low"]) == pytest.approx(first.evaluation.accuracy_ci[0])
    assert tags["alignflow.gates_passed"] == "true" and tags["alignflow.stage"] == "reward" and int(tags["pairs_held_out"]) == 600
    assert str(client(store).get_model_version_by_alias(MODEL, "champion").version) == "1"
    run = client(store).get_run(first.run_id)
    assert (run.data.tags["alignflow.data_md5"], run.data.tags["alignflow.data_dvc_file"]) == (pinned.md5, "data.dvc")
    assert run.data.metrics["data/pairs_total"] == 6000 and run.data.metrics["eval/candidate/accuracy"] == first.evaluation.accuracy
    assert run.data.params["training.max_steps"] == "600"
    artifacts = {a.path for folder in (None, "plots") for a in client(store).list_artifacts(first.run_id, folder)}
    assert {"plots/score_distributions.png", "plots/reliability.png", "plots/training_curves.png", "gate_report.md",
            "data_report.json", "result.json"} <= artifacts
    steps = client(store).get_metric_history(first.run_id, "train/loss")
    assert len(steps) == 600 and steps[-1].step == 600 * 32  # every step once, at its pair count
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == pinned.md5


def test_the_logged_reward_model_loads_and_scores_as_the_run_did(first, store):
    from components.models.uris import resolve_model_uri
    from components.rl.reward import RewardScorer
    from components.config import RewardConfig

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{store}/mlflow.db")
    try:
        path = resolve_model_uri(f"models:/{MODEL}@champion", store / "cache")
    finally:
        mlflow.set_tracking_uri(None)
    scorer = RewardScorer.from_config(RewardConfig(model=path, max_length=128, append_eos=False))
    good, bad = scorer(["Overall, this picture was"] * 2, [" brilliant and the opening scene was fantastic.", " dull."])
    assert good > bad


def test_a_worse_run_is_registered_but_kept_from_the_alias(second, first, store):
    assert second.champion_version == "1" and second.champion_accuracy == pytest.approx(first.evaluation.accuracy)
    assert not second.gates.passed and "beats_champion" in second.gates.failed_names and not second.promoted
    assert str(client(store).get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert client(store).get_model_version(MODEL, second.model_version).tags["alignflow.gates_passed"] == "false"


def test_promote_and_rollback_by_hand(second, store):
    sets = [arg for override in stage_overrides(store) for arg in ("--set", override)]
    refused = alignflow(["reward", "promote", second.model_version, *sets])
    assert refused.returncode == 2 and "gates failed" in refused.stderr and "Traceback" not in refused.stderr
    forced = alignflow(["reward", "promote", second.model_version, "--force", "--reason", "test", *sets])
    assert forced.returncode == 0, forced.stderr
    assert str(client(store).get_model_version_by_alias(MODEL, "champion").version) == second.model_version
    back = alignflow(["reward", "rollback", "--reason", "test", *sets])
    assert back.returncode == 0 and "back on version 1" in back.stdout
    listed = alignflow(["reward", "models", *sets])
    assert listed.returncode == 0 and "champion" in listed.stdout and "preferences" in listed.stdout


@pytest.fixture(scope="module")
def policy_run(second, store, tiny_lm_dir):
    """A short policy run against models:/stage-reward@champion (version 1)."""
    from flows.pipeline import pipeline

    client(store)  # the stage's store
    overrides = [f"policy.model={tiny_lm_dir}", f"reward.model=models:/{MODEL}@champion", "reward.max_length=64",
                 f"judge.model=models:/{MODEL}/{second.model_version}", "judge.max_length=64",
                 f"tracking.tracking_uri=sqlite:///{store}/mlflow.db", f"tracking.registered_model={POLICY}",
                 "tracking.experiment=stage-policy", f"checkpoint.dir={store}/policy-checkpoints", "critic.type=shared",
                 "rl.rollout_batch_size=16", "rl.mini_batch_size=8", "rl.update_epochs=1", "rl.total_episodes=32",
                 "checkpoint.every=2", "data.eval_size=16", "generation.max_new_tokens=8", "evaluation.bootstrap_samples=100"]
    try:
        return pipeline(None, overrides)
    finally:
        mlflow.set_tracking_uri(None)


def test_a_policy_records_the_reward_model_version_and_its_data(policy_run, first, store):
    reward_tags = client(store).get_model_version(MODEL, "1").tags
    tags = client(store).get_model_version(POLICY, policy_run.model_version).tags
    assert tags["alignflow.reward_model"] == f"models:/{MODEL}/1" and tags["alignflow.reward_model_version"] == "1"
    assert tags["alignflow.reward_data_md5"] == reward_tags["alignflow.data_md5"] and tags["alignflow.reward_model_run_id"] == first.run_id
    run_tags = client(store).get_run(policy_run.run_id).data.tags
    assert run_tags["alignflow.reward_model"] == f"models:/{MODEL}/1"
    assert json.loads(run_tags["alignflow.pinned_models"]) == {"reward.model": f"models:/{MODEL}/1"}
    assert client(store).get_run(policy_run.run_id).data.params["reward.model"] == f"models:/{MODEL}@champion"
    # The judge scored both evaluations: its gain is gated and reported beside the reward model's.
    metrics = client(store).get_run(policy_run.run_id).data.metrics
    assert {"eval/judge_gain", "eval/candidate/judge_mean_score", "eval/reference/judge_mean_score"} <= set(metrics)
    assert "judge_gain_ci_low" in [gate.name for gate in policy_run.gates.gates]
    assert any("by the judge" in note for note in policy_run.gates.notes) and tags["judge_model"] == f"models:/{MODEL}/2"
    listed = alignflow(["models", "--set", f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
                        "--set", f"tracking.registered_model={POLICY}"])
    assert listed.returncode == 0 and f"{MODEL}/1" in listed.stdout and reward_tags["alignflow.data_md5"][:8] in listed.stdout


def test_a_reward_model_promoted_mid_run_does_not_change_a_resumed_run(policy_run, second, store):
    from components.config import load_config
    from flows.tasks import pin_models

    config = load_config(None, [f"reward.model=models:/{MODEL}@champion", f"tracking.tracking_uri=sqlite:///{store}/mlflow.db"])
    mlflow_client = client(store)
    mlflow_client.set_registered_model_alias(MODEL, "champion", second.model_version)  # promoted after the run started
    try:
        assert pin_models(config, policy_run.run_id).reward.model == f"models:/{MODEL}/1"  # the run's own pin
        assert pin_models(config, None).reward.model == f"models:/{MODEL}/{second.model_version}"  # a new run's
    finally:
        mlflow_client.set_registered_model_alias(MODEL, "champion", "1")
        mlflow.set_tracking_uri(None)


def test_an_unreadable_preference_file_fails_naming_the_file_and_line(demo_kit, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": \n')
    result = alignflow(["reward", "run", "--set", f"data.source={bad}", "--set", "data.check_dvc=false",
                        *[arg for o in stage_overrides(tmp_path) for arg in ("--set", o)]])
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "Traceback" not in result.stderr

