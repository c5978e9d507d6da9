"""No secret in what a run records: URL credentials and secret-named keys are kept out of params, config.yaml,
Prefect parameters and logs, and a secret in plain text warns naming the variable to use instead."""

import io
import logging
import os

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from pydantic import Field
from typer.testing import CliRunner

from components.security import secrets

from components.tracking import runs as tracking
from components.config import ConfigError, RunConfig, Section, load_config
from components.security.secrets import PlaintextSecretWarning, SecretInParameters

PASSWORD = "s3cr3t-Pa55word"
URI = f"http://alice:{PASSWORD}@127.0.0.1:5000"


@pytest.fixture(autouse=True)
def no_credentials_here(monkeypatch):
    """None of these variables set, and none left behind (loading a configuration may set MLflow's)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "ALIGNFLOW_LABELSTUDIO_API_TOKEN"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


class LabelStudio(Section):
    url: str | None = Field(None, description="Label Studio's address.")
    api_token: str | None = Field(None, description="Label Studio's API token (a secret).")


class WithLabelStudio(RunConfig):
    """The run configuration with a section holding a token, as a Label Studio integration would add."""

    labelstudio: LabelStudio = Field(default_factory=LabelStudio)


def test_secret_keys_are_told_by_a_word_of_their_name():
    for key in ("labelstudio.api_token", "x.token", "x.password", "x.db_passwd", "x.client_secret", "x.api_key", "x.apikey",
                "x.credentials", "x.hf-token"):
        assert secrets.is_secret_key(key), key
    for key in ("generation.max_new_tokens", "generation.max_prompt_tokens", "tracking.tracking_uri", "policy.model",
                "x.keyword", "x.secretary_name"):
        assert not secrets.is_secret_key(key), key
    assert secrets.secret_fields(RunConfig) == []  # no secret key in today's configuration
    assert secrets.secret_fields(WithLabelStudio) == ["labelstudio.api_token"]
    assert secrets.env_var_for("labelstudio.api_token") == "ALIGNFLOW_LABELSTUDIO_API_TOKEN"


def test_urls_lose_their_credentials_in_records_and_text():
    assert secrets.split_uri_credentials("http://us%40er:p%3Ass@[::1]:5000/x?y=1") == ("http://[::1]:5000/x?y=1", "us@er", "p:ss")
    assert secrets.split_uri_credentials("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)
    text = f"API request to {URI}/api/2.0 failed; postgresql+asyncpg://pg:pw@db:5432/x and s3://bucket/key"
    assert secrets.redact_text(text) == ("API request to http://***@127.0.0.1:5000/api/2.0 failed; "
                                         "postgresql+asyncpg://***@db:5432/x and s3://bucket/key")
    tree = {"data": {"source": "https://u:p4ss@host/prompts.jsonl", "eval_size": 3},
            "labelstudio": {"api_token": "tok-123", "url": None}, "generation": {"max_new_tokens": 24}}
    assert secrets.redact_tree(tree) == {"data": {"source": "https://***@host/prompts.jsonl", "eval_size": 3},
                                         "labelstudio": {"api_token": "***", "url": None}, "generation": {"max_new_tokens": 24}}
    assert secrets.redacted_params({"labelstudio.api_token": "tok-123", "labelstudio.url": None, "rl.total_episodes": 3}) == \
        {"labelstudio.api_token": "***", "labelstudio.url": None, "rl.total_episodes": 3}


def test_a_tracking_uri_with_credentials_warns_and_hands_them_to_mlflows_variables():
    with pytest.warns(PlaintextSecretWarning, match="tracking.tracking_uri holds credentials.*MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"):
        config = load_config(None, [f"tracking.tracking_uri={URI}"])
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD)
    assert PASSWORD not in config.to_yaml() and PASSWORD not in str(config.flat())


def test_a_configuration_error_does_not_repeat_the_secret():
    with pytest.raises(ConfigError) as error, pytest.warns(PlaintextSecretWarning):
        load_config(None, [f"tracking.tracking_uri={URI}", "rl.clip_range=-1"])
    assert "rl.clip_range" in str(error.value) and PASSWORD not in str(error.value)


def test_a_secret_key_comes_from_its_variable_and_is_recorded_as_stars(monkeypatch):
    tree = {"labelstudio": {"url": "http://ls:8080"}}
    monkeypatch.setenv("ALIGNFLOW_LABELSTUDIO_API_TOKEN", "tok-from-env")
    secrets.prepare_tree(tree, WithLabelStudio)
    config = WithLabelStudio.model_validate(tree)
    assert config.labelstudio.api_token == "tok-from-env"
    assert yaml.safe_load(secrets.redacted_yaml(config))["labelstudio"] == {"url": "http://ls:8080", "api_token": "***"}
    plain = {"labelstudio": {"api_token": "tok-in-the-file"}}
    with pytest.warns(PlaintextSecretWarning, match="labelstudio.api_token holds a secret in plain text.*ALIGNFLOW_LABELSTUDIO_API_TOKEN"):
        secrets.prepare_tree(plain, WithLabelStudio)
    assert plain["labelstudio"]["api_token"] == "tok-in-the-file"  # the file's value wins; the variable fills a gap


def test_log_config_records_no_secret(tmp_path):
    config = WithLabelStudio(labelstudio=LabelStudio(api_token="tok-123"), data={"source": "https://u:p4ss@host/p.jsonl"},
                             tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "secrets"})
    try:
        with tracking.start_run(config) as run:
            tracking.log_config(config)
        logged = MlflowClient().get_run(run.info.run_id).data.params
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    finally:
        mlflow.set_tracking_uri(None)
    assert logged["labelstudio.api_token"] == "***" and logged["data.source"] == "https://***@host/p.jsonl"
    assert "tok-123" not in text and "p4ss" not in text and yaml.safe_load(text)["labelstudio"]["api_token"] == "***"


def test_overrides_for_prefect_parameters_lose_their_secrets():
    clean, moved = secrets.scrub_overrides([f"tracking.tracking_uri={URI}", "rl.total_episodes=3", "labelstudio.api_token=tok"])
    assert clean == ["tracking.tracking_uri=http://127.0.0.1:5000", "rl.total_episodes=3"]
    assert moved == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                     "ALIGNFLOW_LABELSTUDIO_API_TOKEN": "tok"}
    with pytest.raises(SecretInParameters, match="--set tracking.tracking_uri holds credentials.*MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        secrets.scrub_overrides([f"tracking.tracking_uri={URI}"], refuse=True)
    with pytest.raises(SecretInParameters, match="--set labelstudio.api_token is a secret.*ALIGNFLOW_LABELSTUDIO_API_TOKEN"):
        secrets.scrub_overrides(["labelstudio.api_token=tok"], refuse=True)
    with pytest.raises(SecretInParameters, match="--set data.source: the URL holds credentials"):
        secrets.scrub_overrides(["data.source=https://u:p4ss@host/p.jsonl"])
    assert secrets.scrub_overrides(["tracking.tracking_uri=http://127.0.0.1:5000"], refuse=True)[0] == [
        "tracking.tracking_uri=http://127.0.0.1:5000"]


@pytest.mark.parametrize("command", [["run", "--remote", "nightly"], ["deploy", "--name", "nightly"]])
def test_the_cli_never_sends_a_credential_to_a_worker_as_a_parameter(command):
    from flows.cli import app

    result = CliRunner().invoke(app, [*command, "--set", f"tracking.tracking_uri={URI}"])
    assert result.exit_code == 2, result.output
    assert "--set tracking.tracking_uri holds credentials" in result.output and "MLFLOW_TRACKING_PASSWORD" in result.output
    assert PASSWORD not in result.output and "Traceback" not in result.output


def test_config_show_prints_no_secret():
    from flows.cli import app

    result = CliRunner().invoke(app, ["config", "show", "--set", f"tracking.tracking_uri={URI}"])
    assert result.exit_code == 0, result.output
    assert "tracking_uri: http://127.0.0.1:5000" in result.output and PASSWORD not in result.output
    assert "warning: tracking.tracking_uri holds credentials" in result.output


def test_log_records_are_redacted():
    logger = logging.getLogger("alignflow.test_secrets")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        secrets.remember("tok-remembered")
        secrets.install_log_redaction()
        logger.warning("connecting to %s with tok-remembered", URI)
        try:
            raise RuntimeError(f"failed at {URI}")
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "http://***@127.0.0.1:5000 with ***" in written and "failed at http://***@127.0.0.1:5000" in written
    assert PASSWORD not in written and "tok-remembered" not in written


# --- a password with '@', URLs read as paths, exceptions, Prefect, the terminal ---------------------------------

AT_PASSWORD = "p@ss@w0rd"


@pytest.mark.parametrize("uri", [f"http://alice:{AT_PASSWORD}@127.0.0.1:5000", "http://alice:p%40ss%40w0rd@127.0.0.1:5000"])
def test_a_password_holding_at_signs_is_redacted_whole(uri):
    """The userinfo ends at the last '@' before the host (as urllib reads it): nothing of the password shows."""
    assert secrets.redact_uri(uri) == "http://***@127.0.0.1:5000"
    assert secrets.redact_text(f"MLflow run 1 at {uri}/#/experiments/1, then user@example.org") == \
        "MLflow run 1 at http://***@127.0.0.1:5000/#/experiments/1, then user@example.org"
    assert secrets.split_uri_credentials(uri) == ("http://127.0.0.1:5000", "alice", AT_PASSWORD)
    assert secrets.scrub_overrides([f"tracking.tracking_uri={uri}"])[1]["MLFLOW_TRACKING_PASSWORD"] == AT_PASSWORD
    assert secrets.redact_uri(f"{uri}/api?next=a@b") == "http://***@127.0.0.1:5000/api?next=a@b"


def test_a_url_read_as_a_path_is_redacted_and_registry_references_are_left_alone():
    """`Path("https://u:p@h/x")` prints `https:/u:p@h/x`, as a message naming a missing file does; `models:/NAME@ALIAS`
    holds no credentials."""
    assert secrets.redact_uri("not found: /work/https:/user:tok-9@127.0.0.1:8000/prompts.jsonl") == \
        "not found: /work/https:/***@127.0.0.1:8000/prompts.jsonl"
    for text in ("models:/alignflow-policy@champion", "runs:/0123/model", "s3://bucket/key@v2", "a@b.org"):
        assert secrets.redact_uri(text) == text


def test_the_password_of_mlflow_tracking_uri_is_redacted_from_what_the_process_logs(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:Env%40Passw0rd@127.0.0.1:5000")
    load_config(None, [])
    assert secrets.redact_text("401 for Env@Passw0rd and Env%40Passw0rd") == "401 for *** and ***"


def test_an_exception_is_redacted_in_place_with_the_ones_it_was_raised_from():
    try:
        try:
            open(f"/nowhere/https:/u:{PASSWORD}@h/p.jsonl")
        except OSError as missing:
            raise RuntimeError(f"cannot read {URI}/p.jsonl", [f"tried {URI}"], 3) from missing
    except RuntimeError as error:
        raised = error
    cause = raised.__cause__
    secrets.redact_exception(raised)
    assert raised.args == ("cannot read http://***@127.0.0.1:5000/p.jsonl", ["tried http://***@127.0.0.1:5000"], 3)
    assert PASSWORD not in str(cause) and cause.filename == "/nowhere/https:/***@h/p.jsonl" and cause.errno == 2
    assert raised.__cause__ is cause and isinstance(cause, FileNotFoundError)  # the same objects, their words changed


def test_prefects_run_engines_redact_what_a_task_or_flow_raises_before_recording_it():
    """Each engine's exception handlers (the state message, its events, the stored result are made from what they get)
    redact the exception first; installing twice wraps once. tests/flows/test_secrets_in_prefect.py searches the
    Prefect database of a real run."""
    import prefect  # noqa: F401 - a process that runs flows has imported it
    from prefect.flow_engine import AsyncFlowRunEngine, FlowRunEngine
    from prefect.task_engine import AsyncTaskRunEngine, SyncTaskRunEngine

    wrapped = secrets.install_prefect_redaction()
    assert secrets.install_prefect_redaction() == wrapped
    for engine in (SyncTaskRunEngine, AsyncTaskRunEngine, FlowRunEngine, AsyncFlowRunEngine):
        for name in ("handle_exception", "handle_crash", "handle_timeout"):
            assert f"{engine.__name__}.{name}" in wrapped and getattr(engine, name).alignflow_redacts
            assert not getattr(getattr(engine, name).__wrapped__, "alignflow_redacts", False)
    assert "SyncTaskRunEngine.handle_retry" in wrapped

    class Stops(Exception):
        pass

    def stop(self, exc):
        raise Stops(str(exc))

    handler = secrets._redacting(stop)
    with pytest.raises(Stops, match=r"http://\*\*\*@127\.0\.0\.1:5000") as seen:
        handler(None, ValueError(f"request to {URI} failed"))
    assert PASSWORD not in str(seen.value)


def test_the_reward_stage_prints_the_tracking_uri_without_its_credentials(monkeypatch, capsys):
    from types import SimpleNamespace

    from components.config import RewardRunConfig
    from components.evaluation.gates import GateReport
    from flows.cli.reward import show_reward_result

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{AT_PASSWORD}@127.0.0.1:5000")
    evaluation = SimpleNamespace(n=4, accuracy=0.75, accuracy_ci=(0.5, 1.0), mean_margin=0.3, calibration_error=0.1, by_length=[])
    result = SimpleNamespace(evaluation=evaluation, champion_accuracy=None, gates=GateReport(gates=()),
                             steps=2, pairs_seen=8, model_version="1", promoted=False, run_id="0123abcd")
    show_reward_result(result, RewardRunConfig())
    printed = capsys.readouterr().out
    assert "MLflow run 0123abcd at http://***@127.0.0.1:5000" in printed and "w0rd" not in printed and "alice" not in printed


def test_the_cli_prints_no_credential_of_a_data_url(tmp_path, tiny_lm_dir):
    """`alignflow data check` of a source holding `https://user:TOKEN@...`: the error of a URL it cannot read, and the
    report of one it reads (a local path of that name), say what they say without the token."""
    from flows.cli import app

    token = "tok-in-the-data-url"
    local = tmp_path / "data" / f"https://user:{token}@example.org" / "prompts.jsonl"
    local.parent.mkdir(parents=True)
    local.write_text("".join(f'{{"prompt": "The film number {n} was"}}\n' for n in range(12)))
    for source, code in ((f"https://user:{token}@127.0.0.1:9/prompts.jsonl", 2),
                         (f"{tmp_path}/data/https://user:{token}@example.org/prompts.jsonl", 0)):
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"data": {"source": source, "check_dvc": False, "eval_size": 4},
                                          "policy": {"model": str(tiny_lm_dir)}}))
        result = CliRunner().invoke(app, ["data", "check", "--config", str(config)])
        assert result.exit_code == code, result.output
        assert token not in result.output and "***@" in result.output, result.output
