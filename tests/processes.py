"""Real processes, for the tests that kill a run and resume it.

`cli_in_child(argv)` runs `alignflow ARGV` (flows.cli.main, the console script's own function) in a child process
forked from a server process that imported alignflow and its libraries once, so each run costs no import time; the
child can be SIGKILLed like any process (ALIGNFLOW_CRASH_AT, components/faults.py). `alignflow(argv)` runs the
installed command itself, for what only the real executable shows (exit codes, stderr, orphaned servers).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "transformers", "mlflow", "prefect", "flows.cli", "flows.pipeline", "processes"])


def _main(argv: list[str], env: dict[str, str], prefect_api_url: str | None) -> None:
    os.environ.update(env)
    import torch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    torch.set_num_threads(1)  # tiny models are op-overhead bound, and several children may run at once
    from flows.cli import main

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        main(argv)


def cli_in_child(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> int:
    """The exit code of `alignflow ARGV` run in a child process against this session's Prefect API (-9: SIGKILL)."""
    from prefect.settings import PREFECT_API_URL

    process = _CONTEXT.Process(target=_main, args=(list(argv), dict(env or {}), PREFECT_API_URL.value()))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"alignflow {' '.join(argv)} did not end within {timeout} s")
    return process.exitcode


def alignflow_executable() -> str:
    return shutil.which("alignflow") or str(Path(sys.executable).parent / "alignflow")


def alignflow(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed `alignflow` command, run to its end; its output captured."""
    return subprocess.run([alignflow_executable(), *argv], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
