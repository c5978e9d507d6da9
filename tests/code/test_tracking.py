import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from components import tracking
from components.config import PROJECT_ROOT, RunConfig, TrackingConfig
from components.tracking import PromotionError

MODEL = "tiny-policy"
MD5 = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty SQLite store; creating the schema takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def config(empty_store, tmp_path, monkeypatch) -> RunConfig:
    """A run configuration pointing at a fresh SQLite store in tmp; MLflow's URIs are restored after."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_config = RunConfig(name="test", tracking=TrackingConfig(tracking_uri=uri, experiment="tests", registered_model=MODEL))
    tracking.use_tracking(run_config.tracking)
    yield run_config
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def _register(tiny_lm_dir, gates_passed: bool, **tags):
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(TrackingConfig(experiment="tests"))):
        return tracking.log_policy_model(
            tiny_lm_dir, MODEL, {"gates_passed": gates_passed, **tags}, model_config={"max_new_tokens": 5}
        )


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
    assert params["ppo.learning_rate"] == "1e-05"
    assert params["data.prompt_template"] == "null"
    assert params["ppo.whiten_advantages"] == "true"
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


def test_dataset_digest_longer_than_mlflow_allows_is_refused(config):
    with tracking.start_run(config), pytest.raises(ValueError, match="DVC md5"):
        tracking.log_dataset("prompts", "data/demo/prompts.jsonl", "x" * 40)


def test_training_curves_and_eval_samples_are_run_artifacts(config):
    history = [{"episode": 64 * (i + 1), "objective/scores": 0.1 * i, "objective/kl": 0.5 * i} for i in range(5)]
    samples = [
        {"prompt": "the film", "baseline_completion": "was bad", "candidate_completion": "was great",
         "baseline_score": -1.0, "candidate_score": 2.0},
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
        mlflow.log_metrics({tracking.REWARD_GAIN_METRIC: 0.8, tracking.KL_METRIC: 4.5})
    with tracking.start_run(config):
        pass
    newest, older = tracking.recent_runs("tests", n=5)
    assert newest["stop_reason"] is None and newest["gates_passed"] is None and newest["status"] == "FINISHED"
    assert (older["stop_reason"], older["gates_passed"], older["model_version"]) == ("max_steps", True, "3")
    assert (older["reward_gain"], older["kl"]) == (0.8, 4.5)
    assert tracking.recent_runs("no-such-experiment") == []


# --- the registry -----------------------------------------------------------------------------


def test_registered_champion_generates_text(config, tiny_lm_dir):
    version = _register(tiny_lm_dir, gates_passed=True, base_model="tiny")
    assert str(version.version) == "1" and version.tags["base_model"] == "tiny"
    assert tracking.get_champion(MODEL) is None

    promoted = tracking.promote(MODEL, version.version, user="ci", reason="first model")
    assert str(tracking.get_champion(MODEL).version) == "1"
    assert (promoted.tags["promoted_by"], promoted.tags["promotion_reason"], promoted.tags["forced"]) == ("ci", "first model", "false")
    assert "previous_champion" not in promoted.tags

    output = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(["The film was"])
    assert isinstance(output[0], str) and output[0].startswith("The film was")


def test_a_version_whose_gates_failed_needs_force_and_a_reason(config, tiny_lm_dir):
    good = _register(tiny_lm_dir, gates_passed=True)
    bad = _register(tiny_lm_dir, gates_passed=False)
    tracking.promote(MODEL, good.version)

    with pytest.raises(PromotionError, match="cannot promote tiny-policy version 9"):
        tracking.promote(MODEL, 9)
    with pytest.raises(PromotionError, match="promotion gates failed; pass force=True with a reason"):
        tracking.promote(MODEL, bad.version)
    with pytest.raises(PromotionError, match="needs a reason"):
        tracking.promote(MODEL, bad.version, force=True)
    assert tracking.get_champion(MODEL).version == good.version

    forced = tracking.promote(MODEL, bad.version, force=True, reason="KL gate too strict for this data", user="alice")
    assert tracking.get_champion(MODEL).version == bad.version
    assert forced.tags["forced"] == "true"
    assert forced.tags["promoted_by"] == "alice"
    assert forced.tags["promotion_reason"] == "KL gate too strict for this data"
    assert forced.tags["previous_champion"] == str(good.version)


def test_promote_records_the_gate_result_it_is_given(config, tiny_lm_dir):
    version = _register(tiny_lm_dir, gates_passed="unknown")
    with pytest.raises(PromotionError, match="no gate result"):
        tracking.promote(MODEL, version.version)
    promoted = tracking.promote(MODEL, version.version, passed_gates=True)
    assert promoted.tags["gates_passed"] == "true"


def test_rollback_restores_the_previous_champion(config, tiny_lm_dir):
    first = _register(tiny_lm_dir, gates_passed=True)
    second = _register(tiny_lm_dir, gates_passed=True)
    with pytest.raises(PromotionError, match="no champion to roll back"):
        tracking.rollback(MODEL)
    tracking.promote(MODEL, first.version)
    tracking.promote(MODEL, second.version)
    assert [(v.version, v.aliases) for v in tracking.list_versions(MODEL)] == [(2, ["champion"]), (1, [])]

    restored = tracking.rollback(MODEL, user="bob", reason="regression in prod")
    assert restored.version == first.version == tracking.get_champion(MODEL).version
    assert restored.tags["rolled_back_from"] == str(second.version) and restored.tags["rolled_back_by"] == "bob"
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        tracking.rollback(MODEL)
    assert tracking.list_versions("no-such-model") == []


def test_registry_reference_resolves_to_a_loadable_directory(config, tiny_lm_dir, tmp_path):
    version = _register(tiny_lm_dir, gates_passed=True)
    tracking.promote(MODEL, version.version)
    cache = tmp_path / "registry"

    path = tracking.resolve_model_reference(f"models:/{MODEL}@champion", cache_dir=cache)
    assert Path(path).parent == cache and Path(path).name.startswith(f"{MODEL}-v1-")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("the film was good")["input_ids"] == AutoTokenizer.from_pretrained(tiny_lm_dir)("the film was good")["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), original.state_dict().values()))

    assert tracking.resolve_model_reference(f"models:/{MODEL}/1", cache_dir=cache) == path  # cached per version
    assert tracking.resolve_model_reference("gpt2") == "gpt2"
    assert tracking.resolve_model_reference(str(tiny_lm_dir)) == str(tiny_lm_dir)
    with pytest.raises(tracking.ModelReferenceError, match="cannot resolve"):
        tracking.resolve_model_reference(f"models:/{MODEL}@staging", cache_dir=cache)


def test_same_version_number_in_another_registry_is_not_served_from_the_cache(config, tiny_lm_dir, tmp_path, empty_store):
    from tiny import save_tiny_lm

    cache = tmp_path / "registry"
    _register(tiny_lm_dir, gates_passed=True)
    first = tracking.resolve_model_reference(f"models:/{MODEL}/1", cache_dir=cache)

    other_model = save_tiny_lm(tmp_path / "other-lm", seed=7)
    other_store = tmp_path / "other"
    other_store.mkdir()
    shutil.copy(empty_store, other_store / "mlflow.db")
    tracking.use_tracking(TrackingConfig(tracking_uri=f"sqlite:///{other_store}/mlflow.db", experiment="tests"))
    _register(other_model, gates_passed=True)
    second = tracking.resolve_model_reference(f"models:/{MODEL}/1", cache_dir=cache)

    assert first != second
    loaded = AutoModelForCausalLM.from_pretrained(second).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(other_model).state_dict()
    assert all((loaded[k] == expected[k]).all() for k in expected)
