"""A user's own data, end to end: the example configurations run on their fixtures, and a new file goes from
`dvc add` to a run that records its own md5, found again by `alignflow runs` and `alignflow models`."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from io import StringIO

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from support import alignflow

from components.config import PROJECT_ROOT, load_config
from components.data.versioning import file_md5
from flows.pipeline import pipeline

pytestmark = pytest.mark.slow

EXAMPLES = sorted((PROJECT_ROOT / "configs" / "examples").glob("*.yaml"))
SHORT = ["rl.total_episodes=16", "rl.rollout_batch_size=8", "rl.mini_batch_size=4", "checkpoint.every=2",
         "evaluation.bootstrap_samples=50", "generation.max_new_tokens=12"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_config_runs_end_to_end_on_its_fixture(example, demo_kit, tracking_uri, tmp_path):
    result = pipeline(config_path=str(example),
                      overrides=[f"tracking.tracking_uri={tracking_uri}", f"checkpoint.dir={tmp_path}", *SHORT])
    config = load_config(example)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.model_version == "1"
    assert run.data.tags["alignflow.data_versioned"] == "false"  # fixtures are committed, not DVC-tracked
    assert client.get_model_version(config.tracking.registered_model, "1").tags["alignflow.data_name"] == run.data.tags["alignflow.data_name"]
    mlflow.set_tracking_uri(tracking_uri)
    samples = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/eval_samples.json"))
    prompts = [row[0] for row in samples["data"]]
    if config.data.format != "text":  # conversations, as the policy read them: a transcript awaiting the assistant
        assert all(p.rstrip().endswith("Assistant:") and "Human:" in p for p in prompts)


def test_the_prompt_a_sample_shows_is_the_one_the_model_read_after_shortening(demo_kit, tracking_uri, tmp_path):
    example = PROJECT_ROOT / "configs" / "examples" / "hh-rlhf-preference.yaml"
    result = pipeline(config_path=str(example), overrides=[
        f"tracking.tracking_uri={tracking_uri}", f"checkpoint.dir={tmp_path}", *SHORT,
        "generation.max_prompt_tokens=40", "evaluation.num_samples_logged=6"])
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["data/truncated_prompt"] >= 1
    mlflow.set_tracking_uri(tracking_uri)
    samples = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/eval_samples.json"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_kit.instruct)
    for prompt in (row[0] for row in samples["data"]):
        assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 40  # what it read, <bos> included


def test_the_own_data_template_has_no_demo_settings_and_validates_once_filled():
    config = load_config(PROJECT_ROOT / "configs" / "own-data.yaml")
    written = yaml.safe_load((PROJECT_ROOT / "configs" / "own-data.yaml").read_text())
    assert not [v for v in _values(written) if "demo" in str(v)]
    assert config.evaluation.gold_scorer is None and config.tracking.experiment != "alignflow-demo"
    assert config.data.check_dvc and "YOUR" in config.data.source


def _values(tree):
    for value in tree.values():
        yield from _values(value) if isinstance(value, dict) else [value]


def test_a_users_new_file_goes_from_dvc_add_to_a_run_that_records_its_own_md5(demo_kit, tmp_path):
    """The path of the README's 'Your own data', through the CLI, in a project of the user's own (a copy of this
    checkout's code, with git and DVC)."""
    from prefect.settings import PREFECT_API_URL

    project = tmp_path / "project"
    for item in ("components", "flows", "configs", "pyproject.toml", ".dvcignore", "data.dvc"):
        source = PROJECT_ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / item)
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    (project / "data").mkdir()
    git = lambda *args: subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "the project")

    data = project / "data" / "reviews.jsonl.gz"
    with gzip.open(data, "wt") as handle:
        handle.write("".join(json.dumps({"prompt": f"The {genre} I saw last {day} was"}) + "\n"
                             for genre in ("thriller", "comedy", "western", "drama", "musical", "documentary")
                             for day in ("night", "week", "month", "year")))
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "own-data.yaml").read_text())
    config["data"].update(source="data/reviews.jsonl.gz", eval_size=8)
    config["policy"].update(model=str(demo_kit.instruct), use_chat_template=False)
    config["reward"].update(model=str(demo_kit.reward), max_length=64)
    config["generation"].update(max_new_tokens=12, max_prompt_tokens=16)
    config["rl"].update(rollout_batch_size=8, mini_batch_size=4, total_episodes=16, learning_rate=1e-4)
    (project / "configs" / "mine.yaml").write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(project), "PREFECT_API_URL": PREFECT_API_URL.value(), "ALIGNFLOW_LOG_DIR": str(tmp_path / "logs")}
    mine = ["--config", str(project / "configs" / "mine.yaml")]

    refused = alignflow(["run", *mine], env=env)
    assert refused.returncode == 2
    assert "data/reviews.jsonl.gz is not tracked by DVC. Version it: `dvc add data/reviews.jsonl.gz`" in refused.stderr

    subprocess.run([sys.executable, "-m", "dvc", "add", "data/reviews.jsonl.gz"], cwd=project, check=True, capture_output=True)
    git("add", "data/reviews.jsonl.gz.dvc", "data/.gitignore")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "reviews v1")

    done = alignflow(["run", *mine], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    md5 = file_md5(data)
    client = MlflowClient(f"sqlite:///{project}/mlruns.db", registry_uri=f"sqlite:///{project}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("my-alignment").experiment_id])
    assert run.data.tags["alignflow.data_md5"] == md5 and run.data.tags["alignflow.data_dvc_file"] == "data/reviews.jsonl.gz.dvc"
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("reviews", md5)
    assert client.get_model_version("my-alignment-policy", "1").tags["alignflow.data_md5"] == md5

    listed = alignflow(["runs", *mine], env=env)
    assert listed.returncode == 0 and run.info.run_id[:12] in listed.stdout and "my-alignment" in listed.stdout
    everywhere = alignflow(["runs"], env=env)  # no config: every experiment of the store, said so
    assert "every experiment" in everywhere.stdout and run.info.run_id[:12] in everywhere.stdout
    models = alignflow(["models"], env=env)
    assert "my-alignment-policy" in models.stdout and f"reviews {md5[:8]}" in models.stdout


def test_progress_in_a_log_is_a_line_per_stage_not_a_stream_of_updates():
    from rich.console import Console

    from components.rl.progress import ProgressBar

    log = StringIO()
    with ProgressBar(total_episodes=640, console=Console(file=log, width=100)) as bar:
        for step in range(1, 11):
            bar({"episodes": 64 * step, "objective/scores": 0.1 * step, "objective/kl": 0.01 * step})
    assert len(log.getvalue().splitlines()) <= 1


def test_the_demo_bootstrap_logs_a_line_per_stage_when_its_output_is_not_a_terminal(tmp_path, demo_kit, capfd):
    from components.demo.bootstrap import BootstrapSettings, bootstrap

    settings = BootstrapSettings(lm_steps=40, reward_steps=40, eval_samples=16)  # progress on, as the CLI has it
    bootstrap(demo_kit.data_dir, tmp_path / "models", settings)
    output = capfd.readouterr()
    lines = (output.out + output.err).splitlines()
    assert any("instruct model" in line for line in lines) and any("reward model" in line for line in lines)
    assert len(lines) <= 12, lines[:20]  # not a progress update per step
