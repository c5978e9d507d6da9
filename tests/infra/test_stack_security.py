"""The team stack as an outsider on its network, a read-only teammate and a careless config would meet it: no
unauthenticated door to the scheduler, least privilege on the registry, no secret in what a run records.
(The worker, which holds the API credential, running a scheduled run: test_team_stack.py's scheduled test, on this
same stack.)"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from components.config import PROJECT_ROOT
from .conftest import GUARDED_MODEL, WORK_POOL

pytestmark = [pytest.mark.server, pytest.mark.slow]

ALIGNFLOW = shutil.which("alignflow") or str(Path(sys.executable).parent / "alignflow")


def alignflow(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([ALIGNFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)


def without_credentials(values: dict[str, str]) -> dict[str, str]:
    """This machine's environment with the stack's URLs but no credential of either server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    return {**env, "MLFLOW_TRACKING_URI": values["MLFLOW_TRACKING_URI"], "PREFECT_API_URL": values["PREFECT_API_URL"]}


# --- no unauthenticated door to the scheduler -----------------------------------------------------------


def test_the_prefect_api_refuses_requests_without_its_credential(stack, as_client):
    api = as_client["PREFECT_API_URL"]
    good = tuple(as_client["PREFECT_API_AUTH_STRING"].split(":", 1))
    with httpx.Client(base_url=api, timeout=60) as outsider, httpx.Client(base_url=api, auth=good, timeout=60) as teammate:
        assert outsider.get("/health").status_code == 200  # liveness only, for probes
        # Reading flows
        assert outsider.post("/flows/filter", json={}).status_code == 401
        assert outsider.post("/flows/filter", json={}, auth=("alignflow", "not-the-password")).status_code == 401
        assert teammate.post("/flows/filter", json={}).status_code == 200
        # Creating a deployment: what an outsider would need to run code on the worker
        flow_id = teammate.post("/flows/", json={"name": "outsider-probe"}).json()["id"]
        deployment = {"name": "outsider-probe", "flow_id": flow_id, "work_pool_name": WORK_POOL,
                      "entrypoint": "flows/pipeline.py:pipeline", "path": str(PROJECT_ROOT)}
        assert outsider.post("/deployments/", json=deployment).status_code == 401
        created = teammate.post("/deployments/", json={**deployment, "paused": True})
        assert created.status_code in (200, 201), created.text
        deployment_id = created.json()["id"]
        try:
            # Triggering a run of an existing deployment, and emitting an event (which automations could act on)
            assert outsider.post(f"/deployments/{deployment_id}/create_flow_run", json={}).status_code == 401
            assert outsider.post("/events", json=[]).status_code == 401
            runs = teammate.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
            assert runs == []  # nothing was scheduled for the worker
        finally:
            teammate.delete(f"/deployments/{deployment_id}")
            teammate.delete(f"/flows/{flow_id}")


def test_the_event_websockets_refuse_a_client_without_the_credential(stack, as_client):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = as_client["PREFECT_API_URL"].replace("http://", "ws://") + "/events/in"
    with pytest.raises(InvalidStatus) as refused:  # a client without Prefect's subprotocol, so without its auth step
        connect(url, open_timeout=30)
    assert refused.value.response.status_code == 403
    with connect(url, subprotocols=["prefect"], open_timeout=30) as socket, pytest.raises(ConnectionClosed) as closed:
        socket.send(json.dumps({"type": "auth", "token": "alignflow:not-the-password"}))
        socket.recv(timeout=30)
    assert closed.value.rcvd.code == 1008
    with connect(url, subprotocols=["prefect"], open_timeout=30) as socket:
        socket.send(json.dumps({"type": "auth", "token": as_client["PREFECT_API_AUTH_STRING"]}))
        assert json.loads(socket.recv(timeout=30)) == {"type": "auth_success"}


