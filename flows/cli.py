"""The `alignflow` command: run, schedule, inspect and promote; plus config, data and demo helpers."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from components import secrets
from components.config import PROJECT_ROOT, ConfigError, load_config

app = typer.Typer(help="alignflow: RLHF with PPO as a scheduled, auditable MLOps workflow.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the run configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Check the data pinned by data.dvc.", no_args_is_help=True)
demo_app = typer.Typer(help="The offline demo kit (the embedded default).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")

# Piped output (logs, CI, tests) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOption = typer.Option(None, "--config", "-c", help="Run configuration (YAML). Default: configs/demo.yaml.")
SetOption = typer.Option([], "--set", "-s", help="Override a setting, e.g. --set ppo.learning_rate=1e-5 (repeatable).")


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolved(config: Optional[Path], overrides: list[str]):
    with warnings.catch_warnings(record=True) as caught:  # a secret in plain text: one line each, before any error
        warnings.simplefilter("always", secrets.PlaintextSecretWarning)
        try:
            run, problem = load_config(config, overrides), None
        except ConfigError as exc:
            run, problem = None, str(exc)
    for warning in caught:
        if issubclass(warning.category, secrets.PlaintextSecretWarning):
            errors.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
    if problem is not None:
        fail(problem)
    return run


def flow_overrides(overrides: list[str], *, here: bool) -> list[str]:
    """`--set` overrides as Prefect flow-run parameters, which the Prefect server stores and shows: without secrets
    (components/secrets.py). A flow that runs in this process gets them through this process's environment
    (`MLFLOW_TRACKING_USERNAME`/`PASSWORD`, `ALIGNFLOW_<KEY>`); for one that runs on a worker they are refused."""
    try:
        clean, moved = secrets.scrub_overrides(overrides, refuse=not here)
    except secrets.SecretInParameters as exc:
        fail(str(exc))
    os.environ.update(moved)
    return clean


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Print the resolved configuration (YAML), after overrides and defaults."""
    console.print(secrets.redacted_yaml(resolved(config, set_)), highlight=False, soft_wrap=True)


