"""A credential in `data.source` reaches none of the Prefect server's records: a real pipeline run, then a search of
every text in the temporary Prefect server's database (state messages, events, logs, parameters, task runs) for the
token, as the MLflow records are searched in tests/code/test_secrets.py."""

from __future__ import annotations

import http.server
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

from components.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

TOKEN = "SECRETTOKEN-4f2a9c"
TINY = {"rl": {"rollout_batch_size": 8, "mini_batch_size": 4, "update_epochs": 1, "total_episodes": 16},
        "critic": {"type": "shared"}, "generation": {"max_new_tokens": 8}, "evaluation": {"bootstrap_samples": 50}}


@pytest.fixture
def prompts_server():
    """The demo prompts, served over HTTP on the loopback interface: `http://127.0.0.1:PORT/prompts.jsonl`."""
    body = (PROJECT_ROOT / "data" / "demo" / "prompts.jsonl").read_bytes()

    class Prompts(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path.endswith("/prompts.jsonl") else 404)
            self.end_headers()
            self.wfile.write(body if self.path.endswith("/prompts.jsonl") else b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Prompts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_with_source(source: str, tmp_path: Path, tiny_lm_dir: Path, tiny_reward_dir: Path, **data):
    """The pipeline run of a config file whose data.source is `source`: its final state (Completed or Failed), and
    the texts it added to the Prefect database (by `table.column`; the session's other runs share the database)."""
    from flows.pipeline import pipeline

    config = {**TINY, "data": {"source": source, "eval_size": 8, **data}, "policy": {"model": str(tiny_lm_dir)},
              "reward": {"model": str(tiny_reward_dir), "max_length": 128}, "checkpoint": {"dir": str(tmp_path / "checkpoints"), "every": 2},
              "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    path = tmp_path / "with-token.yaml"
    path.write_text(yaml.safe_dump(config))
    before = prefect_records()
    state = pipeline(config_path=str(path), return_state=True)
    after = prefect_records(state.state_details.flow_run_id)
    known = {where: set(texts) for where, texts in before.items()}
    return state, {where: [text for text in texts if text not in known.get(where, ())] for where, texts in after.items()}


def prefect_records(flow_run_id=None) -> dict[str, list[str]]:
    """Every text of the temporary Prefect server's database, by `table.column`, once the logs and events are sent
    and the end of the flow run `flow_run_id` is recorded."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    database = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]
    deadline = time.monotonic() + 20
    while True:  # the server writes events a moment after it receives them
        with sqlite3.connect(database) as db:
            texts: dict[str, list[str]] = {}
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                columns = [row[1] for row in db.execute(f"PRAGMA table_info('{table}')")]
                for row in db.execute(f"SELECT * FROM '{table}'"):
                    for column, value in zip(columns, row):
                        if isinstance(value, (str, bytes)):
                            text = value.decode(errors="replace") if isinstance(value, bytes) else value
                            texts.setdefault(f"{table}.{column}", []).append(text)
        run_events = [t for t in texts.get("events.resource", []) if f"prefect.flow-run.{flow_run_id}" in t]
        if flow_run_id is None or time.monotonic() > deadline or any(
                '"prefect.state-type": "COMPLETED"' in t or '"prefect.state-type": "FAILED"' in t for t in run_events):
            return texts
        time.sleep(0.5)


def assert_no_token(texts: dict[str, list[str]], flow_run_id) -> None:
    """The run's records are there (states, task runs, events, logs), and the token is in none of them."""
    assert any(str(flow_run_id) in text for text in texts.get("flow_run_state.flow_run_id", [])), "no state of the run"
    # (events are checked by their resource, which names the run: an event's name repeats an earlier run's)
    assert any(f"prefect.flow-run.{flow_run_id}" in text for text in texts.get("events.resource", [])), "no event of the run"
    assert texts.get("task_run.name") and texts.get("log.message"), sorted(texts)
    found = {where: [text[:300] for text in values if TOKEN in text] for where, values in texts.items()}
    assert not {where: hits for where, hits in found.items() if hits}, "the token is in the Prefect database"


def test_a_credential_in_a_data_url_reaches_no_prefect_record_when_the_run_fails(demo_data_dir, prompts_server, tiny_lm_dir,
                                                                                   tiny_reward_dir, tmp_path):
    """A URL whose data the pipeline does not read fails the run: the failure (the task's and the flow's state
    messages, their events, the log of it, the exception the caller gets) says so without the token."""
    source = f"http://user:{TOKEN}@{prompts_server}/prompts.jsonl"
    state, records = run_with_source(source, tmp_path, tiny_lm_dir, tiny_reward_dir)
    assert state.is_failed() or state.is_completed(), state
    assert_no_token(records, state.state_details.flow_run_id)
    if state.is_failed():  # the message says what failed, and the caller gets the exception, both without the token
        assert "data.source" in state.message and TOKEN not in state.message, state.message
        raised = state.result(raise_on_failure=False)
        assert isinstance(raised, BaseException) and "data.source" in str(raised) and TOKEN not in str(raised)


def test_a_credential_in_the_data_source_reaches_no_prefect_record_when_the_run_succeeds(demo_data_dir, tiny_lm_dir, tiny_reward_dir,
                                                                                         tmp_path):
    """A run that reads a source whose name holds `https://user:TOKEN@host` (a local path: the part of it a URL
    would be) goes through every task to its end, and no state, event, log or task run of it holds the token."""
    source = tmp_path / "data" / f"https://user:{TOKEN}@example.org" / "prompts.jsonl"
    source.parent.mkdir(parents=True)
    source.write_bytes((PROJECT_ROOT / "data" / "demo" / "prompts.jsonl").read_bytes())
    state, records = run_with_source(f"{tmp_path}/data/https://user:{TOKEN}@example.org/prompts.jsonl", tmp_path,
                                     tiny_lm_dir, tiny_reward_dir, check_dvc=False)
    assert state.is_completed(), state.message
    assert_no_token(records, state.state_details.flow_run_id)
