"""`alignflow run`, `deploy` and `serve`: the pipeline here, on the team's Prefect server, or on a schedule."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.security import secrets
from components.config import PROJECT_ROOT, Validated, given_keys
from components.errors import prefect_credentials_message
from flows.cli import (
    ConfigOption, CronOption, IntervalOption, SetOption, app, console, explain_errors, fail, flow_overrides, resolved,
)
from flows.cli.data import prepare_demo_if_needed


@app.command()
@explain_errors
def run(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    resume: Optional[str] = typer.Option(None, help="Resume this MLflow run id from its last checkpoint."),
    remote: Optional[str] = typer.Option(
        None, help="Trigger this deployment on the Prefect server instead of running here (see `alignflow deploy`)."
    ),
    wait: bool = typer.Option(False, help="With --remote: wait for the flow run to finish and report its state."),
) -> None:
    """Run the whole pipeline: data, reward model, reference evaluation, RL, candidate evaluation, gates, registry."""
    run_config = resolved(config, set_)  # parsed and validated once; the flow gets the object (a worker: path and --set)
    if remote:
        trigger_remote(remote, {"config_path": str(config) if config else None,
                                "overrides": flow_overrides(set_, here=False), "resume_run_id": resume}, wait)
        return
    if resume:  # an unknown id, another stage's run, settings other than the recorded ones: one line, changing nothing
        from components.tracking.runs import resumed_config

        run_config = resumed_config(run_config, resume, "policy", given_keys(config, set_))
    prepare_demo_if_needed(run_config)
    from flows.pipeline import pipeline

    with prefect_api():  # the models are located and checked (no pickle-only checkpoint, no remote code) by its first task
        result = pipeline(resume_run_id=resume, validated=Validated(run_config))
    show_result(result, run_config)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API the flow reports to: PREFECT_API_URL, else a temporary server of this process's own that dies
    with it, even when this process is killed (Prefect's own temporary server would outlive a SIGKILL)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return

    class OwnedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen = subprocess.Popen

            def dying_with_us(*args, **kwargs):
                return popen(*args, preexec_fn=_die_with_parent, **kwargs)

            subprocess.Popen = dying_with_us
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    server = OwnedServer()  # registered as Prefect's temporary server: the client finds it, not a second one
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _send_what_is_queued()
    finally:
        server.stop()


def _send_what_is_queued() -> None:
    """Send the run's logs and events still queued to the temporary server before it stops (else Prefect's workers
    try after it has gone, and print "Error logging to API" at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def _die_with_parent() -> None:
    """In a child before it runs its program: the kernel sends it SIGTERM when its parent dies (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def trigger_remote(deployment: str, parameters: dict, wait: bool) -> None:
    """Start a flow run of `deployment` (FLOW/NAME, or NAME of the pipeline's flow) on the Prefect server; a name the
    server does not know ends the command naming the deployments it does know."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from flows.cli import missing_deployment

    url = require_prefect_server()
    name = deployment if "/" in deployment else f"{PIPELINE_FLOW}/{deployment}"
    try:
        flow_run = run_deployment(name, parameters=parameters, timeout=None if wait else 0)
    except ObjectNotFound:
        message = missing_deployment(name, url)
        if message is None:
            raise
        fail(f"--remote {deployment}: {message}")
    console.print(f"flow run {flow_run.name} ({flow_run.id}) of {name}: {flow_run.state.name if flow_run.state else 'scheduled'}")
    if wait and not (flow_run.state and flow_run.state.is_completed()):
        fail(f"flow run {flow_run.id} ended {flow_run.state.name if flow_run.state else 'without a state'}", code=1)


PIPELINE_FLOW = "alignflow-pipeline"


@app.command()
@explain_errors
def deploy(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    cron: Optional[str] = CronOption,
    interval: Optional[int] = IntervalOption,
    name: str = typer.Option("scheduled", help="Deployment name."),
    pool: str = typer.Option("alignflow-pool", help="Work pool whose workers run it (a process pool)."),
    concurrency_limit: Optional[int] = typer.Option(None, help="At most this many runs of it at once; later ones wait."),
) -> None:
    """Create (or update) the pipeline's deployment on the Prefect server, with its schedule and work pool."""
    resolved(config, set_)
    overrides = flow_overrides(set_, here=False)  # refused before anything reaches the server
    deploy_flow("flows/pipeline.py:pipeline", PIPELINE_FLOW, name, pool, cron, interval,
                {"config_path": str(config) if config else None, "overrides": overrides}, concurrency_limit)


def deploy_flow(entrypoint: str, flow_name: str, name: str, pool: str, cron: Optional[str], interval: Optional[int],
                parameters: dict, concurrency_limit: Optional[int] = None) -> None:
    """Create (or update) a deployment of the flow at `entrypoint` on the Prefect server, from this project's folder."""
    require_prefect_server()
    from prefect import flow as prefect_flow

    source = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint=entrypoint)
    deployment_id = source.deploy(
        name=name, work_pool_name=pool, cron=cron, interval=interval, parameters=parameters, build=False, push=False,
        concurrency_limit=concurrency_limit, print_next_steps=False,
    )
    schedule = f"cron {cron!r}" if cron else f"every {interval} s" if interval else "no schedule"
    console.print(f"deployment {flow_name}/{name} ({deployment_id}) on work pool {pool}, {schedule}")