@data_app.command("check")
def data_check(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Check data/ against data.dvc and report the prompt rows that would be left out."""
    from components.data import DataError, check_data, load_prompts

    run = resolved(config, set_)
    try:
        version = check_data(PROJECT_ROOT / run.data.dvc_file)
        prompts = load_prompts(run.data, PROJECT_ROOT)
    except DataError as exc:
        fail(str(exc))
    console.print(f"data version (md5 from {run.data.dvc_file}): [bold]{version.md5}[/] ({version.files} files)")
    console.print(prompts.report.summary(), highlight=False)


@demo_app.command("data")
def demo_data(out: Path = typer.Option(PROJECT_ROOT / "data/demo", help="Where to write the demo datasets."), seed: int = 0) -> None:
    """Regenerate the demo datasets exactly (the same seed gives the bytes data.dvc pins)."""
    from components.demo.domain import generate_demo_data

    files = generate_demo_data(out, seed=seed)
    for name, path in files.items():
        console.print(f"wrote {name}: {path}")


@demo_app.command("bootstrap")
def demo_bootstrap(
    data_dir: Path = typer.Option(PROJECT_ROOT / "data/demo"),
    out: Path = typer.Option(PROJECT_ROOT / "artifacts/demo"),
    force: bool = typer.Option(False, help="Retrain even if the models exist for this data and these settings."),
) -> None:
    """Train the demo's instruct model and reward model from scratch on the CPU."""
    from components.demo.bootstrap import bootstrap

    ensure_demo_data(data_dir)
    report = bootstrap(data_dir, out, force=force)
    console.print(report)


def ensure_demo_data(data_dir: Path = PROJECT_ROOT / "data/demo") -> None:
    """Generate the demo data when it is missing (a fresh clone), then check it against data.dvc."""
    from components.data import DataError, check_data
    from components.demo.domain import generate_demo_data

    if not data_dir.exists():
        console.print(f"{data_dir} is missing: regenerating the demo data (seed 0)")
        generate_demo_data(data_dir, seed=0)
    try:
        check_data(PROJECT_ROOT / "data.dvc")
    except DataError as exc:
        fail(str(exc))


def prepare_demo_if_needed(run) -> None:
    """The embedded default brings its own world: data regenerated and models bootstrapped if missing."""
    from components.demo.bootstrap import bootstrap

    if run.policy.model.startswith("artifacts/demo") or run.reward.model.startswith("artifacts/demo"):
        ensure_demo_data()
        report = bootstrap(PROJECT_ROOT / "data/demo", PROJECT_ROOT / "artifacts/demo")
        if not report.skipped:
            console.print(report)


@app.command()
def run(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    resume: Optional[str] = typer.Option(None, help="Resume this MLflow run id from its last checkpoint."),
    remote: Optional[str] = typer.Option(
        None, help="Trigger this deployment on the Prefect server instead of running here (see `alignflow deploy`)."
    ),
    wait: bool = typer.Option(False, help="With --remote: wait for the flow run to finish and report its state."),
) -> None:
    """Run the whole pipeline: data, reward model, baseline, PPO, evaluation, gates, registry."""
    run_config = resolved(config, set_)
    parameters = {"config_path": str(config) if config else None, "overrides": flow_overrides(set_, here=not remote),
                  "resume_run_id": resume}
    if remote:
        trigger_remote(remote, parameters, wait)
        return
    from components.model_safety import UnsafeModelError, check_run_models

    try:
        check_run_models(run_config, PROJECT_ROOT)  # no pickle-only checkpoint, no remote code: one line, before any work
    except UnsafeModelError as exc:
        fail(str(exc))
    prepare_demo_if_needed(run_config)
    from flows.pipeline import pipeline

    result = pipeline(**parameters)
    show_result(result, run_config)


def trigger_remote(deployment: str, parameters: dict, wait: bool) -> None:
    from prefect.deployments import run_deployment

    require_prefect_server()
    name = deployment if "/" in deployment else f"{PIPELINE_FLOW}/{deployment}"
    flow_run = run_deployment(name, parameters=parameters, timeout=None if wait else 0)
    console.print(f"flow run {flow_run.name} ({flow_run.id}) of {name}: {flow_run.state.name if flow_run.state else 'scheduled'}")
    if wait and not (flow_run.state and flow_run.state.is_completed()):
        fail(f"flow run {flow_run.id} ended {flow_run.state.name if flow_run.state else 'without a state'}", code=1)


PIPELINE_FLOW = "alignflow-pipeline"


@app.command()
def deploy(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 3 * * *".'),
    interval: Optional[int] = typer.Option(None, help="Interval schedule in seconds."),
    name: str = typer.Option("scheduled", help="Deployment name."),
    pool: str = typer.Option("alignflow-pool", help="Work pool whose workers run it (a process pool)."),
    concurrency_limit: Optional[int] = typer.Option(None, help="At most this many runs of it at once; later ones wait."),
) -> None:
    """Create (or update) the pipeline's deployment on the Prefect server, with its schedule and work pool."""
    resolved(config, set_)
    overrides = flow_overrides(set_, here=False)  # refused before anything reaches the server
    require_prefect_server()
    from prefect import flow as prefect_flow

    source = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/pipeline.py:pipeline")
    parameters = {"config_path": str(config) if config else None, "overrides": overrides}
    deployment_id = source.deploy(
        name=name, work_pool_name=pool, cron=cron, interval=interval, parameters=parameters, build=False, push=False,
        concurrency_limit=concurrency_limit, print_next_steps=False,
    )
    schedule = f"cron {cron!r}" if cron else f"every {interval} s" if interval else "no schedule"
    console.print(f"deployment {PIPELINE_FLOW}/{name} ({deployment_id}) on work pool {pool}, {schedule}")


def show_result(result, run_config) -> None:
    from components.tracking import resolve_tracking_uri

    table = Table(title="Baseline vs candidate (held-out prompts)")
    for column in ("metric", "baseline", "candidate"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key, base in result.baseline.items():
        name = key.split("/", 1)[1]
        cand = result.candidate.get(f"candidate/{name}")
        table.add_row(name, f"{base:.4f}", f"{cand:.4f}" if cand is not None else "-")
    table.add_row("kl_from_reference", "0", f"{result.candidate.get('candidate/kl') or 0:.4f}")
    console.print(table)
    gates = Table(title="Promotion gates")
    for column in ("gate", "value", "requirement", "result"):
        gates.add_column(column, justify="right" if column == "value" else "left")
    for row in result.gate_rows:
        gates.add_row(row["gate"], f"{row['value']:.4g}", escape(row["requirement"]), "[green]pass" if row["passed"] else "[bold red]FAIL")
    console.print(gates)
    colour = "green" if result.gates_passed else "red"
    console.print(f"gates: [{colour}]{result.gate_summary}[/]")
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    state = f"promoted to @{alias}" if result.promoted else f"not promoted (@{alias} unchanged)"
    console.print(f"stop reason: {result.stop_reason} after {result.episodes} episodes")
    console.print(f"registered [bold]{name}[/] version [bold]{result.model_version}[/]: {state}")
    uri = resolve_tracking_uri(run_config.tracking)
    console.print(f"MLflow run {result.run_id}; open the UI with:\n  mlflow ui --backend-store-uri {uri}"
                  if uri.startswith("sqlite") else f"MLflow run {result.run_id} at {uri}")


@app.command()
def serve(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 3 * * *".'),
    interval: Optional[int] = typer.Option(None, help="Interval schedule in seconds."),
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
        fail(f"the Prefect server at {url} {'refused PREFECT_API_AUTH_STRING' if auth else 'requires credentials'}: "
             "set PREFECT_API_AUTH_STRING to the team's Prefect API credential (infra/local-stack: source .stack/env; "
             "docker compose: PREFECT_AUTH_STRING in infra/.env)")


@app.command()
def runs(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, limit: int = typer.Option(10, "-n")) -> None:
    """Recent pipeline runs: status, stop reason, score gain, KL, gate result and model version."""
    from components import tracking

    run_config = resolved(config, set_)
    tracking.use_tracking(run_config.tracking)
    table = Table(title=f"Recent runs ({run_config.tracking.experiment})")
    for column in ("run id", "start", "status", "stop reason", "score gain", "KL", "gates", "version"):
        table.add_column(column)
    for row in refused_in_words(lambda: tracking.recent_runs(run_config.tracking.experiment, limit),
                                f"read the runs of experiment {run_config.tracking.experiment}"):
        gates = {None: "-", True: "[green]passed", False: "[red]failed"}[row["gates_passed"]]
        table.add_row(row["run_id"][:12], row["start_time"].strftime("%Y-%m-%d %H:%M"), row["status"], row["stop_reason"] or "-",
                      _num(row["reward_gain"]), _num(row["kl"]), gates, row["model_version"] or "-")
    console.print(table)


def refused_in_words(read, action: str):
    """`read()`, with MLflow's 401/403 said in one line (who, and what to set) instead of a traceback."""
    from mlflow.exceptions import MlflowException

    from components.access import explain

    try:
        return read()
    except MlflowException as exc:
        message = explain(exc, action, "it", "READ", "an MLflow admin can give the reader role (README, 'Run it for a team')")
        if message is None:
            raise
        fail(message)


def _num(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


@app.command()
def models(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Versions of the registered policy with their aliases and gate results."""
    from components import tracking

    run_config = resolved(config, set_)
    tracking.use_tracking(run_config.tracking)
    name = run_config.tracking.registered_model
    table = Table(title=f"Registered model {name}")
    for column in ("version", "aliases", "gates", "failed gates", "eval score", "KL", "data md5", "promoted by"):
        table.add_column(column)
    for version in refused_in_words(lambda: tracking.list_versions(name), f"read the versions of {name}"):
        tags = version.tags
        gates = {"true": "[green]passed", "false": "[red]failed"}.get(tags.get("gates_passed", ""), "-")
        table.add_row(str(version.version), ", ".join(version.aliases) or "-", gates, tags.get("gates_failed") or "-",
                      tags.get("eval_mean_score", "-")[:7], tags.get("eval_kl", "-")[:7], tags.get("data_md5", "-")[:10],
                      tags.get("promoted_by", "-"))
    console.print(table)


@app.command()
def promote(
    version: str,
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    force: bool = typer.Option(False, help="Promote a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the version's tags)."),
) -> None:
    """Make VERSION the champion; refuses a version that failed its gates unless --force --reason."""
    from components import tracking

    run_config = resolved(config, set_)
    tracking.use_tracking(run_config.tracking)
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    try:
        promoted = tracking.promote(name, version, alias, force=force, reason=reason)
    except tracking.PromotionError as exc:
        fail(str(exc) + (" (use --force --reason \"...\")" if not force else ""))
    except PermissionError as exc:  # components.access.RegistryPermissionError: MLflow's 403, in words
        fail(str(exc))
    console.print(f"{name} version {promoted.version} is now @{alias}")


@app.command()
def rollback(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the versions' tags)."),
) -> None:
    """Move the champion alias back to the previous champion."""
    from components import tracking

    run_config = resolved(config, set_)
    tracking.use_tracking(run_config.tracking)
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    try:
        restored = tracking.rollback(name, alias, reason=reason)
    except (tracking.PromotionError, PermissionError) as exc:  # PermissionError: MLflow's 403, in words
        fail(str(exc))
    console.print(f"{name} @{alias} is back on version {restored.version}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without a Prefect server, flows run on an ephemeral one whose start (database migrations included) can
    # take longer than Prefect's default 20 s on a busy small machine: give it 2 minutes unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
