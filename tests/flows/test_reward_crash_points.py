"""Crash consistency of the reward-model stage, as tests/flows/test_crash_points.py shows it for the policy pipeline:
a real `alignflow reward run` killed with SIGKILL at every named crash point (components/faults.py), each resume
killed at the next point, the last resume run to the end, ends where an uninterrupted run ends: each step logged
once with the same values, one version for the run with all its tags, the right champion, no checkpoint or export
left over. After each kill the store is checked for the state that point leaves, so a point not reached fails.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import support
from support import no_tracking_uri_left  # noqa: F401 - autouse: the_run points MLflow at a store
from support import cli_in_child

from components.tracking import registry, runs as tracking
from components.config import TrackingConfig
from components.faults import CRASH_ENV, RUN_POINTS
from flows.reward_tasks import ACCURACY_TAG

pytestmark = pytest.mark.slow

MODEL = "crash-reward"
EXPERIMENT = "reward-crash"
# 40 steps, a checkpoint every 10: the kill of each link, a point and the N-th time this process reaches it ("#N").
CHAIN = [
    "tracking.created",  # the run exists with its stage tag, nothing of its record: the resume writes it
    "tracking.config_logged",  # params and config.yaml logged, provenance tags not: the resume completes the record
    "tracking.started",
    "checkpoint.written",  # the first save (step 10), before its renames
    "train.checkpointed",  # step 10 in place, its metrics not logged
    "train.logged",  # (the resume logs steps 1-10) step 20 trained, checkpointed and logged
    "checkpoint.between_renames",  # step 30's save: step 20's renamed aside, 30's not in place
    "train.checkpointed#2",  # (the resume trains 21-30 again) the last checkpoint in place, its metrics not logged
    "evaluation.recorded",  # the candidate's
    "evaluation.recorded",  # the champion's (the resume reads the candidate's back)
    "checkpoint.written",  # the export of the trained model, before it is moved into place
    "register.logged",
    "register.created",
    "promote.intent",
    "promote.alias_moved",
    "finish.artifacts",
    "finish.tagged",
]


@pytest.fixture(scope="module")
def pairs(demo_kit, tmp_path_factory) -> Path:
    """The demo's first 800 preference pairs (a run reads, checks and logs every pair at each start)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join((demo_kit.data_dir / "preferences.jsonl").read_text().splitlines(keepends=True)[:800]))
    return path


def overrides(store: Path, pairs: Path) -> list[str]:
    """configs/reward.yaml (the demo's instruct model) on `pairs` for 40 steps, with gates every candidate passes."""
    return [f"data.source={pairs}", "data.check_dvc=false", f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
            f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL}", f"checkpoint.dir={store}/checkpoints",
            "training.max_steps=40", "checkpoint.every=10", "evaluation.bootstrap_samples=100",
            "gates.min_accuracy=0", "gates.significant=false", "gates.beats_champion=false"]


def seed_champion(store: Path, tiny_reward_dir: Path) -> None:
    """A registry whose reward model has a champion (version 1, accuracy 0 on record), evaluated beside the candidate
    on the same pairs and replaced by it."""
    store.mkdir(parents=True, exist_ok=True)
    config = TrackingConfig(tracking_uri=f"sqlite:///{store}/mlflow.db", experiment="seed")
    tracking.use_tracking(config)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(config)) as run:
        uri = registry.log_reward_model(tiny_reward_dir)
        mlflow.log_metric(registry.GATES_METRIC, 1.0)
        registry.register(MODEL, run.info.run_id, uri, {registry.GATES_TAG: True, ACCURACY_TAG: 0.0})
    registry.promote(MODEL, "1", reason="seed")


def the_run(store: Path):
    return support.the_run(store, EXPERIMENT)


def end_state(store: Path) -> dict:
    """What an uninterrupted run leaves, in terms that do not depend on when it ran."""
    return support.end_state(store, EXPERIMENT, MODEL, (tracking.FINISHED_TAG, tracking.MODEL_VERSION_TAG,
                                                        tracking.PROMOTED_TAG, tracking.GATES_PASSED_TAG))