def show_result(result, run_config) -> None:
    """The reference against the candidate, the gate report, and where the version and the run are."""
    from components.evaluation.policy import comparison_table
    from components.tracking.runs import resolve_tracking_uri

    table = Table(title="Reference (the starting policy) vs candidate, on the held-out prompts")
    for column in ("metric", "reference", "candidate"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for row in comparison_table(result.reference, result.candidate):
        table.add_row(row["metric"], f"{row['reference']:.4f}", f"{row['candidate']:.4f}")
    console.print(table)
    console.print(result.gates.to_rich_table())
    for note in result.gates.notes:
        console.print(f"[dim]{escape(note)}[/]")
    colour = "green" if result.gates.passed else "red"
    console.print(f"gates: [{colour}]{escape(result.gates.summary())}[/]")
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    state = f"promoted to @{alias}" if result.promoted else f"not promoted (@{alias} unchanged)"
    console.print(f"stop reason: {result.stop_reason} after {result.episodes} episodes")
    console.print(f"registered [bold]{name}[/] version [bold]{result.model_version}[/]: {state}")
    uri = secrets.redact_uri(resolve_tracking_uri(run_config.tracking))
    console.print(f"MLflow run {result.run_id}; open the UI with:\n  mlflow ui --backend-store-uri {uri}"
                  if uri.startswith("sqlite") else f"MLflow run {result.run_id} at {uri}")


@app.command()
@explain_errors
def serve(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    cron: Optional[str] = CronOption,
    interval: Optional[int] = IntervalOption,
    name: str = typer.Option("alignflow-scheduled", help="Deployment name."),
) -> None:
    """Serve the pipeline as a scheduled Prefect deployment from this process (needs a Prefect server)."""
    resolved(config, set_)
    if (cron is None) == (interval is None):
        fail("give exactly one of --cron or --interval")
    require_prefect_server()
    from flows.pipeline import pipeline

    parameters = {"config_path": str(config) if config else None, "overrides": flow_overrides(set_, here=True)}
    pipeline.serve(name=name, cron=cron, interval=interval, parameters=parameters)


def require_prefect_server() -> str:
    """Schedules need a real Prefect server; say how to get one rather than failing deep inside Prefect."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        fail("no Prefect server configured: schedules need one. Start it with `prefect server start` "
             "(or `infra/local-stack up`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        fail(f"the Prefect server at {url} is not reachable ({exc}). Start it with `prefect server start` "
             "or `infra/local-stack up`, or fix PREFECT_API_URL")
    check_prefect_credentials(url)
    return url


def check_prefect_credentials(url: str) -> None:
    """A team's Prefect server answers only its API credential (server.api.auth_string): say so in one line."""
    import base64

    import httpx
    from prefect.settings import PREFECT_API_AUTH_STRING

    auth = PREFECT_API_AUTH_STRING.value()
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    if httpx.get(f"{url.rstrip('/')}/admin/version", headers=headers, timeout=10).status_code == 401:
        fail(prefect_credentials_message(url, bool(auth)))
