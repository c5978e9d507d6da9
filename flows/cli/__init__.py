"""The `alignflow` command: run, schedule, inspect and promote; plus config, data and demo helpers.

An error alignflow explains (`components.errors`: bad configuration, data, model reference, registry request,
storage) ends the command with its message alone and exit code 2 (1 for other explained failures); the traceback goes
to the log file under artifacts/logs/ and, with `--debug`, to the terminal. Anything else keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from components import secrets
from components.config import PROJECT_ROOT, ConfigError, load_config
from components.errors import explained

app = typer.Typer(help="alignflow: RLHF (PPO against a reward model) as a scheduled, auditable MLOps workflow.", no_args_is_help=True,
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
SetOption = typer.Option([], "--set", "-s", help="Override a setting, e.g. --set rl.learning_rate=1e-5 (repeatable).")
CronOption = typer.Option(None, help='Cron schedule, e.g. "0 3 * * *".')
IntervalOption = typer.Option(None, help="Interval schedule in seconds.")


LOG_DIR = Path(os.environ.get("ALIGNFLOW_LOG_DIR", PROJECT_ROOT / "artifacts" / "logs"))
_options = {"debug": False, "log_file": None}


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (always in the log file).")) -> None:
    """alignflow: RLHF (PPO against a reward model) as a scheduled, auditable MLOps workflow."""
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


def resolved(config: Optional[Path], overrides: list[str], schema: type | None = None):
    """The run configuration (`schema`: the policy pipeline's RunConfig, or RewardRunConfig); a renamed key or a secret
    in plain text gets one warning line each, before any error."""
    from components.config import ConfigDeprecation

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", secrets.PlaintextSecretWarning)
        warnings.simplefilter("always", ConfigDeprecation)
        try:
            run, problem = load_config(config, overrides, schema=schema), None
        except ConfigError as exc:
            run, problem = None, str(exc)
    for warning in caught:
        if issubclass(warning.category, (secrets.PlaintextSecretWarning, ConfigDeprecation)):
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


from flows.cli import data, plan, registry, reward, run  # noqa: E402,F401 - the commands register themselves on `app`
from flows.cli.run import show_result  # noqa: E402,F401


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