def left_where_it_was_killed(point: str, store: Path, earlier: int) -> None:
    """The state each point leaves: proof the process died there, not somewhere else (`earlier`: how many links of
    the chain before this one killed at the same point)."""
    client, run = the_run(store)
    assert run is not None and run.info.status == "RUNNING"
    run_dir = store / "checkpoints" / run.info.run_id
    logged = [int(m.step) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    evaluations = {a.path for a in client.list_artifacts(run.info.run_id, "evaluations")}
    version = registry.version_of_run(MODEL, run.info.run_id)
    tags = run.data.tags
    support.left_in_its_record(point, run, "reward")
    if point == "checkpoint.written":  # the first checkpoint's save, then the export's
        assert list(run_dir.glob(".export.tmp-*" if earlier else ".checkpoint.tmp-*")) and not (run_dir / "export").exists()
        assert (run_dir / "checkpoint").is_dir() == bool(earlier)
    elif point == "checkpoint.between_renames":
        assert (run_dir / ".checkpoint.previous").is_dir() and not (run_dir / "checkpoint").exists()
    elif point.startswith("train.checkpointed"):
        assert (run_dir / "checkpoint").is_dir() and len(logged) < 40 and "evaluations/candidate.json" not in evaluations
    elif point == "train.logged":
        assert len(logged) == 20 and len(set(logged)) == 20  # each step once
    elif point == "evaluation.recorded":  # the candidate's, then the champion's
        name = "champion" if earlier else "candidate"
        assert f"evaluations/{name}.json" in evaluations and f"eval/{name}/accuracy" not in run.data.metrics
        assert ("evaluations/champion.json" in evaluations) == ("eval/candidate/accuracy" in run.data.metrics) == bool(earlier)
    elif point == "register.logged":
        assert version is None and mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    elif point == "register.created":
        assert version is not None and registry.GATES_TAG in version.tags and tracking.MODEL_VERSION_TAG not in tags
    elif point == "promote.intent":
        assert registry.pending_move(MODEL) and str(registry.get_champion(MODEL).version) == "1"
    elif point == "promote.alias_moved":
        assert registry.pending_move(MODEL) and str(registry.get_champion(MODEL).version) == str(version.version)
    elif point == "finish.artifacts":
        assert tracking.PROMOTED_TAG not in tags and "result.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    elif point == "finish.tagged":
        assert tags.get(tracking.PROMOTED_TAG) == "true" and tags.get(tracking.FINISHED_TAG) is None


def test_the_chain_covers_every_crash_point():
    assert {point.partition("#")[0] for point in CHAIN} == RUN_POINTS


def test_a_reward_run_killed_at_every_crash_point_and_resumed_ends_as_an_uninterrupted_run(pairs, tiny_reward_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    for store in (straight, crashed):
        seed_champion(store, tiny_reward_dir)
    assert cli_in_child(["reward", "run", *[a for o in overrides(straight, pairs) for a in ("--set", o)]]) == 0
    uninterrupted = end_state(straight)
    assert uninterrupted["versions"] == [1, 2] and uninterrupted["champion"] == "2" and uninterrupted["leftovers"] == []

    sets = [a for o in overrides(crashed, pairs) for a in ("--set", o)]
    run_id = None
    for i, point in enumerate(CHAIN):
        argv = ["reward", "run", *sets] + (["--resume", run_id] if run_id else [])
        assert cli_in_child(argv, env={CRASH_ENV: point}) == -9, f"alignflow reward run was not killed at {point}"
        name = point.partition("#")[0]
        left_where_it_was_killed(name, crashed, earlier=sum(link.partition("#")[0] == name for link in CHAIN[:i]))
        run_id = the_run(crashed)[1].info.run_id

    assert cli_in_child(["reward", "run", *sets, "--resume", run_id]) == 0
    state = end_state(crashed)
    assert state == uninterrupted
    assert state["status"] == "FINISHED" and state["version_tags"]["previous_champion"] == "1"
    assert registry.pending_move(MODEL) is None and state["logged_models"] == 1

    # a finished run resumed again changes nothing
    assert cli_in_child(["reward", "run", *sets, "--resume", run_id]) == 0
    assert end_state(crashed) == uninterrupted
