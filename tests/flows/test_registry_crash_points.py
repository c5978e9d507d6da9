"""Crash consistency of the registry commands: a real `alignflow promote` or `alignflow rollback` killed with SIGKILL at
each of its crash points (components/faults.py), then whatever registry command a person runs next. Whichever it is,
it first completes the move left pending: a rerun of the same command ends there (a killed rollback run again goes back
one champion, not two), another command is refused, naming the move it completed. The chain ends where the commands,
run without kills, would have left the registry, and `alignflow models --history` shows every move once.
"""

from __future__ import annotations

import pytest
from support import no_tracking_uri_left  # noqa: F401 - autouse: the store's client points MLflow at it
from support import alignflow, cli_in_child, register_versions

from components.tracking import registry
from components.config import TrackingConfig
from components.faults import CRASH_ENV, POINTS

pytestmark = pytest.mark.slow

MODEL = "crash-registry"

# (command, where it is killed or None, its exit code, the champion after it, the move pending after it)
CHAIN = [
    (["promote", "3"], "promote.intent", -9, "2", ("promote", "2", "3")),
    (["rollback"], None, 2, "3", None),  # completes the promotion of 3, then refuses: the person saw 2 as champion
    (["rollback"], "rollback.alias_moved", -9, "2", ("rollback", "3", "2")),
    (["rollback"], None, 0, "2", None),  # completes that rollback and goes no further (it used to go on to 1)
    (["promote", "3"], "promote.alias_moved", -9, "3", ("promote", "2", "3")),
    (["promote", "3"], None, 0, "3", None),  # the same promotion, run again: completed
    (["rollback"], "rollback.intent", -9, "3", ("rollback", "3", "2")),
    (["promote", "1"], None, 2, "2", None),  # completes the rollback, refuses the promotion it did not see coming
    (["rollback"], None, 0, "1", None),
]
# What the commands, run without kills, record: promote 1, 2, 3; rollback; promote 3; rollback; rollback.
MOVES = [("promote", "", "1"), ("promote", "1", "2"), ("promote", "2", "3"), ("rollback", "3", "2"),
         ("promote", "2", "3"), ("rollback", "3", "2"), ("rollback", "2", "1")]


def test_the_chain_covers_every_registry_command_point():
    assert {point for _, point, *_ in CHAIN if point} == {p for p in POINTS if p.startswith(("promote.", "rollback."))}


def test_registry_commands_killed_at_every_point_are_completed_by_the_next_command(tiny_lm_dir, tmp_path):
    store = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="seed", registered_model=MODEL)
    assert register_versions(store, MODEL, tiny_lm_dir, [1.0, 2.0, 3.0]) == ["1", "2", "3"]
    registry.promote(MODEL, "1", user="seed")
    registry.promote(MODEL, "2", user="seed")
    settings = ["--set", f"tracking.tracking_uri={store.tracking_uri}", "--set", f"tracking.registered_model={MODEL}"]

    for argv, point, code, champion, pending in CHAIN:
        assert cli_in_child([*argv, *settings], env={CRASH_ENV: point or ""}) == code, (argv, point)
        assert str(registry.get_champion(MODEL).version) == champion, (argv, point)
        move = registry.pending_move(MODEL)
        assert (move and (move["action"], move["from"], move["version"])) == (pending or None), (argv, point)

    assert [(m["action"], m["from"], m["version"]) for m in registry.history(MODEL)] == MOVES
    assert [m["number"] for m in registry.history(MODEL)] == list(range(1, len(MOVES) + 1))
    tags = {v: registry.get_version(MODEL, v).tags for v in ("1", "2", "3")}
    assert tags["3"]["rolled_back_from_champion"] and tags["2"]["rolled_back_from"] == "3"
    assert tags["1"]["rolled_back_from"] == "2" and tags["3"]["previous_champion"] == "2"

    shown = alignflow(["models", "--history", *settings])
    assert shown.returncode == 0, shown.stderr[-2000:]
    rows = [line for line in shown.stdout.splitlines() if line.startswith("│") and ("promote" in line or "rollback" in line)]
    assert len(rows) == len(MOVES) and "nothing to roll back to" in shown.stdout

    refused = alignflow(["rollback", *settings])
    assert refused.returncode == 2 and "nothing to roll back to" in refused.stderr
    assert "Traceback" not in refused.stderr
