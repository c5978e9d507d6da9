"""The `alignflow` command: run, schedule, inspect and promote; plus config, data and demo helpers.

An error alignflow explains (`components.errors`: bad configuration, data, model reference, registry request,
storage) ends the command with its message alone and exit code 2 (1 for other explained failures); the traceback goes
to the log file under artifacts/logs/ and, with `--debug`, to the terminal. Anything else keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from components.config import PROJECT_ROOT, ConfigError, load_config
from components.errors import explained

app = typer.Typer(help="alignflow: RLHF with PPO as a scheduled, auditable MLOps workflow.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the run configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Check the dataset a run reads, against the .dvc file that pins it.", no_args_is_help=True)
demo_app = typer.Typer(help="The offline demo kit (the embedded default).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")

# Piped output (logs, CI, tests) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOption = typer.Option(None, "--config", "-c", help="Run configuration (YAML). Default: configs/demo.yaml.")
SetOption = typer.Option([], "--set", "-s", help="Override a setting, e.g. --set ppo.learning_rate=1e-5 (repeatable).")


LOG_DIR = Path(os.environ.get("ALIGNFLOW_LOG_DIR", PROJECT_ROOT / "artifacts" / "logs"))
_options = {"debug": False, "log_file": None}


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (always in the log file).")) -> None:
    """alignflow: RLHF with PPO as a scheduled, auditable MLOps workflow."""
    _options["debug"] = debug


def explain_errors(command):
    """An error alignflow explains ends the command with its message and exit code; the traceback goes to the log
    file, and to the terminal with --debug."""

    @functools.wraps(command)
    def run_command(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            error = explained(exc)
            if error is None:
                raise
            logging.getLogger("alignflow").error("%s", error, exc_info=exc)
            if _options["debug"]:
                traceback.print_exception(exc)
            errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            if _options["log_file"]:
                errors.print(f"(details: {_options['log_file']}; --debug shows the traceback)", style="dim",
                             highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return run_command


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolved(config: Optional[Path], overrides: list[str]):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))


@config_app.command("show")
@explain_errors
def config_show(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Print the resolved configuration (YAML), after overrides and defaults."""
    console.print(resolved(config, set_).to_yaml(), highlight=False, soft_wrap=True)


