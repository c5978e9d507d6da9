"""Fixtures of the code tests that talk to MLflow: a fresh SQLite store per test, copied from one made once."""

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from components.tracking import runs as tracking
from components.config import RunConfig, TrackingConfig

MODEL = "tiny-policy"


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
