import json
import threading

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from components.tracking import runs as tracking
from components.config import PROJECT_ROOT, RunConfig, TrackingConfig

MODEL = "tiny-policy"
MD5 = "0123456789abcdef0123456789abcdef"


# --- where runs go ----------------------------------------------------------------------------


def test_tracking_uri_comes_from_config_then_environment_then_the_project_database(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////x/y.db")) == "sqlite:////x/y.db"
    assert tracking.resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = tracking.resolve_tracking_uri(TrackingConfig())
    assert default == f"sqlite:///{PROJECT_ROOT}/mlruns.db"
    assert tracking.artifact_location(default, "alignflow") == (PROJECT_ROOT / "mlartifacts" / "alignflow").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000", "alignflow") is None


def test_new_experiment_keeps_artifacts_next_to_the_database(config, tmp_path):
    experiment_id = tracking.ensure_experiment(config.tracking)
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "tests").as_uri()
    assert tracking.ensure_experiment(config.tracking) == experiment_id


# --- what a run records -----------------------------------------------------------------------


def test_log_config_records_every_key_as_a_param_and_the_yaml(config):
    config = config.model_copy(update={"name": "x" * 7000})
    with tracking.start_run(config) as run:
        tracking.log_config(config)
    logged = MlflowClient().get_run(run.info.run_id)
    params = logged.data.params
    assert set(params) == set(config.flat())
    assert params["rl.learning_rate"] == "1e-05"
    assert params["data.prompt_template"] == "null"
    assert params["rl.whiten_advantages"] == "true"
    assert params["tracking.experiment"] == "tests"
    assert len(params["name"]) == 6000 and params["name"].endswith("(truncated; see config.yaml)")
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert RunConfig.model_validate(yaml.safe_load(text)) == config


