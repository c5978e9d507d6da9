"""`--resume` continues a run as it was recorded, or refuses (exit 2) changing nothing: another stage's run (finished or
interrupted) is never touched, settings given on resume that differ from the recorded ones are named and refused, and
a resume given no settings takes the run's own configuration."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from support import no_tracking_uri_left  # noqa: F401 - autouse: the tests point MLflow at a store
from support import alignflow, cli_in_child

from components.tracking import runs as tracking
from components.config import RewardRunConfig, RunConfig, load_config


def recorded_run(config, stage: str, status: str | None) -> str:
    """A run of `stage` started and recorded as the stage records it (tracking.start_run, record_run), ended with
    `status` (None: left RUNNING, as a killed run is)."""
    with tracking.start_run(config, stage=stage) as run:
        tracking.record_run(config, lambda: {"alignflow.git_commit": "test"})
        if stage == "reward":
            tracking.log_metrics_once({"eval/candidate/accuracy": 0.9})
    run_id = run.info.run_id
    if status is None:
        MlflowClient().update_run(run_id, status="RUNNING")
    else:
        tracking.end_run(run_id, failed=status == "FAILED")
    return run_id


def snapshot(run_id: str) -> dict:
    run = MlflowClient().get_run(run_id)
    return {"status": run.info.status, "params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags,
            "artifacts": sorted(a.path for a in MlflowClient().list_artifacts(run_id))}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = [f"tracking.tracking_uri={uri}", f"checkpoint.dir={tmp_path}/checkpoints"]
    policy = load_config(None, [*settings, "tracking.experiment=policy-runs", "rl.total_episodes=48"])
    reward = load_config(None, [*settings, "tracking.experiment=reward-runs", "training.max_steps=7"],
                         schema=RewardRunConfig)
    tracking.use_tracking(policy.tracking)
    return {"settings": sum((["--set", s] for s in settings), []), "policy": policy, "reward": reward,
            "overrides": [*settings, "tracking.experiment=policy-runs"]}


def test_a_resume_of_another_stages_run_is_refused_and_changes_nothing(store):
    finished_reward = recorded_run(store["reward"], "reward", "FINISHED")
    interrupted_reward = recorded_run(store["reward"], "reward", None)
    finished_policy = recorded_run(store["policy"], "policy", "FINISHED")
    before = {run_id: snapshot(run_id) for run_id in (finished_reward, interrupted_reward, finished_policy)}

    refused = alignflow(["run", *store["settings"], "--resume", finished_reward])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert (f"--resume {finished_reward}: that is a reward-stage run, not a policy-stage one: resume it with "
            f"`alignflow reward run --resume {finished_reward}`; nothing was changed") in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr
    assert cli_in_child(["run", *store["settings"], "--resume", interrupted_reward]) == 2
    assert cli_in_child(["reward", "run", *store["settings"], "--resume", finished_policy]) == 2
    assert {run_id: snapshot(run_id) for run_id in before} == before


def test_a_resume_with_settings_other_than_the_recorded_ones_is_refused_naming_them(store):
    run_id = recorded_run(store["policy"], "policy", "FAILED")
    before = snapshot(run_id)
    changed = ["--set", "rl.total_episodes=768", "--set", "rl.learning_rate=0.01", "--set", "rl.kl_coef=0"]

    refused = alignflow(["run", *store["settings"], *changed, "--resume", run_id])
    assert refused.returncode == 2, refused.stderr[-2000:]
    said = " ".join(refused.stderr.split())
    assert "the run was recorded with other settings than given here" in said
    for line in ("rl.kl_coef: recorded 0.2, given 0", "rl.learning_rate: recorded 0.0001, given 0.01",
                 "rl.total_episodes: recorded 48, given 768"):
        assert line in said
    assert "nothing was changed" in said and "Traceback" not in said
    assert snapshot(run_id) == before
    # the same keys with the recorded values are no change
    same = load_config(None, [*store["overrides"], "rl.total_episodes=48"])
    assert tracking.resumed_config(same, run_id, "policy", {"tracking.tracking_uri", "rl.total_episodes"}) == store["policy"]


def test_a_resume_given_no_settings_takes_the_runs_own_configuration(store):
    run_id = recorded_run(store["policy"], "policy", None)
    given = RunConfig(tracking=store["policy"].tracking)  # the defaults, but for where the runs are kept
    config = tracking.resumed_config(given, run_id, "policy", {"tracking.tracking_uri"})
    assert config == store["policy"] and config.rl.total_episodes == 48 and config.tracking.experiment == "policy-runs"
    with pytest.raises(tracking.ResumeRefused, match="rl.total_episodes: recorded 48, given 20000"):
        tracking.resumed_config(given, run_id, "policy", {"tracking.tracking_uri", "rl.total_episodes"})
    with pytest.raises(tracking.ResumeRefused, match="that is a policy-stage run, not a reward-stage one"):
        tracking.resumed_config(store["reward"], run_id, "reward", set())


def test_a_run_killed_before_its_record_is_resumed_with_the_given_settings_and_its_record_completed(store):
    config = store["policy"]
    with tracking.start_run(config, stage="policy") as run:  # killed at tracking.created: nothing recorded
        pass
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    assert tracking.resumed_config(config, run.info.run_id, "policy", set()) == config
    with tracking.start_run(config, run.info.run_id):  # as a resume does: the run's own experiment made active
        assert tracking.record_run(config, lambda: {"alignflow.git_commit": "test"})
        assert not tracking.record_run(config, lambda: {"alignflow.git_commit": "other"})  # whole: left alone
    recorded = MlflowClient().get_run(run.info.run_id).data
    assert len(recorded.params) == len(config.flat()) and recorded.tags["alignflow.git_commit"] == "test"
    assert recorded.tags[tracking.RECORDED_TAG] == "true" and recorded.tags[tracking.STAGE_TAG] == "policy"
