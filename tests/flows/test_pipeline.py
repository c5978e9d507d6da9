"""The pipeline end to end, through Prefect's test harness and a temporary MLflow store: the demo as `make demo` runs
it (one run, checked by each test below), a gate failure and what a person can do about it, and a failed training
task retried within the same run."""

import mlflow
import pytest
from mlflow import MlflowClient
from support import cli_in_child

from components.tracking import registry
from components.config import PROJECT_ROOT
from components.rl import Trainer
from components.data.versioning import file_md5
from flows.pipeline import pipeline

MODEL = "alignflow-policy"


def metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


# --- the demo, as `make demo` runs it (only the stores are temporary) ---------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-run")
    uri = f"sqlite:///{root}/mlflow.db"
    result = pipeline(overrides=[f"tracking.tracking_uri={uri}", f"checkpoint.dir={root / 'checkpoints'}"])
    client = MlflowClient(uri, registry_uri=uri)
    yield result, client, client.get_run(result.run_id), uri
    mlflow.set_tracking_uri(None)


def test_the_demo_takes_the_gold_share_from_a_third_to_most_within_its_kl_gate(demo):
    result, *_ = demo
    assert result.stop_reason == "total_episodes" and result.episodes == 5120
    assert result.gates.passed and result.promoted, result.gates.summary()
    assert result.reference.gold_positive_share < 0.5
    # 128 held-out prompts: one standard error of the share is ~0.03 near 0.9; the reference is ~0.35.
    assert result.candidate.gold_positive_share >= 0.85
    assert result.candidate.kl <= 20.0  # gates.max_kl of configs/demo.yaml


def test_the_run_records_the_config_and_every_training_step_once(demo):
    result, client, run, _ = demo
    assert run.info.status == "FINISHED" and run.data.tags["alignflow.finished"] == "true"
    assert run.data.params["rl.learning_rate"] == "0.0001" and run.data.params["policy.model"] == "artifacts/demo/instruct"
    assert metric_steps(client, result.run_id, "objective/kl") == list(range(64, 5121, 64))
    for key in ("objective/scores", "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac", "loss/policy",
                "loss/value", "val/explained_variance", "kl_coef", "lr", "eval/score_gain", "eval/win_rate",
                "eval/candidate/kl", "eval/candidate/gold_positive_share", "eval/reference/mean_score", "gate/passed",
                "data/kept"):
        assert key in run.data.metrics, key
    assert metric_steps(client, result.run_id, "eval/candidate/kl") == [0]
    assert run.data.tags["alignflow.gates_passed"] == "true" and run.data.tags["alignflow.algorithm"] == "ppo"
    assert run.data.tags["alignflow.model_version"] == result.model_version
    assert run.data.tags["alignflow.packed_sequences"] == "policy, critic"  # GPT-2 policy, reference and critic


def test_the_run_records_the_bytes_it_read_and_its_artifacts(demo):
    result, client, run, _ = demo
    md5 = file_md5(PROJECT_ROOT / "data" / "demo" / "prompts.jsonl")  # the bytes the run read
    assert run.data.tags["alignflow.data_md5"] == md5 and run.data.tags["alignflow.data_dvc_file"] == "data.dvc"
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == md5 and dataset.dataset.name == "prompts"
    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "training_curves.png", "eval_samples.json", "gate_report.md", "result.json"} <= artifacts
    assert not (PROJECT_ROOT / "checkpoints" / result.run_id).exists()


def test_the_candidate_is_registered_with_its_lineage_and_promoted(demo):
    result, client, _, _ = demo
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == result.model_version
    tags = champion.tags
    assert tags["alignflow.gates_passed"] == "true" and tags["alignflow.data_md5"] == file_md5(PROJECT_ROOT / "data" / "demo" / "prompts.jsonl")
    assert tags["alignflow.base_policy"] == "artifacts/demo/instruct" and tags["alignflow.reward_model"] == "artifacts/demo/reward"
    assert (tags["alignflow.algorithm"], tags["samples_per_prompt"]) == ("ppo", "1")
    assert tags["mlflow_run_id"] == result.run_id and tags["alignflow.prefect_flow_run_id"] and tags["alignflow.git_commit"]
    assert float(tags[registry.SCORE_TAG]) == pytest.approx(result.candidate.mean_score)
    assert float(tags[registry.KL_TAG]) == pytest.approx(result.candidate.kl)


