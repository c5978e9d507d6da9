"""The errors alignflow explains itself.

An `AlignflowError`'s message says what went wrong and what to do about it; a retry cannot fix it, so the flow's
tasks do not retry it, and the CLI prints the message alone (the traceback only with `--debug` and in the log file)
and exits with the error's `exit_code`. Anything else is a bug or an outage, and keeps its traceback.
"""

from __future__ import annotations


class AlignflowError(Exception):
    """A failure explained by its message; exit code 1."""

    exit_code = 1


class UserError(AlignflowError):
    """Bad input the user must fix: a configuration key, a file and line, a model reference, a registry request, or a
    storage location that cannot take a checkpoint. The message names it. Exit code 2."""

    exit_code = 2


def explained(exc: BaseException | None) -> AlignflowError | None:
    """The AlignflowError `exc` is, or was raised from (through `raise ... from` or while handling one), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AlignflowError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def retryable(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry a failed task unless its error is one a retry cannot fix."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the task's own exception, re-raised by the state
        return explained(exc) is None
    return True