def test_the_stack_keeps_its_credentials_in_files_only_their_owner_reads(stack):
    for name in ("credentials", "env"):
        assert stat.S_IMODE((stack.state / name).stat().st_mode) == 0o600, name
    kept = stack.secrets()
    assert {"MLFLOW_ADMIN_PASSWORD", "PIPELINE_PASSWORD", "PREFECT_AUTH_STRING"} <= set(kept)
    exported = stack.exports()
    assert exported["PREFECT_API_AUTH_STRING"] == kept["PREFECT_AUTH_STRING"]
    assert exported["MLFLOW_TRACKING_USERNAME"] == "alignflow-pipeline"  # the service account, not the admin
    assert kept["MLFLOW_ADMIN_PASSWORD"] not in (stack.state / "env").read_text()
    ignored = subprocess.run(["git", "check-ignore", ".stack/env", "infra/.env"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == [".stack/env", "infra/.env"]  # neither the stack's state nor compose's .env is committed


def test_the_cli_says_in_one_line_that_the_prefect_api_needs_its_credential(stack, as_client):
    env = {**without_credentials(as_client), "MLFLOW_TRACKING_USERNAME": as_client["MLFLOW_TRACKING_USERNAME"],
           "MLFLOW_TRACKING_PASSWORD": as_client["MLFLOW_TRACKING_PASSWORD"]}
    done = alignflow("deploy", "--name", "no-credential", "--pool", WORK_POOL, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "requires credentials: set PREFECT_API_AUTH_STRING" in done.stderr and "Traceback" not in done.stderr


# --- least privilege on the registry ------------------------------------------------------------------------


def account(stack, role: str) -> tuple[str, str]:
    """A person's MLflow account with `role`, made as the README says: infra/local-stack add-user NAME ROLE."""
    name = f"{role}-{uuid.uuid4().hex[:6]}"
    printed = stack("add-user", name, role)
    password = re.search(r"password \(shown once\): (\S+)", printed)
    assert password, printed
    return name, password[1]


def as_user(values: dict[str, str], user: tuple[str, str]) -> dict[str, str]:
    return {**without_credentials(values), "MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1],
            "PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"]}


@pytest.fixture(scope="module")
def guarded_versions(stack):
    """Two versions of the guarded model, registered by the pipeline's service account, both past their gates:
    the second is the champion, the first the previous one (so a rollback would move the alias)."""
    values = stack.exports()
    os.environ.update({k: values[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    try:
        client = MlflowClient(values["MLFLOW_TRACKING_URI"], values["MLFLOW_TRACKING_URI"])
        experiment = client.create_experiment(f"guarded-{uuid.uuid4().hex[:6]}")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        versions = []
        for _ in range(2):
            version = client.create_model_version(GUARDED_MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
            client.set_model_version_tag(GUARDED_MODEL, version.version, "gates_passed", "true")
            versions.append(str(version.version))
        client.set_registered_model_alias(GUARDED_MODEL, "champion", versions[1])
        client.set_model_version_tag(GUARDED_MODEL, versions[1], "previous_champion", versions[0])
        client.set_terminated(run.info.run_id)
        yield experiment, run.info.run_id, versions
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)


def champion(values) -> str:
    client = MlflowClient(values["MLFLOW_TRACKING_URI"], values["MLFLOW_TRACKING_URI"])
    return str(client.get_model_version_by_alias(GUARDED_MODEL, "champion").version)


def test_a_reader_lists_runs_and_models_but_cannot_move_the_champion(stack, as_client, guarded_versions, monkeypatch):
    from components import registry
    from components.access import RegistryPermissionError

    experiment, run_id, (first, second) = guarded_versions
    reader = account(stack, "reader")
    refused = alignflow("promote", first, "--set", f"tracking.registered_model={GUARDED_MODEL}", env=as_user(as_client, reader))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = [line for line in refused.stderr.splitlines()
             if line.strip() and "warn" not in line.lower() and not line.startswith("(details:")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert lines[0].startswith(f"error: MLflow user '{reader[0]}' may not move @champion of {GUARDED_MODEL}"), lines[0]
    assert f"needs EDIT permission on registered model '{GUARDED_MODEL}'" in lines[0] and "403" in lines[0], lines[0]
    assert champion(as_client) == second  # nothing changed

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reader[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader[1])
    client = MlflowClient()
    assert run_id in [r.info.run_id for r in client.search_runs([experiment])]
    assert GUARDED_MODEL in [m.name for m in client.search_registered_models()]
    assert {v.version: v.aliases for v in registry.list_versions(GUARDED_MODEL)} == {int(second): ["champion"], int(first): []}
    with pytest.raises(RegistryPermissionError, match=rf"'{reader[0]}' may not move @champion of {GUARDED_MODEL} back"):
        registry.rollback(GUARDED_MODEL)
    assert champion(as_client) == second
    tags = client.get_model_version(GUARDED_MODEL, first).tags
    assert "promoted_by" not in tags and "rolled_back_by" not in tags


def test_a_promoter_moves_the_champion_and_back(stack, as_client, guarded_versions, monkeypatch):
    from components import registry

    _, _, (first, second) = guarded_versions
    promoter = account(stack, "promoter")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", promoter[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", promoter[1])
    assert str(registry.rollback(GUARDED_MODEL, user=promoter[0]).version) == first and champion(as_client) == first
    assert registry.promote(GUARDED_MODEL, second, user=promoter[0])[0] and champion(as_client) == second


# --- no secret in what a run records ------------------------------------------------------------------------


def test_a_credential_in_the_tracking_uri_stays_out_of_every_record(stack, as_client, demo_data_dir, tiny_lm_dir, tiny_reward_dir, tmp_path):
    """`alignflow run` here, its only MLflow credential in tracking.tracking_uri: the run works, and the password
    is found in none of its MLflow params, tags and config.yaml, its Prefect flow-run parameters, logs and events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    user, secret = as_client["MLFLOW_TRACKING_USERNAME"], as_client["MLFLOW_TRACKING_PASSWORD"]
    uri = as_client["MLFLOW_TRACKING_URI"].replace("http://", f"http://{user}:{secret}@")
    env = {**without_credentials(as_client), "PREFECT_API_AUTH_STRING": as_client["PREFECT_API_AUTH_STRING"]}
    env.pop("MLFLOW_TRACKING_URI")
    sets = [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", "tracking.experiment=secret-uri",
            "tracking.registered_model=secret-uri-policy", f"checkpoint.dir={tmp_path / 'checkpoints'}",
            "rl.rollout_batch_size=16", "rl.mini_batch_size=8", "rl.update_epochs=1", "rl.total_episodes=32", "checkpoint.every=2",
            "data.eval_size=16", "generation.max_new_tokens=8", "evaluation.bootstrap_samples=100", f"tracking.tracking_uri={uri}"]
    done = alignflow("run", *[arg for s in sets for arg in ("--set", s)], env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    assert "warning: tracking.tracking_uri holds credentials in plain text" in done.stderr
    assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in done.stderr
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", done.stdout)[1]

    client = MlflowClient(as_client["MLFLOW_TRACKING_URI"], as_client["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.params["tracking.tracking_uri"] == as_client["MLFLOW_TRACKING_URI"]  # the URI, without credentials
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert yaml.safe_load(config_yaml)["tracking"]["tracking_uri"] == as_client["MLFLOW_TRACKING_URI"]
    version = client.get_model_version("secret-uri-policy", run.data.tags["alignflow.model_version"])
    mlflow_records = json.dumps([run.data.params, run.data.tags, config_yaml, version.tags])

    flow_run_id = run.data.tags["alignflow.prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        events = prefect._client.post("/events/filter", json={
            "filter": {"any_resource": {"id_prefix": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})
    assert events.status_code == 200 and events.json()["events"], events.text[:500]
    overrides = flow_run.parameters["overrides"]
    assert f"tracking.tracking_uri={as_client['MLFLOW_TRACKING_URI']}" in overrides  # it went, without credentials
    assert len(logs) > 5 and any("iteration" in log.message for log in logs)
    prefect_records = json.dumps([flow_run.model_dump(mode="json"), [log.message for log in logs], events.json()])
    for where, text in (("MLflow", mlflow_records), ("Prefect", prefect_records)):
        assert secret not in text, f"the password is in the {where} records"
        assert f"{user}:" not in text, f"the credentials are in the {where} records"


# --- the compose stack --------------------------------------------------------------------------------------


def test_the_compose_stack_guards_prefect_and_runs_the_worker_as_the_service_account():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose (Debian's package) is needed to validate infra/docker-compose.yml; `make test` installs it")
    secrets = {"POSTGRES_PASSWORD": "pg", "MLFLOW_ADMIN_USER": "admin", "MLFLOW_ADMIN_PASSWORD": "admin-pw",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask", "ALIGNFLOW_PIPELINE_PASSWORD": "svc-pw", "PREFECT_AUTH_STRING": "team:api-pw"}
    done = subprocess.run([compose, "-f", str(PROJECT_ROOT / "infra" / "docker-compose.yml"), "config"],
                          env={**os.environ, **secrets}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "team:api-pw"
    worker = services["worker"]["environment"]
    assert worker["PREFECT_API_AUTH_STRING"] == "team:api-pw"
    assert (worker["MLFLOW_TRACKING_USERNAME"], worker["MLFLOW_TRACKING_PASSWORD"]) == ("alignflow-pipeline", "svc-pw")
    assert "admin-pw" not in json.dumps(services["worker"])  # the worker never holds the MLflow admin's password
    assert services["mlflow-roles"]["command"] == "python -m components.access bootstrap"
    assert services["worker"]["depends_on"]["mlflow-roles"]["condition"] == "service_completed_successfully"
    ini = (PROJECT_ROOT / "infra" / "mlflow" / "auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", ini, re.M)
