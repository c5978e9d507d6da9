"""Issue 24, the units: errors of the libraries underneath that `explained` says in one line (a full disk, a Prefect
server without its credential), the CLI's probe of the tracking server and its bound on MLflow's retries, the memory
plan's refusal of sizes no run can have, the gold scorers a configuration may name, and the demo data's lock."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import typer
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.config import ConfigError, RunConfig, TrackingConfig, apply_overrides
from components.errors import UserError, explained, retryable


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a full disk (item 5) --------------------------------------------------------------------------------------------


def full_store(tmp_path: Path) -> tuple[MlflowClient, str]:
    """A real MLflow SQLite store whose database may not grow by one page more (SQLite's max_page_count: the same
    SQLITE_FULL, "database or disk is full", as a full disk), and a run in it."""
    from sqlalchemy import event

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("full"))
    engine = client._tracking_client.store.engine

    @event.listens_for(engine, "connect")
    def _no_more_pages(connection, _record):
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()  # every connection from now on is capped
    return client, run.info.run_id


def fill(client: MlflowClient, run_id: str) -> MlflowException:
    from mlflow.entities import Metric

    metrics = [Metric(f"m{i}", float(i), 0, 0) for i in range(1000)]
    with pytest.raises(MlflowException) as caught:
        for step in range(100):
            client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, step) for m in metrics])
    return caught.value


def test_a_full_disk_under_the_sqlite_store_is_one_line_naming_the_store_and_the_resume(tmp_path, monkeypatch):
    client, run_id = full_store(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["alignflow", "run"])
    try:
        mlflow.start_run(run_id=run_id)
        failure = fill(client, run_id)
        # as MLflow raises it: MlflowException from SQLAlchemy's OperationalError from sqlite3's
        assert "database or disk is full" in str(failure)
        error = explained(failure)
        assert isinstance(error, UserError) and error.exit_code == 2
        assert str(error) == (
            f"the disk under the SQLite store {tmp_path}/mlflow.db is full (database or disk is full): free space there "
            f"(the store is intact: SQLite rolled the write back), then resume with `alignflow run --resume {run_id}` "
            "(and the same --config/--set)")
        mlflow.end_run()  # ended (as the pipeline ends a failed run): MLflow still knows which run it was
        assert f"--resume {run_id}" in str(explained(failure))
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_a_full_disk_before_any_run_names_the_store_and_says_to_run_again(tmp_path, monkeypatch):
    client, run_id = full_store(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    from mlflow.tracking import fluent

    monkeypatch.setattr(fluent, "_last_active_run_id", type(fluent._last_active_run_id)(default_factory=lambda: None))
    try:
        error = explained(fill(client, run_id))
        assert str(error).startswith(f"the disk under the SQLite store {tmp_path}/mlflow.db is full")
        assert str(error).endswith("then run the command again") and "\n" not in str(error)
    finally:
        mlflow.set_tracking_uri(None)


def test_enospc_writing_a_file_is_explained_and_not_retried():
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "w") as handle:  # a real ENOSPC on every write
            handle.write("x")
    assert caught.value.errno == errno.ENOSPC
    error = explained(caught.value)
    assert isinstance(error, UserError) and "no space left on the disk here (ENOSPC): free space there, then" in str(error)

    class Failed:
        def result(self):
            raise caught.value

    assert retryable(None, None, Failed()) is False  # a retry cannot free the disk


# --- the tracking server, probed once; MLflow's retries bounded and said (item 4) ----------------------------------


def test_an_unreachable_tracking_server_fails_in_seconds_naming_the_uri(capsys, monkeypatch):
    from flows.cli import reachable_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{closed_port()}"
    config = RunConfig(tracking=TrackingConfig(tracking_uri=uri))
    start = time.monotonic()
    with pytest.raises(typer.Exit) as exit_:
        reachable_tracking(config)
    assert exit_.value.exit_code == 2 and time.monotonic() - start < 5
    printed = capsys.readouterr().err
    assert f"error: tracking.tracking_uri: the MLflow tracking server at {uri} cannot be reached (ConnectError" in printed
    assert printed.count("\n") == 1

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where the URI came from is what it names
    with pytest.raises(typer.Exit):
        reachable_tracking(RunConfig())
    assert f"error: MLFLOW_TRACKING_URI: the MLflow tracking server at {uri} cannot be reached" in capsys.readouterr().err

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(typer.Exit):
            reachable_tracking(RunConfig(tracking=TrackingConfig(tracking_uri=uri)), timeout_s=1)
    assert f"the MLflow tracking server at {uri} did not answer within 1 s" in capsys.readouterr().err

    local = RunConfig(tracking=TrackingConfig(tracking_uri="sqlite:////nowhere/mlflow.db"))
    assert reachable_tracking(local) is local  # a local store is not probed


def test_mlflow_retries_are_bounded_for_the_cli_and_the_first_retry_is_said_at_once(capsys, monkeypatch):
    import logging

    from flows.cli import MLFLOW_RETRIES, _RetryNotice, bound_mlflow_retries, retry_budget

    for name in MLFLOW_RETRIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # what the environment sets wins
    bound_mlflow_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    retries, waits, timeout = retry_budget()
    assert (retries, timeout) == (4, 7.0) and 28 <= waits <= 31  # 0, 4, 8 and 16 s (+ jitter); MLflow's own: ~250 s

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    uri = f"http://127.0.0.1:{closed_port()}"
    notice = _RetryNotice(logging.WARNING)
    logger = logging.getLogger("urllib3.connectionpool")
    logger.addHandler(notice)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(MlflowException):
            MlflowClient().search_experiments()
    finally:
        logger.removeHandler(notice)
        mlflow.set_tracking_uri(None)
    printed = capsys.readouterr().err
    assert printed.count("warning:") == 1, printed  # the first retry only
    assert (f"warning: the MLflow tracking server at {uri} does not answer (Failed to establish a new connection: "
            "[Errno 111] Connection refused): retrying 2 times over about 0 s") in printed


# --- sizes no run can have (item 2) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("generation.max_new_tokens=1000000000000", "generation.max_new_tokens: 1000000000000 is beyond any run"),
    (f"rl.rollout_batch_size={10**400}", "rl.rollout_batch_size: about 10**400 is beyond any run"),
    ("memory.device_memory_gb=.inf", "memory.device_memory_gb: inf GB is not a device's memory"),
])
def test_the_memory_plan_refuses_sizes_no_run_can_have_naming_the_key(override, message):
    from components.models.memory_plan import MemoryPlanError, check_sizes

    config = apply_overrides(RunConfig(), [override, "rl.mini_batch_size=1"])
    with pytest.raises(MemoryPlanError, match=message.replace("*", r"\*")) as caught:
        check_sizes(config)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_a_model_config_no_model_can_have_is_refused_naming_its_key(tmp_path):
    import json

    from components.models.memory_plan import MemoryPlanError, shape_of
    from support import save_tiny_lm

    folder = save_tiny_lm(tmp_path / "huge")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 10**12}))
    with pytest.raises(MemoryPlanError, match=rf"policy.model: the config of {folder} gives sizes no model can have: "
                                              r"n_embd=1000000000000 \(at most 16777216\)"):
        shape_of(str(folder), "policy.model")
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 0}))
    with pytest.raises(MemoryPlanError, match=rf"policy.model: cannot size the model of {folder} from its config"):
        shape_of(str(folder), "policy.model")


# --- the gold scorer a configuration may name (item 8) --------------------------------------------------------------


@pytest.mark.parametrize("spec", ["os:system", "subprocess:run", "builtins:eval", "components.data.prompts:_text_lines",
                                  "components._private:f", "componentsx.evil:f"])
def test_a_gold_scorer_outside_the_project_is_refused_naming_the_key(spec):
    from components.evaluation.policy import load_gold_scorer

    with pytest.raises(ConfigError, match=r"evaluation.gold_scorer: .*not a gold scorer alignflow may import"):
        apply_overrides(RunConfig(), [f"evaluation.gold_scorer={spec}"])
    with pytest.raises(ConfigError, match=r"evaluation.gold_scorer: "):  # and not imported, whoever calls it
        load_gold_scorer(spec)


def test_a_gold_scorer_of_the_project_loads_and_one_it_only_imports_does_not():
    from components.demo.gold import gold_score, is_gold_positive
    from components.evaluation.policy import load_gold_scorer

    assert load_gold_scorer("components.demo.gold:is_gold_positive") is is_gold_positive
    assert load_gold_scorer("components.demo:gold_score") is gold_score  # re-exported inside the project
    for imported in ("components.data.versioning:hashlib", "components.tracking.runs:os"):  # modules a project module imports
        with pytest.raises(ConfigError, match=r"is not a function of this project's own packages"):
            load_gold_scorer(imported)


# --- the demo data's lock (item 9) -----------------------------------------------------------------------------------


def test_alignflow_demo_data_writes_under_the_demo_data_lock(tmp_path):
    from support import alignflow_executable

    from flows.cli.data import demo_data_lock, demo_data_lock_path

    out = tmp_path / "demo"
    lock = demo_data_lock_path(out)
    with demo_data_lock(out):
        writer = subprocess.Popen([alignflow_executable(), "demo", "data", "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and writer.poll() is None and not out.exists() and not holds(writer.pid, lock):
                time.sleep(0.1)
            time.sleep(1)  # waiting on the lock, not about to write
            assert writer.poll() is None and not out.exists(), "alignflow demo data wrote while the lock was held"
        except BaseException:
            writer.kill()
            raise
    _, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["preferences.jsonl", "prompts.jsonl", "sft.jsonl"]


def holds(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (it then waits on the lock)."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
