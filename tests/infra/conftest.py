"""One team stack for every module of tests/infra: infra/local-stack starts MLflow (PostgreSQL backend, basic auth
with the roles of components/security/access.py) and Prefect (PostgreSQL, API credential) on loopback, and a worker on a process
work pool. Started once for the package, torn down after its last test."""

import os
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest

from components.config import PROJECT_ROOT
from components.rl.launcher import free_port

STACK = PROJECT_ROOT / "infra" / "local-stack"
WORK_POOL = "alignflow-test-pool"
GUARDED_MODEL = "guarded-policy"  # a registered model of the stack's own, for the roles' tests (not the champion's)


def postgres_is_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
        return True
    except OSError:
        return False


class Stack:
    def __init__(self, state: Path):
        self.env = {
            **os.environ,
            "ALIGNFLOW_STACK_DIR": str(state),
            "ALIGNFLOW_DB_PREFIX": f"aftest{os.getpid()}",
            "ALIGNFLOW_MLFLOW_PORT": str(free_port()),
            "ALIGNFLOW_PREFECT_PORT": str(free_port()),
            "ALIGNFLOW_WORK_POOL": WORK_POOL,
            "ALIGNFLOW_REGISTERED_MODELS": f"alignflow-policy,{GUARDED_MODEL}",  # created up front; promoters may promote them
            # Schedules and workers react in seconds, not minutes, so the test is short.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_WORKER_QUERY_SECONDS": "3",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # What MLflow itself exports once a process has used another store (the suite's earlier tests do):
            # the stack must set itself up on its own server regardless.
            "MLFLOW_REGISTRY_URI": f"sqlite:///{state}/elsewhere.db",
            "MLFLOW_EXPERIMENT_ID": "999",
        }
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL",
                    "PREFECT_API_AUTH_STRING"):  # the stack's own, not those of whoever runs the tests
            self.env.pop(key, None)
        self.state = state

    def __call__(self, *args: str) -> str:
        done = subprocess.run([str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"local-stack {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def exports(self) -> dict[str, str]:
        """What `source .stack/env` exports: the service account's MLflow credentials and Prefect's API credential."""
        values = {}
        for line in (self.state / "env").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            values[key] = value
        return values

    def secrets(self) -> dict[str, str]:
        """The stack's generated secrets ($STATE/credentials): admin, service account, Prefect API credential."""
        return dict(line.split("=", 1) for line in (self.state / "credentials").read_text().splitlines() if "=" in line)

    def worker_log(self, tail: int = 3000) -> str:
        return (self.state / "logs" / "worker.log").read_text()[-tail:]


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    if not postgres_is_up():
        pytest.fail("PostgreSQL is not answering on 127.0.0.1:5432; the team-stack tests need it")
    stack = Stack(tmp_path_factory.mktemp("stack"))
    try:
        printed = stack("up")
        assert "MLflow:" in printed and "Prefect:" in printed
        yield stack
    finally:
        subprocess.run([str(STACK), "down", "--drop"], env=stack.env, capture_output=True, timeout=120)


@pytest.fixture
def as_client(stack, monkeypatch):
    """This process talks to the stack's servers, as a team member who sourced its env file (the pipeline's
    service account in MLflow, the API credential in Prefect)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    values = stack.exports()
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, values[key])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    mlflow.set_tracking_uri(values["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(values["MLFLOW_TRACKING_URI"])
    with temporary_settings(updates={PREFECT_API_URL: values["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: values["PREFECT_API_AUTH_STRING"]}):
        forget_prefect_clients()
        yield values
    forget_prefect_clients()
    mlflow.set_tracking_uri(None)


def forget_prefect_clients() -> None:
    """Prefect acquires concurrency slots through a per-process service whose client keeps the API URL it was
    first used with; in this session that is the flows tests' harness server. Drained, it reconnects to the
    stack (a worker's flow-run process talks to one server and never needs this)."""
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30, at_exit=False)