def test_start_run_resumes_an_existing_run(config):
    with tracking.start_run(config) as first:
        tracking.log_stats({"score/mean": 0.1}, step=0)
    with tracking.start_run(config, run_id=first.info.run_id) as resumed:
        tracking.log_stats({"score/mean": 0.3}, step=1)
    assert resumed.info.run_id == first.info.run_id
    history = MlflowClient().get_metric_history(first.info.run_id, "score/mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 0.3)]


@pytest.mark.parametrize("with_rows", [False, True])
def test_dataset_input_digest_is_the_dvc_md5(config, with_rows):
    rows = [{"prompt": "the film was"}, {"prompt": "this movie is"}] if with_rows else None
    with tracking.start_run(config) as run:
        tracking.log_dataset("prompts", "data/demo/prompts.jsonl", MD5, rows=rows, context="training")
    (entry,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert entry.dataset.digest == MD5
    assert entry.dataset.name == "prompts"
    assert json.loads(entry.dataset.source)["uri"].endswith("data/demo/prompts.jsonl")
    assert {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"] == "training"


def test_runs_logging_the_same_new_dataset_at_once_all_get_it(config):
    """Runs of one experiment that log the same dataset at the same moment (two nightly runs started together) race
    for the store's dataset row; each run ends with the dataset as its input, none with a unique-key error."""
    experiment_id = tracking.ensure_experiment(config.tracking)
    barrier, run_ids, errors = threading.Barrier(6), [], []

    def log_at_once():
        with mlflow.start_run(experiment_id=experiment_id) as run:  # MLflow's active run is per thread
            run_ids.append(run.info.run_id)
            barrier.wait()
            try:
                tracking.log_dataset("prompts", "data/demo/prompts.jsonl", MD5, rows=[{"prompt": "the film was"}])
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(error))

    threads = [threading.Thread(target=log_at_once) for _ in range(6)]
    [thread.start() for thread in threads]
    [thread.join(60) for thread in threads]
    assert errors == []
    for run_id in run_ids:
        (entry,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
        assert (entry.dataset.name, entry.dataset.digest) == ("prompts", MD5)


def test_dataset_digest_longer_than_mlflow_allows_is_refused(config):
    with tracking.start_run(config), pytest.raises(ValueError, match="DVC md5"):
        tracking.log_dataset("prompts", "data/demo/prompts.jsonl", "x" * 40)


def test_training_curves_and_eval_samples_are_run_artifacts(config):
    history = [{"episode": 64 * (i + 1), "objective/scores": 0.1 * i, "objective/kl": 0.5 * i} for i in range(5)]
    samples = [
        {"prompt": "the film", "reference_completion": "was bad", "candidate_completion": "was great",
         "reference_score": -1.0, "candidate_score": 2.0},
    ]
    with tracking.start_run(config) as run:
        figure = tracking.log_training_curves(history)
        tracking.log_eval_samples(samples)
        with pytest.raises(KeyError, match="keys present: episode, objective/kl, objective/scores"):
            tracking.log_training_curves(history, score_key="env/reward_mean")
        with pytest.raises(KeyError, match="missing: candidate_score"):
            tracking.log_eval_samples([{k: v for k, v in samples[0].items() if k != "candidate_score"}])
    assert len(figure.axes) == 2
    names = {item.path for item in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "eval_samples.json"} <= names
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval_samples.json"))
    assert table["columns"] == list(tracking.EVAL_SAMPLE_COLUMNS)
    assert table["data"] == [["the film", "was bad", "was great", -1.0, 2.0]]


def test_recent_runs_reads_the_flow_tags_and_metrics(config):
    with tracking.start_run(config):
        mlflow.set_tags({tracking.STOP_REASON_TAG: "max_steps", tracking.GATES_PASSED_TAG: "true",
                         tracking.MODEL_VERSION_TAG: "3"})
        mlflow.log_metrics({tracking.SCORE_GAIN_METRIC: 0.8, tracking.KL_METRIC: 4.5})
    with tracking.start_run(config):
        pass
    newest, older = tracking.recent_runs("tests", n=5)
    assert newest["stop_reason"] is None and newest["gates_passed"] is None and newest["status"] == "FINISHED"
    assert (older["stop_reason"], older["gates_passed"], older["model_version"]) == ("max_steps", True, "3")
    assert (older["score_gain"], older["kl"]) == (0.8, 4.5)
    assert tracking.recent_runs("no-such-experiment") == []


def test_a_resume_compares_what_an_earlier_release_recorded_under_this_releases_names(config):
    recorded = config.model_dump(mode="json")
    recorded["rl"]["target_reward"] = recorded["rl"].pop("target_score")
    recorded["rl"]["target_reward"], recorded["data"]["format"] = 2.0, "preference"
    with tracking.start_run(config) as run:
        mlflow.log_text(yaml.safe_dump(recorded), "config.yaml")
        mlflow.set_tag(tracking.RECORDED_TAG, "true")
    given = config.model_copy(update={"rl": config.rl.model_copy(update={"target_score": 2.0}),
                                      "data": config.data.model_copy(update={"format": "implicit"})})
    resumed = tracking.resumed_config(given, run.info.run_id, "policy", {"rl.target_score", "data.format"})
    assert (resumed.rl.target_score, resumed.data.format) == (2.0, "implicit")


def test_recent_runs_reads_the_score_gain_of_a_run_of_an_earlier_release_by_its_old_name(config):
    with tracking.start_run(config):
        mlflow.log_metrics({"eval/reward_gain": 0.8})
    (run,) = tracking.recent_runs("tests", n=1)
    assert run["score_gain"] == 0.8


# --- written once, whatever a resumed run repeats -----------------------------------------------


def test_history_logs_each_step_once_however_often_it_is_handed_over(config):
    history = [{"iteration": float(i), "episodes": 16.0 * i, "objective/scores": 0.1 * i} for i in (1, 2, 3)]
    with tracking.start_run(config) as run:
        assert tracking.log_history(history[:2]) == 2
        assert tracking.log_history(history) == 1  # a resumed run hands the whole history over again
        assert tracking.log_history(history) == 0
    steps = [(m.step, m.value) for m in MlflowClient().get_metric_history(run.info.run_id, "objective/scores")]
    assert steps == [(16, 0.1), (32, 0.2), (48, pytest.approx(0.3))]


def test_one_off_metrics_dataset_and_samples_are_logged_once(config):
    samples = [{"prompt": "p", "reference_completion": "a", "candidate_completion": "b", "reference_score": 0.0,
                "candidate_score": 1.0}]
    with tracking.start_run(config) as run:
        for _ in range(2):
            tracking.log_metrics_once({"data/kept": 5.0, "eval/reference/mean_score": 0.25})
            tracking.log_dataset("prompts", "data/demo/prompts.jsonl", MD5)
            tracking.log_eval_samples(samples)
    client = MlflowClient()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "data/kept")] == [5.0]
    assert len(client.get_run(run.info.run_id).inputs.dataset_inputs) == 1
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval_samples.json"))
    assert len(table["data"]) == 1


def test_a_recorded_result_is_read_back_and_a_missing_or_torn_one_is_none(config):
    with tracking.start_run(config):
        assert tracking.recorded("evaluations/reference.json") is None
        tracking.record({"scores": [0.5, 1.5]}, "evaluations/reference.json")
        assert tracking.recorded("evaluations/reference.json") == {"scores": [0.5, 1.5]}
        mlflow.log_text('{"scores": [0.5,', "evaluations/candidate.json")  # a write cut short
        assert tracking.recorded("evaluations/candidate.json") is None


def test_resuming_an_unknown_run_names_the_id_and_the_store(config):
    with pytest.raises(tracking.RunNotFound, match=r"--resume 0123abc: the tracking store sqlite:///.*mlflow.db has no run"):
        tracking.start_run(config, run_id="0123abc")