@data_app.command("check")
@explain_errors
def data_check(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Check the dataset a run would read against its .dvc file, and report every row left out or shortened (to
    generation.max_prompt_tokens, counted with the policy's tokenizer) by row number."""
    from components.data import prepare
    from components.models import load_tokenizer, locate
    from components.ppo.rollout import prompt_ids
    from components.versioning import dataset_version

    run = resolved(config, set_)
    if run.data.source.startswith("data/demo"):
        ensure_demo_data()
    version = dataset_version(run.data, PROJECT_ROOT)
    tokenizer = load_tokenizer(locate("policy.model", run.policy.model, run.policy.revision), run.policy.revision)
    chat = run.policy.use_chat_template
    prepared = prepare(run.data, run.generation, lambda prompt: len(prompt_ids(tokenizer, [prompt], chat)[0]), run.seed,
                       PROJECT_ROOT)
    pinned = f"pinned by {version.dvc_file}" if version.versioned else "[yellow]not versioned by DVC[/] (data.check_dvc: false)"
    console.print(f"dataset [bold]{escape(version.name)}[/] ({escape(version.source)}): md5 of the bytes read "
                  f"[bold]{version.md5}[/], {pinned}")
    console.print(escape(prepared.summary), highlight=False)
    console.print(f"{len(prepared.train_prompts)} training prompts, {len(prepared.eval_prompts)} held out (data.eval_size)")


@demo_app.command("data")
@explain_errors
def demo_data(out: Path = typer.Option(PROJECT_ROOT / "data/demo", help="Where to write the demo datasets."), seed: int = 0) -> None:
    """Regenerate the demo datasets exactly (the same seed gives the bytes data.dvc pins)."""
    from components.demo.domain import generate_demo_data

    files = generate_demo_data(out, seed=seed)
    for name, path in files.items():
        console.print(f"wrote {name}: {path}")


@demo_app.command("bootstrap")
@explain_errors
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
    """Generate the demo data when it is missing (a fresh clone); it must then match what data.dvc pins."""
    from components.config import DataConfig
    from components.demo.domain import generate_demo_data
    from components.versioning import dataset_version

    if not data_dir.exists():
        console.print(f"{data_dir} is missing: regenerating the demo data (seed 0)")
        generate_demo_data(data_dir, seed=0)
    dataset_version(DataConfig(source=str(data_dir.relative_to(PROJECT_ROOT))), PROJECT_ROOT)


def prepare_demo_if_needed(run) -> None:
    """The embedded default brings its own world: data regenerated and models bootstrapped if missing."""
    from components.demo.bootstrap import bootstrap

    if run.policy.model.startswith("artifacts/demo") or run.reward.model.startswith("artifacts/demo"):
        ensure_demo_data()
        report = bootstrap(PROJECT_ROOT / "data/demo", PROJECT_ROOT / "artifacts/demo")
        if not report.skipped:
            console.print(report)


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
    """Run the whole pipeline: data, reward model, baseline, PPO, evaluation, gates, registry."""
    run_config = resolved(config, set_)
    parameters = {"config_path": str(config) if config else None, "overrides": list(set_), "resume_run_id": resume}
    if remote:
        trigger_remote(remote, parameters, wait)
        return
    if resume:
        from components.tracking import find_run

        find_run(run_config.tracking, resume)  # an unknown id fails here, naming the store
    prepare_demo_if_needed(run_config)
    from flows.pipeline import pipeline

    with prefect_api():
        result = pipeline(**parameters)
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
            yield
    finally:
        server.stop()


def _die_with_parent() -> None:
    """In a child before it runs its program: the kernel sends it SIGTERM when its parent dies (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


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
@explain_errors
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
    require_prefect_server()
    from prefect import flow as prefect_flow

    source = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/pipeline.py:pipeline")
    parameters = {"config_path": str(config) if config else None, "overrides": list(set_)}
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
    console.print(f"gates: [{colour}]{escape(result.gate_summary)}[/]")
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    state = f"promoted to @{alias}" if result.promoted else f"not promoted (@{alias} unchanged)"
    console.print(f"stop reason: {result.stop_reason} after {result.episodes} episodes")
    console.print(f"registered [bold]{name}[/] version [bold]{result.model_version}[/]: {state}")
    uri = resolve_tracking_uri(run_config.tracking)
    console.print(f"MLflow run {result.run_id}; open the UI with:\n  mlflow ui --backend-store-uri {uri}"
                  if uri.startswith("sqlite") else f"MLflow run {result.run_id} at {uri}")


@app.command()
@explain_errors
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

    parameters = {"config_path": str(config) if config else None, "overrides": list(set_)}
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
    return url


@app.command()
@explain_errors
def runs(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, limit: int = typer.Option(10, "-n")) -> None:
    """Recent pipeline runs: status, stop reason, score gain, KL, gate result and model version. With --config (or
    --set), the runs of its experiment; without, the runs of every experiment of the tracking store."""
    from components import tracking

    run_config = resolved(config, set_)
    uri = tracking.use_tracking(run_config.tracking)
    experiment = run_config.tracking.experiment if (config or set_) else None
    title = f"Recent runs of experiment {experiment}" if experiment else \
        "Recent runs of every experiment (--config F shows the runs of F's experiment)"
    table = Table(title=f"{title}, {uri}")
    columns = ("run id", "start", "status", "stop reason", "score gain", "KL", "gates", "version")
    for column in (() if experiment else ("experiment",)) + columns:
        table.add_column(column)
    for row in tracking.recent_runs(experiment, limit):
        gates = {None: "-", True: "[green]passed", False: "[red]failed"}[row["gates_passed"]]
        cells = (row["run_id"][:12], row["start_time"].strftime("%Y-%m-%d %H:%M"), row["status"], row["stop_reason"] or "-",
                 _num(row["reward_gain"]), _num(row["kl"]), gates, row["model_version"] or "-")
        table.add_row(*((() if experiment else (escape(row["experiment"]),)) + cells))
    console.print(table)


def _num(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


@app.command()
@explain_errors
def models(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Versions of the registered policy with their aliases, gate results, and the reward model and data behind each.
    With --config (or --set), its registered model; without, every registered model of the store. A score from
    another reward model than the champion's (or the newest version's) is marked: scores of different reward models
    are not comparable."""
    from components import registry, tracking

    run_config = resolved(config, set_)
    uri = tracking.use_tracking(run_config.tracking)
    names = [run_config.tracking.registered_model] if (config or set_) else registry.registered_models()
    for name in names:
        versions = registry.list_versions(name)
        reference = next((v for v in versions if run_config.tracking.champion_alias in v.aliases), versions[0] if versions else None)
        scorer = reference.tags.get("reward_model") if reference else None
        table = Table(title=f"Registered model {name}, {uri}" + ("" if (config or set_) else " (--config F shows F's model)"))
        for column in ("version", "aliases", "gates", "failed gates", "eval score", "KL", "reward model", "data", "promoted by"):
            table.add_column(column)
        mismatched = False
        for version in versions:
            tags = version.tags
            gates = {"true": "[green]passed", "false": "[red]failed"}.get(tags.get("gates_passed", ""), "-")
            score = tags.get("eval_mean_score", "-")[:7]
            if tags.get("reward_model") != scorer:
                score, mismatched = f"{score} [yellow]*[/]", True
            data = f"{tags.get('data_name', '?')} {tags.get('data_md5', '-')[:8]}"
            table.add_row(str(version.version), ", ".join(version.aliases) or "-", gates, tags.get("gates_failed") or "-",
                          score, tags.get("eval_kl", "-")[:7], escape(tags.get("reward_model", "-")), escape(data),
                          tags.get("promoted_by", "-"))
        console.print(table)
        if mismatched:
            console.print(f"[yellow]*[/] scored by another reward model than {escape(str(scorer))} (the "
                          f"{'champion' if reference and run_config.tracking.champion_alias in reference.aliases else 'newest version'}"
                          "'s): not comparable with the other scores")
    if not names:
        console.print(f"no registered models in {uri}")


@app.command()
@explain_errors
def promote(
    version: str,
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    force: bool = typer.Option(False, help="Promote a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the version's tags)."),
) -> None:
    """Make VERSION the champion; refuses a version that failed its gates unless --force --reason. Takes the same lock
    as the pipeline's promotions, so promotions at the same time keep one champion and a consistent chain."""
    from flows import promotion

    run_config = resolved(config, set_)
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    with prefect_api() if promotion.needs_prefect_server(run_config) else contextlib.nullcontext():
        moved, why = promotion.promote(run_config, version, force=force, reason=reason)
    console.print(f"{name}: {why}" if moved else f"{name}: {why}; @{alias} unchanged")


@app.command()
@explain_errors
def rollback(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the versions' tags)."),
) -> None:
    """Move the champion alias back to the previous champion."""
    from flows import promotion

    run_config = resolved(config, set_)
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    with prefect_api() if promotion.needs_prefect_server(run_config) else contextlib.nullcontext():
        restored = promotion.rollback(run_config, reason=reason)
    console.print(f"{name} @{alias} is back on version {restored.version}")


class _WithoutExplainedTracebacks(logging.Formatter):
    """Wraps a console handler's formatter: an error alignflow explains is logged by its message, without the traceback
    (which the log file keeps)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and explained(record.exc_info[1]) is not None):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _setup_logging(argv: list[str]) -> Path | None:
    """A log file for this command (every record, tracebacks included) and console handlers that leave out the
    traceback of explained errors unless --debug."""
    import prefect  # noqa: F401 - configures its logging, whose console handler is wrapped here

    if "--debug" not in argv:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setFormatter(_WithoutExplainedTracebacks(handler.formatter))
    command = next((a for a in argv if not a.startswith("-")), "alignflow")
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
        handler = logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(min(logging.getLogger().level or logging.INFO, logging.INFO))
    return path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without a Prefect server, flows run on a temporary one whose start (database migrations included) can
    # take longer than Prefect's default 20 s on a busy small machine: give it 2 minutes unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    _options["log_file"] = _setup_logging(argv)
    try:
        code = app(argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        errors.print("aborted")
        sys.exit(1)
    except typer.TyperException as exc:  # click's usage errors: bad options, missing arguments, help
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))



if __name__ == "__main__":
    main()
