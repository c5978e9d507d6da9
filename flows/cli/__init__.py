"""The `alignflow` command: run, schedule, inspect and promote; plus config, data and demo helpers.

An error alignflow explains (`components.errors`: bad configuration, data, model URI, registry request,
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

from components.security import secrets
from components.config import PROJECT_ROOT, ConfigError, load_config
from components.errors import explained

app = typer.Typer(help="alignflow: RLHF (PPO, RLOO, GRPO or REINFORCE++ against a reward model) as a scheduled, "
                  "auditable MLOps workflow.", no_args_is_help=True,
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
    """alignflow: RLHF (PPO, RLOO, GRPO or REINFORCE++ against a reward model) as a scheduled, auditable MLOps
    workflow."""
    _options["debug"] = debug


def explain_errors(command):
    """An error alignflow explains ends the command with its message and exit code; the traceback goes to the log
    file, and to the terminal with --debug."""

    @functools.wraps(command)
    def run_command(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            secrets.redact_exception(exc)  # its message, the log file's traceback, --debug's: without credentials
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
    errors.print(f"[bold red]error:[/] {escape(secrets.redact_text(message))}", highlight=False, soft_wrap=True)
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


def reachable_tracking(run_config, timeout_s: float = 5.0):
    """`run_config`, once its MLflow tracking server (an http(s) tracking URI) has answered one request within
    `timeout_s`; else the command ends at once with one line naming the URI and where it came from, instead of after
    MLflow's retries (minutes) and a traceback. Any HTTP answer counts (a 401 is explained by the request that gets
    it); a local store (SQLite, files) is not probed."""
    import httpx

    from components.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(run_config.tracking)
    if not uri.startswith(("http://", "https://")):
        return run_config
    origin = "tracking.tracking_uri" if run_config.tracking.tracking_uri else "MLFLOW_TRACKING_URI"
    shown = secrets.redact_text(uri)
    # TLS as MLflow's client does it: its CA bundle, or no verification where MLflow is told to skip it.
    verify = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        import ssl

        try:
            verify = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
        except (OSError, ssl.SSLError) as exc:
            fail(f"MLFLOW_TRACKING_SERVER_CERT_PATH: cannot read {os.environ['MLFLOW_TRACKING_SERVER_CERT_PATH']} as "
                 f"a CA bundle ({exc})")
    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s, follow_redirects=True, verify=verify)
    except httpx.TimeoutException:
        fail(f"{origin}: the MLflow tracking server at {shown} did not answer within {timeout_s:.0f} s: start it, or "
             f"point {origin} at a running one")
    except httpx.HTTPError as exc:
        fail(f"{origin}: the MLflow tracking server at {shown} cannot be reached ({type(exc).__name__}: "
             f"{secrets.redact_text(str(exc))}): start it, or point {origin} at a running one")
    return run_config


# MLflow's own retries of a request to a tracking server that does not answer, for the CLI's process (and the flows it
# runs) unless the environment says otherwise: 4 retries 0, 4, 8 and 16 s apart (about 30 s, where MLflow's defaults,
# 7 retries up to 120 s apart, take about 250 s; Prefect's task retries repeat them), each try waiting at most 30 s.
MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def bound_mlflow_retries() -> None:
    """Set MLflow's retry settings (MLFLOW_RETRIES) where the environment leaves them unset."""
    for name, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(name, value)


