"""Every algorithm's example config (configs/algorithms/<algorithm>.yaml) through the whole pipeline on the demo kit,
with a short budget: the same gates, registry and promotion; the algorithm in the run's params and tags, on the
registered version, and in `alignflow runs`. One store for the six runs, checked by the tests below."""

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from components.config import PROJECT_ROOT, load_config
from flows.cli import app
from flows.pipeline import pipeline

pytestmark = pytest.mark.slow

ALGORITHMS = ["ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"]
SHORT = ["rl.total_episodes=128", "rl.update_epochs=1", "checkpoint.every=1", "data.eval_size=16", "evaluation.bootstrap_samples=100",
         "generation.max_new_tokens=12"]


@pytest.fixture(scope="module")
def runs(demo_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("algorithms")
    uri = f"sqlite:///{root}/mlflow.db"
    results = {}
    for name in ALGORITHMS:
        config = PROJECT_ROOT / "configs" / "algorithms" / f"{name}.yaml"
        results[name] = pipeline(str(config), overrides=[f"tracking.tracking_uri={uri}",
                                                         f"checkpoint.dir={root / 'checkpoints'}", *SHORT])
    yield results, MlflowClient(uri, registry_uri=uri), uri
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_example_runs_the_pipeline_to_a_registered_version(runs, name):
    results, client, _ = runs
    result = results[name]
    config = load_config(PROJECT_ROOT / "configs" / "algorithms" / f"{name}.yaml")
    assert result.stop_reason == "total_episodes" and result.episodes == 128
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["alignflow.algorithm"] == name
    assert run.data.params["rl.advantage_estimator"] == config.rl.advantage_estimator
    assert run.data.params["rl.samples_per_prompt"] == str(config.rl.samples_per_prompt)
    assert run.data.params["critic.type"] == ("separate" if name == "ppo" else "none")
    version = client.get_model_version("alignflow-policy", result.model_version)
    assert version.tags["alignflow.algorithm"] == name and version.tags["alignflow.gates_passed"] in ("true", "false")
    # two iterations of 64 episodes (completions) each, every one logged once
    assert [m.step for m in client.get_metric_history(result.run_id, "objective/scores")] == [64, 128]
    metrics = run.data.metrics
    assert ("loss/value" in metrics) == (name == "ppo")  # a critic-free run trains and logs no value model
    assert ("group/frac_score_zero_std" in metrics) == (config.rl.samples_per_prompt > 1)
    assert ("loss/kl" in metrics) == (config.rl.kl_placement == "loss")


def test_alignflow_runs_shows_each_algorithm(runs):
    results, _, uri = runs
    shown = CliRunner().invoke(app, ["runs", "--set", f"tracking.tracking_uri={uri}", "-n", "10"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    lines = {line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") > 3}
    for name, result in results.items():
        assert name in lines[result.run_id[:12]], (name, shown.output)
