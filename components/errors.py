"""The errors alignflow explains itself.

An `AlignflowError`'s message says what went wrong and what to do about it; a retry cannot fix it, so the flow's
tasks do not retry it, and the CLI prints the message alone (the traceback only with `--debug` and in the log file)
and exits with the error's `exit_code`. Anything else is a bug or an outage, and keeps its traceback.

A few errors of the libraries underneath have one cause a user can act on, and are explained here as if alignflow had
raised them (`explained`): a full disk under a file or the SQLite store (ENOSPC, SQLite's "database or disk is
full"), and a Prefect server that refuses a client without its API credential (401).
"""

from __future__ import annotations

import errno
import sqlite3
import sys
from pathlib import Path


class AlignflowError(Exception):
    """A failure explained by its message; exit code 1."""

    exit_code = 1


class UserError(AlignflowError):
    """Bad input the user must fix: a configuration key, a file and line, a model URI, a registry request, or a
    storage location that cannot take a checkpoint. The message names it. Exit code 2."""

    exit_code = 2


class TrainingError(AlignflowError, RuntimeError):
    """Training cannot go on (non-finite values, bad reward output), in either stage; raised before any optimizer step
    or checkpoint of the failing iteration, so the last good checkpoint is intact. A retry would meet it again."""


class DiskFull(UserError):
    """The disk under a file alignflow writes, or under the SQLite tracking store, is full."""


class PrefectCredentialsMissing(UserError):
    """The Prefect server answered 401: PREFECT_API_AUTH_STRING is missing or wrong."""


def explained(exc: BaseException | None) -> AlignflowError | None:
    """The AlignflowError `exc` is, or was raised from (through `raise ... from` or while handling one), if any; or
    the explanation of a library's error with one cause a user can act on (`translated`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AlignflowError):
            return exc
        translation = translated(exc)
        if translation is not None:
            return translation
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def translated(exc: BaseException) -> AlignflowError | None:
    """An AlignflowError for a library's error whose one cause the user can act on, or None."""
    return _disk_full(exc) or _prefect_refused(exc)


# --- a full disk ----------------------------------------------------------------------------------------------------

_SQLITE_FULL = 13  # SQLITE_FULL


def _disk_full(exc: BaseException) -> DiskFull | None:
    """ENOSPC writing a file, or SQLite's "database or disk is full" (raised by sqlite3, wrapped by SQLAlchemy in its
    OperationalError and by MLflow in an MlflowException, each `from` the one before)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f"under {exc.filename}" if exc.filename else "here"
        return DiskFull(f"no space left on the disk {where} (ENOSPC): free space there, then {_then_resume()}")
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError keeps the driver's error
    for error in (exc, orig):
        if isinstance(error, sqlite3.OperationalError) and (
                getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(error)):
            store = _sqlite_store()
            where = f"the SQLite store {store}" if store else "a SQLite database"
            return DiskFull(f"the disk under {where} is full (database or disk is full): free space there (the store "
                            f"is intact: SQLite rolled the write back), then {_then_resume()}")
    return None


def _sqlite_store() -> Path | None:
    """The SQLite file MLflow is pointed at, if MLflow is in use and its store is SQLite."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    try:
        uri = mlflow.get_tracking_uri()
    except Exception:  # noqa: BLE001 - naming the store is a courtesy
        return None
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _then_resume() -> str:
    """How to continue: resume the run MLflow was recording, when there was one, else run again."""
    run_id = _last_run_id()
    command = "alignflow reward run" if _command()[:2] == ["reward", "run"] else "alignflow run"
    if run_id:
        return f"resume with `{command} --resume {run_id}` (and the same --config/--set)"
    return "run the command again"


def _last_run_id() -> str | None:
    """The MLflow run this process is recording, or recorded last (MLflow remembers it after the run has ended)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    try:
        active = mlflow.active_run()
        if active is not None:
            return active.info.run_id
        from mlflow.tracking import fluent

        return fluent._last_active_run_id.get()
    except Exception:  # noqa: BLE001 - the hint is a courtesy
        return None


def _command() -> list[str]:
    return [arg for arg in sys.argv[1:] if not arg.startswith("-")]


# --- a Prefect server without its credential --------------------------------------------------------------------------


def prefect_credentials_message(url: str, auth_given: bool) -> str:
    """What a Prefect server that answers 401 means, in the README's words (`check_prefect_credentials`)."""
    return (f"the Prefect server at {url} {'refused PREFECT_API_AUTH_STRING' if auth_given else 'requires credentials'}: "
            "set PREFECT_API_AUTH_STRING to the team's Prefect API credential (infra/local-stack: source .stack/env; "
            "docker compose: PREFECT_AUTH_STRING in infra/.env)")


def _prefect_refused(exc: BaseException) -> PrefectCredentialsMissing | None:
    """A 401 from the Prefect API, as Prefect's client raises it."""
    exceptions = sys.modules.get("prefect.exceptions")
    if exceptions is None or not isinstance(exc, exceptions.PrefectHTTPStatusError):
        return None
    if exc.response.status_code != 401:
        return None
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    url = PREFECT_API_URL.value() or str(exc.request.url.copy_with(path="/", query=None))
    return PrefectCredentialsMissing(prefect_credentials_message(url, bool(PREFECT_API_AUTH_STRING.value())))


CONNECTION_TROUBLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection", "ConnectionError")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a server could not be reached after the client's own retries (MLflow's, bounded by the CLI:
    flows/cli MLFLOW_RETRIES)."""
    return any(sign in f"{type(exc).__name__}: {exc}" for sign in CONNECTION_TROUBLE)


def retryable(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task unless its error is one a retry cannot fix. An outage is
    retried (a server restarting); each try's own MLflow retries are bounded (flows/cli MLFLOW_RETRIES: about 30 s),
    so a train task's 3 tries end within about 2 minutes, and the first retry of each request is said at once."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the task's own exception, re-raised by the state
        return explained(exc) is None
    return True
