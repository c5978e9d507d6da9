"""The pipeline end to end, through Prefect's test harness and a temporary MLflow store."""

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from components.config import PROJECT_ROOT
from components.versioning import file_md5
from components.ppo import PPOTrainer
from flows.cli import app
from flows.pipeline import pipeline

MODEL = "alignflow-policy"


def metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_gate_failure_registers_without_promoting_and_champion_stays(demo_data, small_run, tiny_lm_dir, tiny_reward_dir, tracking_uri):
    runner = CliRunner()
    first = pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, "gates.min_reward_gain=100"))
    assert not first.gates_passed and not first.promoted
    assert "< min_reward_gain 100" in first.gate_summary
    client = MlflowClient(tracking_uri)
    version = client.get_model_version(MODEL, first.model_version)
    assert version.tags["gates_passed"] == "false"
    assert "reward_gain" in version.tags["gates_failed"].split(",")
    assert version.tags["data_md5"] == file_md5(PROJECT_ROOT / "data" / "demo" / "prompts.jsonl")
    assert (version.tags["data_name"], version.tags["data_dvc_file"], version.tags["data_versioned"]) == ("prompts", "data.dvc", "true")
    assert not client.get_registered_model(MODEL).aliases

    store = ["--set", f"tracking.tracking_uri={tracking_uri}"]
    refused = runner.invoke(app, ["promote", first.model_version, *store])
    assert refused.exit_code == 2
    assert "its promotion gates failed" in refused.output
    forced = runner.invoke(app, ["promote", first.model_version, "--force", "--reason", "manual check", *store])
    assert forced.exit_code == 0, forced.output
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first.model_version

    second = pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir, "gates.min_reward_gain=100"))
    assert second.model_version == str(int(first.model_version) + 1)
    assert not second.promoted and second.champion_version == first.model_version
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first.model_version

    forced = runner.invoke(app, ["promote", second.model_version, "--force", "--reason", "try it", *store])
    assert forced.exit_code == 0, forced.output
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == second.model_version
    assert champion.tags["previous_champion"] == first.model_version
    assert champion.tags["promotion_reason"] == "try it"
    back = runner.invoke(app, ["rollback", *store])
    assert back.exit_code == 0, back.output
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first.model_version

    listing = runner.invoke(app, ["models", *store])
    assert listing.exit_code == 0 and "champion" in listing.output
    runs = runner.invoke(app, ["runs", *store])
    assert runs.exit_code == 0 and "failed" in runs.output


def test_failed_epoch_is_retried_and_resumes_in_the_same_run(demo_data, small_run, tiny_lm_dir, tiny_reward_dir, tracking_uri, monkeypatch):
    real_step = PPOTrainer.step
    failures = []

    def step_failing_once(self, prompts):
        if self.iteration == 3 and not failures:  # the second iteration of the second epoch
            failures.append(self.iteration)
            raise RuntimeError("injected failure")
        return real_step(self, prompts)

    monkeypatch.setattr(PPOTrainer, "step", step_failing_once)
    result = pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir))
    assert failures == [3]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("alignflow-demo").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    assert metric_steps(client, result.run_id, "objective/scores") == [16, 32, 48, 64]
    assert result.episodes == 64 and result.stop_reason == "max_steps"


def test_demo_pipeline_end_to_end_registers_promotes_and_serves(demo_kit, tmp_path, tracking_uri):
    """The embedded default as `make demo` runs it (only the stores are temporary): the gold-positive
    share rises to at least 85% with the KL within its gate, and every record is checked through MlflowClient."""
    overrides = [f"tracking.tracking_uri={tracking_uri}", f"ppo.checkpoint_dir={tmp_path / 'checkpoints'}"]
    result = pipeline(overrides=overrides)
    assert result.stop_reason == "max_steps" and result.episodes == 5120
    assert result.gates_passed and result.promoted, result.gate_summary
    assert result.baseline["baseline/gold_positive_share"] < 0.5
    # 128 held-out prompts: one standard error of the share is ~0.03 near 0.9; the baseline is ~0.35.
    assert result.candidate["candidate/gold_positive_share"] >= 0.85
    assert result.candidate["candidate/kl"] <= 20.0  # gates.max_kl of configs/demo.yaml

    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["ppo.learning_rate"] == "0.0001"
    assert run.data.params["policy.model"] == "artifacts/demo/instruct"
    assert metric_steps(client, result.run_id, "objective/kl") == list(range(64, 5121, 64))
    for key in ("objective/scores", "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac", "loss/policy",
                "loss/value", "val/explained_variance", "kl_coef", "lr", "eval/reward_gain", "eval/win_rate", "eval/kl",
                "eval/candidate/gold_positive_share", "gate/passed", "data/kept"):
        assert key in run.data.metrics, key
    assert run.data.tags["alignflow.gates_passed"] == "true"
    assert run.data.tags["alignflow.model_version"] == result.model_version
    md5 = file_md5(PROJECT_ROOT / "data" / "demo" / "prompts.jsonl")  # the bytes the run read
    assert run.data.tags["alignflow.data_md5"] == md5
    assert run.data.tags["alignflow.packed_sequences"] == "policy, critic"  # GPT-2 policy, reference and critic
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == md5 and dataset.dataset.name == "prompts"
    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "training_curves.png", "eval_samples.json", "gate_report.md"} <= artifacts

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == result.model_version
    tags = champion.tags
    assert tags["gates_passed"] == "true" and tags["data_md5"] == md5
    assert tags["base_policy"] == "artifacts/demo/instruct" and tags["reward_model"] == "artifacts/demo/reward"
    assert tags["mlflow_run_id"] == result.run_id and tags["prefect_flow_run_id"] and tags["git_commit"]

    mlflow.set_tracking_uri(tracking_uri)
    generator = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    [text] = generator.predict(["The film was"])
    assert isinstance(text, str) and text.strip()