def test_the_champion_generates_through_pyfunc(demo):
    _, _, _, uri = demo
    mlflow.set_tracking_uri(uri)
    generator = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    [text] = generator.predict(["The film was"])
    assert isinstance(text, str) and text.strip()


# --- a gate failure, and what a person can do about it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def failed_twice(demo_data, tiny_lm_dir, tiny_reward_dir, tmp_path_factory):
    """Two runs whose gates fail (an unreachable score gain), the first forced to champion by hand in between."""
    root = tmp_path_factory.mktemp("gate-failures")
    uri = f"sqlite:///{root}/mlflow.db"
    overrides = [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", f"tracking.tracking_uri={uri}",
                 f"checkpoint.dir={root / 'checkpoints'}", "rl.rollout_batch_size=16", "rl.mini_batch_size=8",
                 "rl.update_epochs=2", "rl.total_episodes=64", "checkpoint.every=2", "data.eval_size=32",
                 "generation.max_new_tokens=12", "evaluation.bootstrap_samples=200", "gates.min_score_gain=100"]
    store = ["--set", f"tracking.tracking_uri={uri}"]
    first = pipeline(overrides=overrides)
    refused = cli_in_child(["promote", first.model_version, *store])
    forced = cli_in_child(["promote", first.model_version, "--force", "--reason", "manual check", *store])
    second = pipeline(overrides=overrides)
    yield {"first": first, "second": second, "refused": refused, "forced": forced, "client": MlflowClient(uri, registry_uri=uri), "store": store}
    mlflow.set_tracking_uri(None)


def test_a_failed_gate_registers_the_version_without_promoting_it(failed_twice):
    first, client = failed_twice["first"], failed_twice["client"]
    assert not first.gates.passed and not first.promoted
    assert "< min_score_gain 100" in first.gates.summary()
    version = client.get_model_version(MODEL, first.model_version)
    assert version.tags["alignflow.gates_passed"] == "false" and "score_gain" in version.tags["alignflow.gates_failed"].split(",")


def test_promoting_a_version_whose_gates_failed_needs_force_and_a_reason(failed_twice):
    assert failed_twice["refused"] == 2 and failed_twice["forced"] == 0
    second = failed_twice["second"]
    assert second.model_version == "2" and not second.promoted and second.champion_version == "1"
    champion = failed_twice["client"].get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.tags["promotion_reason"] == "manual check"


def test_the_champion_rolls_back_along_its_chain_and_the_listings_show_it(failed_twice):
    client, store = failed_twice["client"], failed_twice["store"]
    assert cli_in_child(["promote", "2", "--force", "--reason", "try it", *store]) == 0
    assert client.get_model_version_by_alias(MODEL, "champion").tags["previous_champion"] == "1"
    assert cli_in_child(["rollback", *store]) == 0
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert cli_in_child(["models", *store]) == 0 and cli_in_child(["runs", *store]) == 0


# --- a failed training task -------------------------------------------------------------------------------------------


def test_a_failed_training_task_is_retried_and_resumes_in_the_same_run(demo_data, small_run, tiny_lm_dir, tiny_reward_dir,
                                                                     tracking_uri, monkeypatch):
    real = Trainer.run_iteration
    failures = []

    def failing_once(self, prompts):
        if self.iteration == 3 and not failures:  # the second iteration of the second checkpoint's stretch
            failures.append(self.iteration)
            raise RuntimeError("injected failure")
        return real(self, prompts)

    monkeypatch.setattr(Trainer, "run_iteration", failing_once)
    result = pipeline(overrides=small_run(tiny_lm_dir, tiny_reward_dir))
    assert failures == [3]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("alignflow-demo").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    assert metric_steps(client, result.run_id, "objective/scores") == [16, 32, 48, 64]
    assert result.episodes == 64 and result.stop_reason == "total_episodes"
