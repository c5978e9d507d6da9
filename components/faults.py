"""Named crash points: where a run's durable state changes, and where the crash-point tests kill the process.

`crash_point(name)` does nothing unless the environment variable ALIGNFLOW_CRASH_AT names this point, in which
case the process sends itself SIGKILL there: no exception handler, `finally` or atexit runs, exactly as when the
machine loses power or the kernel's OOM killer strikes. `ALIGNFLOW_CRASH_AT=name#N` kills at the N-th time the
point is reached (counting from 1). tests/flows/test_crash_points.py kills a real `alignflow run` at each point a run
reaches and checks that `alignflow run --resume RUN_ID` ends where an uninterrupted run ends;
test_reward_crash_points.py does the same for `alignflow reward run`; test_registry_crash_points.py kills `alignflow
promote` and `rollback` at theirs and checks that any registry command run next completes the move.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "ALIGNFLOW_CRASH_AT"

# Every point, in the order a run reaches them, with the state change it sits after.
POINTS = {
    "tracking.created": "the MLflow run is created with its stage tag, nothing of its record written",
    "tracking.config_logged": "the run's params and config.yaml are logged, its provenance tags not yet",
    "tracking.started": "the run's record is whole: params, config.yaml, provenance tags",
    "checkpoint.written": "a checkpoint's files are written and synced in a temporary directory, not yet in place",
    "checkpoint.between_renames": "the previous checkpoint is renamed aside, the new one not yet moved in",
    "train.checkpointed": "a training task's checkpoint is in place, its iterations' metrics not yet logged",
    "train.logged": "a training task's metrics are logged",
    "evaluation.recorded": "an evaluation's results are recorded on the run, its metrics not yet logged",
    "register.logged": "the policy is logged to the run, no model version created yet",
    "register.created": "the model version is created with its tags, the run not yet tagged with it",
    "promote.intent": "the promotion is written ahead on the registered model, the alias not moved yet",
    "promote.alias_moved": "the alias points at the new version, the promotion tags not yet written",
    "rollback.intent": "(alignflow rollback) the rollback is written ahead on the registered model, the alias not moved",
    "rollback.alias_moved": "(alignflow rollback) the alias points at the previous champion, the records not yet written",
    "finish.artifacts": "the run's plots and samples are logged, its end tags not yet",
    "finish.tagged": "the run's end tags are set, the run not yet marked finished",
}

_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    if name not in POINTS:
        raise KeyError(f"unknown crash point {name!r}")
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    point, _, nth = target.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


RUN_POINTS = {name for name in POINTS if not name.startswith("rollback.")}  # those a pipeline run reaches