def retry_budget() -> tuple[int, float, float]:
    """(retries, seconds spent waiting between tries, seconds each try may wait for an answer) of a request MLflow
    retries, as the environment sets them (urllib3 waits nothing before the first retry, then factor x 2^(n-1) at
    most 120 s, plus up to the jitter)."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "1"))
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    return retries, sum(min(120.0, factor * 2 ** (n - 1)) + jitter for n in range(2, retries + 1)), timeout


class _RetryNotice(logging.Handler):
    """One line on the terminal as soon as a request to a server (MLflow's, through urllib3) fails and is retried: which
    server, why, and for how long at most, instead of minutes of silence. Each retry after it goes to the log file."""

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.args, tuple) or len(record.args) < 2:
            return
        retry, error = record.args[0], record.args[1]
        if len(getattr(retry, "history", ()) or ()) != 1:  # the first retry of this request only
            return
        where = getattr(error, "conn", None) or getattr(error, "pool", None)
        server = (f"{getattr(where, 'scheme', 'http')}://{where.host}:{where.port}" if getattr(where, "host", None)
                  else "a server")
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:
            try:
                tracking = mlflow.get_tracking_uri()
            except Exception:  # noqa: BLE001 - naming the server is a courtesy
                pass
        if tracking.startswith(("http://", "https://")) and where is not None and f"{where.host}" in tracking:
            server = f"the MLflow tracking server at {secrets.redact_text(tracking)}"
        reason = getattr(error, "reason", None) or error
        retries, waits, timeout = retry_budget()
        errors.print(f"[yellow]warning:[/] {escape(server)} does not answer ({escape(_short_reason(reason))}): retrying "
                     f"{retries} times over about {waits:.0f} s, each try waiting up to {timeout:.0f} s for an answer "
                     "(MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_TIMEOUT)",
                     highlight=False, soft_wrap=True)


def _short_reason(reason) -> str:
    text = str(reason)
    return text.split(": ", 1)[-1] if "Failed to establish" in text or "object at 0x" in text else text


def missing_deployment(name: str, url: str) -> str | None:
    """Why the Prefect server at `url` has no deployment `name` (FLOW/DEPLOYMENT), naming those it has; None when it
    has one of that name (the ObjectNotFound was about something else)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        known = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
    if name in known:
        return None
    if not known:
        return (f"no deployment {name} on the Prefect server at {url}, which has no deployments: create one with "
                "`alignflow deploy` (or `alignflow reward deploy`), or `prefect deploy` from prefect.yaml")
    flow_name = name.split("/", 1)[0]
    same_flow = [k for k in known if k.split("/", 1)[0] == flow_name]
    return (f"no deployment {name} on the Prefect server at {url}; it has {', '.join(known)}"
            + (f" (of {flow_name}: {', '.join(k.split('/', 1)[1] for k in same_flow)})" if same_flow and len(same_flow) < len(known) else ""))


def flow_overrides(overrides: list[str], *, here: bool) -> list[str]:
    """`--set` overrides as Prefect flow-run parameters, which the Prefect server stores and shows: without secrets
    (components/security/secrets.py). A flow that runs in this process gets them through this process's environment
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
    notice = _RetryNotice(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").addHandler(notice)
    quiet = _QuietExplained(debug="--debug" in argv)
    for name in _LIBRARY_LOGGERS_WITH_TRACEBACKS:
        logging.getLogger(name).addFilter(quiet)
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
    quiet.log_file = handler
    return path


# Loggers of libraries that log an error with its traceback on their own handler (which does not propagate to the log
# file) before raising it: MLflow's SQL store logs every database error so (a full disk: hundreds of lines).
_LIBRARY_LOGGERS_WITH_TRACEBACKS = ("mlflow.store.db.utils",)


class _QuietExplained(logging.Filter):
    """On a library's logger: a record of an error alignflow explains goes to the log file only (the command ends with
    the explanation); with --debug, to the terminal too."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug
        self.log_file: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug or not (record.exc_info and explained(record.exc_info[1]) is not None):
            return True
        if self.log_file is not None:
            self.log_file.handle(record)
        return False


from flows.cli import data, plan, registry, reward, run  # noqa: E402,F401 - the commands register themselves on `app`
from flows.cli.run import show_result  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without a Prefect server, flows run on a temporary one whose start (database migrations included) can
    # take longer than Prefect's default 20 s on a busy small machine: give it 2 minutes unless told otherwise.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    bound_mlflow_retries()
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
