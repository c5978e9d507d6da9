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
    from components.tracking import registry

    values = stack.exports()
    os.environ.update({k: values[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    try:
        client = MlflowClient(values["MLFLOW_TRACKING_URI"], values["MLFLOW_TRACKING_URI"])
        experiment = client.create_experiment(f"guarded-{uuid.uuid4().hex[:6]}")
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        client.log_metric(run.info.run_id, registry.GATES_METRIC, 1.0)  # the pipeline's gate result, checked by promotion
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
    from components.tracking import registry
    from components.security.access import RegistryPermissionError

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
    from components.tracking import registry

    _, _, (first, second) = guarded_versions
    promoter = account(stack, "promoter")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", promoter[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", promoter[1])
    assert str(registry.rollback(GUARDED_MODEL, user=promoter[0]).version) == first and champion(as_client) == first
    assert registry.promote(GUARDED_MODEL, second, user=promoter[0])[0] and champion(as_client) == second


# --- no secret in what a run records ------------------------------------------------------------------------


def test_a_credential_in_the_tracking_uri_stays_out_of_every_record(stack, as_client, demo_data_dir, tiny_lm_dir, tiny_reward_dir, tmp_path):
    """`alignflow run` here, its only MLflow credential in tracking.tracking_uri: the run works, and the password
    is found in none of its MLflow params, tags and config.yaml, its Prefect flow-run parameters, logs and events, nor
    anywhere in Prefect's database."""
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
    handed = flow_run.parameters["validated"]  # the command's validated configuration, as Prefect recorded it
    assert flow_run.parameters["overrides"] is None  # parsed once, by the command
    assert handed["tracking"]["tracking_uri"] == as_client["MLFLOW_TRACKING_URI"]  # it went, without credentials
    assert len(logs) > 5 and any("iteration" in log.message for log in logs)
    prefect_records = json.dumps([flow_run.model_dump(mode="json"), [log.message for log in logs], events.json()])
    for where, text in (("MLflow", mlflow_records), ("Prefect", prefect_records)):
        assert secret not in text, f"the password is in the {where} records"
        assert f"{user}:" not in text, f"the credentials are in the {where} records"
    # and nowhere in Prefect's database (PostgreSQL): every row of every table, read as text
    assert prefect_database_rows_with(stack, flow_run_id), "the search finds nothing: not the run's database"
    assert prefect_database_rows_with(stack, secret) == {}


def prefect_database_rows_with(stack, needle: str) -> dict[str, int]:
    """{table: rows} of the stack's Prefect database whose text holds `needle` (read as this machine's PostgreSQL
    superuser, as an intruder on the database would)."""
    import psycopg

    found = {}
    with psycopg.connect(host="127.0.0.1", port=5432, user=os.environ.get("PGUSER", "postgres"),
                         dbname=f"{stack.env['ALIGNFLOW_DB_PREFIX']}_prefect") as connection:
        tables = [row[0] for row in connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        for table in tables:
            rows = connection.execute(f'SELECT count(*) FROM "{table}" AS r WHERE r::text LIKE %s',
                                      (f"%{needle}%",)).fetchone()[0]
            if rows:
                found[table] = rows
    return found


def test_the_stack_creates_every_name_the_stages_write_to_by_default():
    """The policy pipeline's names (configs/demo.yaml and the library's defaults), the reward stage's
    (configs/reward.yaml) and the judge's (README: the reward stage with tracking.registered_model=judge) are all among
    the names the stack's bootstrap creates and gives to the service account."""
    from components.security import access
    from components.config import RewardRunConfig, RewardTrackingConfig, TrackingConfig, load_config

    reward_yaml = PROJECT_ROOT / "configs" / "reward.yaml"
    trackings = [TrackingConfig(), RewardTrackingConfig(), load_config(PROJECT_ROOT / "configs" / "demo.yaml", []).tracking,
                 load_config(reward_yaml, [], schema=RewardRunConfig).tracking,
                 load_config(reward_yaml, ["tracking.registered_model=judge"], schema=RewardRunConfig).tracking]
    for tracking in trackings:
        assert tracking.registered_model in access.STAGE_MODELS, tracking
        assert tracking.experiment in access.STAGE_EXPERIMENTS, tracking


# --- the databases behind both servers ------------------------------------------------------------------------------


def superuser_sql(sql: str) -> str:
    done = subprocess.run(["psql", "-X", "-h", os.environ.get("PGHOST", "127.0.0.1"), "-U", os.environ.get("PGUSER", "postgres"),
                           "-d", "postgres", "-tAc", sql], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_both_servers_use_the_stacks_own_postgres_role_and_its_password(stack):
    """MLflow and Prefect connect as the stack's role (no superuser, no CREATEDB/CREATEROLE, a password), which owns the
    stack's databases and alone may connect to them; the password is on no command line; `status` tells whether
    PostgreSQL checks it (this machine's pg_hba.conf may trust local connections: then it says so)."""
    prefix = stack.env["ALIGNFLOW_DB_PREFIX"]
    role, password = f"{prefix}_stack", stack.secrets()["DB_PASSWORD"]
    assert superuser_sql(f"SELECT rolsuper, rolcreatedb, rolcreaterole, rolpassword IS NOT NULL FROM pg_authid "
                         f"WHERE rolname = '{role}'") == "f|f|f|t"
    for database in (f"{prefix}_mlflow", f"{prefix}_mlflow_auth", f"{prefix}_prefect"):
        assert superuser_sql(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{database}'") == role
        assert superuser_sql(f"SELECT has_database_privilege('public', '{database}', 'CONNECT')") == "f"
    connected = superuser_sql(f"SELECT DISTINCT usename FROM pg_stat_activity WHERE datname LIKE '{prefix}\\_%'")
    assert connected.split() == [role], connected
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert password not in cmdline.read_bytes().decode(errors="replace"), f"the role's password is on {cmdline}"
        except OSError:
            continue
    assert stat.S_IMODE((stack.state / "mlflow-auth.ini").stat().st_mode) == 0o600  # it holds the password
    trusted = subprocess.run(["psql", "-X", "-w", "-h", os.environ.get("PGHOST", "127.0.0.1"), "-U", role, "-d",
                              f"{prefix}_mlflow", "-tAc", "SELECT 1"], env={**os.environ, "PGPASSWORD": "not-" + password},
                             capture_output=True, timeout=60).returncode == 0
    [line] = [line for line in stack("status").splitlines() if line.startswith("postgres:")]
    assert f"role {role}" in line
    assert ("WITHOUT its password" in line) == trusted and ("needs its password" in line) == (not trusted), line


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
    assert services["mlflow-roles"]["command"] == "python -m components.security.access bootstrap"
    assert services["worker"]["depends_on"]["mlflow-roles"]["condition"] == "service_completed_successfully"
    ini = (PROJECT_ROOT / "infra" / "mlflow" / "auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", ini, re.M)


# --- nothing forged: who may create, and who owns, the names the stages write to ------------------------------------


def as_account(monkeypatch, user: tuple[str, str]) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    return MlflowClient()


def admin(stack) -> tuple[str, str]:
    kept = stack.secrets()
    return kept["MLFLOW_ADMIN_USER"], kept["MLFLOW_ADMIN_PASSWORD"]


def refused(call) -> str:
    """The error code MLflow answered a call it refused with."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as failure:
        call()
    return failure.value.error_code


def test_the_stages_names_exist_owned_by_the_service_account_and_a_reader_can_neither_create_nor_forge_them(
        stack, as_client, monkeypatch):
    """The reward stage's registered model and experiment (and the policy's, and the judge's) are created by the stack,
    owned by the service account; a reader can create no name at all (MLflow's workspaces), and can neither register
    a version of `alignflow-reward` nor force it to @champion."""
    from components.security import access

    uri = as_client["MLFLOW_TRACKING_URI"]
    pipeline = MlflowClient()  # the service account (as_client)
    for name in access.STAGE_MODELS:
        assert pipeline.get_registered_model(name).name == name
    access.check_owned(uri, experiment="alignflow-reward", registered_model="alignflow-reward",
                       reads={"judge.model": "judge"})  # owned: nothing refused
    for experiment in access.STAGE_EXPERIMENTS:
        access.check_owned(uri, experiment=experiment)
    for name in access.STAGE_MODELS:
        access.check_owned(uri, registered_model=name)
    experiment = pipeline.get_experiment_by_name("alignflow-reward").experiment_id
    run = pipeline.create_run(experiment)
    pipeline.log_text(run.info.run_id, "weights", "model/weights.txt")
    honest = pipeline.create_model_version("alignflow-reward", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    pipeline.set_terminated(run.info.run_id)

    reader = as_account(monkeypatch, account(stack, "reader"))
    assert reader.get_registered_model("alignflow-reward").name == "alignflow-reward"  # it reads them
    assert refused(lambda: reader.create_registered_model("alignflow-reward")) == "PERMISSION_DENIED"
    assert refused(lambda: reader.create_experiment("alignflow-reward")) == "PERMISSION_DENIED"
    fresh = f"reader-made-{uuid.uuid4().hex[:6]}"
    assert refused(lambda: reader.create_registered_model(fresh)) == "PERMISSION_DENIED"  # no name at all
    assert refused(lambda: reader.create_experiment(fresh)) == "PERMISSION_DENIED"
    assert refused(lambda: reader.create_model_version("alignflow-reward", f"runs:/{run.info.run_id}/model",
                                                       run_id=run.info.run_id)) == "PERMISSION_DENIED"
    assert refused(lambda: reader.set_registered_model_alias("alignflow-reward", "champion", honest.version)) == "PERMISSION_DENIED"
    assert refused(lambda: reader.delete_registered_model("alignflow-reward")) == "PERMISSION_DENIED"
    assert refused(lambda: reader.delete_experiment(experiment)) == "PERMISSION_DENIED"

    as_account(monkeypatch, (as_client["MLFLOW_TRACKING_USERNAME"], as_client["MLFLOW_TRACKING_PASSWORD"]))
    assert [int(v.version) for v in pipeline.search_model_versions("name='alignflow-reward'")] == [int(honest.version)]
    assert "champion" not in pipeline.get_registered_model("alignflow-reward").aliases
    assert not pipeline.search_registered_models(filter_string=f"name = '{fresh}'")
    assert pipeline.get_experiment_by_name(fresh) is None


@pytest.fixture(scope="module")
def foreign_names(stack):
    """A registered model with a @champion and an experiment that another account owns (MANAGE), as names made before
    the stack kept readers from creating them would be: made by the admin and given to a reader."""
    from components.security import access

    values, (user, password) = stack.exports(), admin(stack)
    owner = account(stack, "reader")
    suffix = uuid.uuid4().hex[:6]
    model, experiment = f"foreign-reward-{suffix}", f"foreign-{suffix}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        uri = values["MLFLOW_TRACKING_URI"]
        client = MlflowClient(uri, uri)
        experiment_id = client.create_experiment(experiment)
        run = client.create_run(experiment_id)
        client.log_text(run.info.run_id, "swapped labels", "model/weights.txt")
        client.create_registered_model(model)
        version = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_registered_model_alias(model, "champion", version.version)
        auth = access._client(uri)
        auth.grant_user_permission(owner[0], "registered_model", model, "MANAGE")
        auth.grant_user_permission(owner[0], "experiment", experiment_id, "MANAGE")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return model, experiment, owner[0]


def test_a_name_another_account_owns_is_refused_naming_it_and_what_an_admin_must_do(stack, as_client, foreign_names):
    from components.security import access
    from components.errors import UserError

    model, experiment, owner = foreign_names
    uri = as_client["MLFLOW_TRACKING_URI"]
    for kwargs, name, use in ((dict(registered_model=model), model, "registers its models in"),
                              (dict(reads={"reward.model": model}), model, "loads reward.model from"),
                              (dict(experiment=experiment), experiment, "records its runs in")):
        with pytest.raises(access.NotOwnedError) as failure:
            access.check_owned(uri, **kwargs)
        message = str(failure.value)
        assert isinstance(failure.value, UserError) and failure.value.exit_code == 2
        assert "MLflow user 'alignflow-pipeline' does not own" in message and f"'{name}', which this stage {use}" in message
        kind = "experiment" if name == experiment else "registered_model"
        assert f"python -m components.security.access owners {kind} {name}" in message
        assert f"python -m components.security.access adopt {kind} {name}" in message
    access.check_owned("sqlite:///nowhere.db", experiment=experiment, registered_model=model)  # a local store: no owners

    # What the admin is told to run names the other owner, and gives the name to the service account.
    as_admin = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": admin(stack)[0],
                "MLFLOW_TRACKING_PASSWORD": admin(stack)[1]}
    shown = subprocess.run([sys.executable, "-m", "components.security.access", "owners", "registered_model", model],
                           env=as_admin, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"also written by {owner} (MANAGE)" in shown.stdout, shown.stdout + shown.stderr
    # The stack's bootstrap (`up`), asked to own the foreign experiment, does not launder it: it says who else can write.
    setup = subprocess.run([sys.executable, "-m", "components.security.access", "bootstrap"], cwd=PROJECT_ROOT, timeout=300,
                           env={**as_admin, "ALIGNFLOW_PIPELINE_PASSWORD": stack.secrets()["PIPELINE_PASSWORD"],
                                "ALIGNFLOW_REGISTERED_MODELS": stack.env["ALIGNFLOW_REGISTERED_MODELS"],
                                "ALIGNFLOW_EXPERIMENTS": f"alignflow-demo,{experiment}"}, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert (f"not given to alignflow-pipeline: experiment '{experiment}' can be written by {owner} (MANAGE)"
            in setup.stdout), setup.stdout
    with pytest.raises(access.NotOwnedError):
        access.check_owned(uri, experiment=experiment)


def stage_env(as_client) -> dict[str, str]:
    return {**os.environ, **as_client}


def test_the_stages_refuse_a_name_another_account_owns_with_exit_2_before_training(stack, as_client, foreign_names, demo_data_dir,
                                                                                     tiny_lm_dir, tiny_reward_dir, tmp_path):
    """`alignflow reward run` into the foreign registered model, and `alignflow run` against the foreign reward model's
    @champion or into the foreign experiment: exit 2, one line naming the name, nothing trained or recorded."""
    model, experiment, _ = foreign_names
    uri = as_client["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    reward_experiment = f"owned-reward-{uuid.uuid4().hex[:6]}"
    reward = alignflow("reward", "run", "--set", f"model.base={tiny_lm_dir}", "--set",
                       f"data.source={PROJECT_ROOT / 'tests/fixtures/preferences/hh-rlhf.jsonl'}", "--set",
                       "data.format=implicit", "--set", "data.check_dvc=false", "--set", f"tracking.registered_model={model}",
                       "--set", f"tracking.experiment={reward_experiment}", "--set", f"checkpoint.dir={tmp_path / 'r'}",
                       "--set", "training.max_steps=2",
                       env=stage_env(as_client), timeout=600)
    policy_sets = [f"policy.model={tiny_lm_dir}", f"reward.model={tiny_reward_dir}", f"checkpoint.dir={tmp_path / 'p'}",
                   "tracking.registered_model=alignflow-policy", "rl.rollout_batch_size=16", "rl.mini_batch_size=8",
                   "rl.total_episodes=16", "data.eval_size=16", "generation.max_new_tokens=4", "evaluation.bootstrap_samples=50"]
    against = alignflow("run", *[a for s in [*policy_sets, f"reward.model=models:/{model}@champion",
                                             f"tracking.experiment=owned-{uuid.uuid4().hex[:6]}"] for a in ("--set", s)],
                        env=stage_env(as_client), timeout=600)
    into = alignflow("run", *[a for s in [*policy_sets, f"tracking.experiment={experiment}"] for a in ("--set", s)],
                     env=stage_env(as_client), timeout=600)
    for done, name, use in ((reward, model, "registers its models in"), (against, model, "loads reward.model from"),
                            (into, experiment, "records its runs in")):
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        assert "does not own" in done.stderr and f"'{name}', which this stage {use}" in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
    assert client.get_experiment_by_name(reward_experiment) is None  # nothing recorded: no experiment, no run
    foreign_runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(foreign_runs) == 1 and "alignflow.stage" not in foreign_runs[0].data.tags  # only the owner's own run
    assert [int(v.version) for v in client.search_model_versions(f"name='{model}'")] == [1]  # nothing registered


def test_the_compose_stack_closes_its_databases_and_lets_only_the_service_account_create_names():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose (Debian's package) is needed to validate infra/docker-compose.yml; `make test` installs it")
    secrets = {"POSTGRES_PASSWORD": "pg-secret", "MLFLOW_ADMIN_USER": "admin", "MLFLOW_ADMIN_PASSWORD": "admin-pw",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask", "ALIGNFLOW_PIPELINE_PASSWORD": "svc-pw", "PREFECT_AUTH_STRING": "team:api-pw"}
    done = subprocess.run([compose, "-f", str(PROJECT_ROOT / "infra" / "docker-compose.yml"), "config"],
                          env={**os.environ, **secrets}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"  # no trust, over TCP
    assert set(postgres["environment"]["POSTGRES_INITDB_ARGS"].split()) >= {"--auth-local=scram-sha-256",
                                                                           "--auth-host=scram-sha-256"}  # nor the socket
    assert "ports" not in postgres  # reachable from the stack's own network only
    for name in ("mlflow", "prefect", "worker", "mlflow-roles"):
        assert "pg-secret" not in str(services[name].get("command", "")), name  # never on a command line
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == "postgresql://alignflow:pg-secret@postgres:5432/mlflow"
    assert "--enable-workspaces" in services["mlflow"]["command"]  # creating a name needs the service account's role
