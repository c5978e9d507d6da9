"""`alignflow rlhf`: both stages in order, each showing its results as it ends (the reward stage's before the policy
stage starts); a stage whose gates fail stops it there, its flow run Failed and the command's exit code 1, naming the
stage and the gates, unless --continue-on-gate-failure; and the reward stage's tie rule: a reward model no better than
the champion is not promoted, its gate table showing both models' accuracy.

The three rlhf runs share one store, in order: gates that pass (reward-model version 1 becomes champion, a policy is
trained against it), then an impossible `gates.min_accuracy` twice, stopping and then continuing on purpose. Each runs
the installed command against this session's Prefect API (its flow runs' states are read back), its output (stdout
and stderr as one stream, in the order written) captured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from support import WORDS, alignflow_executable, one_thread  # noqa: F401 - one intra-op thread, as in the children

REWARD_MODEL, POLICY_MODEL = "alignflow-reward", "alignflow-policy"
REWARD_TABLE = "Reward model on"  # the title of the reward stage's results table
POLICY_STARTS = re.compile(r"^ppo .*episodes", re.M)  # the policy stage's progress bar: its first output
POLICY_TABLE = "Reference (the starting policy) vs candidate"
OPEN_POLICY_GATES = ["gates.min_score_gain=-1000", "gates.significant_gain=false", "gates.min_win_rate=0",
                     "gates.max_kl=1000000", "gates.min_length_ratio=0", "gates.max_length_ratio=1000",
                     "gates.min_distinct2=0", "gates.beats_champion=false"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlhf")


def uri(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


def client(store: Path) -> MlflowClient:
    return MlflowClient(uri(store), registry_uri=uri(store))


def rlhf(store: Path, tiny_lm_dir: Path, reward: list[str], *flags: str) -> subprocess.CompletedProcess:
    """`alignflow rlhf` on the store: the demo's reward stage on 1,000 of its pairs for 30 steps (with `reward`
    settings), then a tiny policy for 16 episodes with gates it passes; its output as one stream."""
    reward = ["data.max_pairs=1000", "training.max_steps=30", "evaluation.bootstrap_samples=100", f"tracking.tracking_uri={uri(store)}",
              f"checkpoint.dir={store}/reward-checkpoints", *reward]
    policy = [f"policy.model={tiny_lm_dir}", "reward.max_length=64", f"tracking.tracking_uri={uri(store)}",
              f"checkpoint.dir={store}/checkpoints", "critic.type=shared", "rl.rollout_batch_size=16",
              "rl.mini_batch_size=8", "rl.update_epochs=1", "rl.total_episodes=16", "data.eval_size=16",
              "generation.max_new_tokens=8", "evaluation.bootstrap_samples=100", *OPEN_POLICY_GATES]
    from prefect.settings import PREFECT_API_URL

    argv = [alignflow_executable(), "rlhf", *[a for o in reward for a in ("--reward-set", o)],
            *[a for o in policy for a in ("--set", o)], *flags]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    (store / f"rlhf-{len(list(store.glob('rlhf-*.out')))}.out").write_text(done.stdout)  # kept for a failure's reader
    return done


def last_rlhf_flow_run():
    """The latest flow run of the `alignflow-rlhf` flow on this session's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as prefect:
        (run,) = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alignflow-rlhf"])),
                                        sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run


def policy_versions(store: Path) -> list:
    return client(store).search_model_versions(f"name='{POLICY_MODEL}'")


@pytest.fixture(scope="module")
def passed(demo_kit, tiny_lm_dir, store):
    """Both stages' gates pass: reward-model version 1 becomes champion and the policy trains against it."""
    done = rlhf(store, tiny_lm_dir, ["gates.min_accuracy=0.6"])
    return done, last_rlhf_flow_run()


@pytest.fixture(scope="module")
def stopped(passed, tiny_lm_dir, store):
    """The reward stage's gates fail (no reward model is right on every held-out pair): rlhf stops there."""
    done = rlhf(store, tiny_lm_dir, ["gates.min_accuracy=1.0"])
    return done, last_rlhf_flow_run()


@pytest.fixture(scope="module")
def continued(stopped, tiny_lm_dir, store):
    """The same failing reward stage, with --continue-on-gate-failure: the policy stage runs all the same."""
    done = rlhf(store, tiny_lm_dir, ["gates.min_accuracy=1.0"], "--continue-on-gate-failure")
    return done, last_rlhf_flow_run()


def test_rlhf_runs_the_reward_stage_then_the_policy_against_its_champion(passed, store):
    done, flow_run = passed
    assert done.returncode == 0, done.stdout[-5000:]
    assert flow_run.state.is_completed()
    assert str(client(store).get_model_version_by_alias(REWARD_MODEL, "champion").version) == "1"
    (version,) = policy_versions(store)
    assert version.tags["alignflow.reward_model"] == f"models:/{REWARD_MODEL}/1" and version.tags["alignflow.reward_data_md5"]


def test_each_stage_shows_its_results_as_it_ends(passed):
    output = passed[0].stdout
    reward_table, policy_starts = output.index(REWARD_TABLE), POLICY_STARTS.search(output).start()
    assert reward_table < output.index("gates: all 2 gates passed") < policy_starts
    assert policy_starts < output.index("of model 'alignflow-policy'") < output.index(POLICY_TABLE)
    assert output.count(REWARD_TABLE) == 1 and output.count(POLICY_TABLE) == 1


def test_a_reward_stage_whose_gates_fail_stops_rlhf_before_the_policy_stage(stopped, store):
    done, flow_run = stopped
    output = done.stdout
    assert done.returncode == 1, output[-5000:]
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "the reward stage failed its gates" in error and "< min_accuracy 1.0" in error
    assert "failed gates: accuracy" in error and "alignflow-reward version 2 registered, not promoted" in error
    assert "rlhf stopped before the policy stage" in error and "--continue-on-gate-failure" in error
    assert "Traceback" not in output
    # Its results were shown as it ended, the champion's accuracy beside the candidate's (beats_champion's row).
    assert output.index(REWARD_TABLE) < output.index("error:") and "> champion accuracy" in output
    # The policy stage never started: no flow run of it, no new policy run or version.
    assert not POLICY_STARTS.search(output) and POLICY_TABLE not in output and len(policy_versions(store)) == 1
    assert str(client(store).get_model_version_by_alias(REWARD_MODEL, "champion").version) == "1"
    # A scheduled run shows it: the flow run is Failed, with the reason.
    assert flow_run.state.is_failed() and flow_run.state.message.startswith("the reward stage failed its gates")


def test_continue_on_gate_failure_runs_the_policy_stage_against_the_champion_and_still_fails(continued, store):
    done, flow_run = continued
    output = done.stdout
    assert done.returncode == 1, output[-5000:]
    assert output.index(REWARD_TABLE) < output.index("continuing on purpose") < POLICY_STARTS.search(output).start()
    newest = max(policy_versions(store), key=lambda v: int(v.version))
    assert str(newest.version) == "2" and newest.tags["alignflow.reward_model"] == f"models:/{REWARD_MODEL}/1"
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "the reward stage failed its gates" in error and "went on past the reward stage on purpose" in error
    assert "the policy stage" not in error  # its gates passed
    assert flow_run.state.is_failed() and "continue_on_gate_failure" in flow_run.state.message


# --- the tie rule, on a reward model that cannot tell any pair apart ---------------------------------------------------


@pytest.fixture(scope="module")
def tied_pairs(tmp_path_factory) -> Path:
    """Pairs whose two answers are words the tiny tokenizer does not know: both read as `<unk>`, so every reward model
    scores them alike and every held-out pair is a tie (accuracy 0.5 for the champion and the candidate)."""
    path = tmp_path_factory.mktemp("tied") / "pairs.jsonl"
    rows = [{"prompt": " ".join(WORDS[i % len(WORDS):][:3] + WORDS[:i % 5]), "chosen": " zebra", "rejected": " quokka"}
            for i in range(60)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_reward_model_that_ties_the_champion_is_not_promoted_and_its_gate_table_shows_both_figures(
        tied_pairs, tiny_lm_dir, tmp_path):
    from flows.reward_pipeline import reward_pipeline

    sets = [f"data.source={tied_pairs}", "data.check_dvc=false", "data.eval_fraction=0.25", f"model.base={tiny_lm_dir}",
            "model.max_length=32", "training.max_steps=3", "training.batch_size=8", "evaluation.bootstrap_samples=50",
            "evaluation.gold_scorer=null", "gates.min_accuracy=0", "gates.significant=false",
            f"tracking.tracking_uri={uri(tmp_path)}", f"checkpoint.dir={tmp_path}/checkpoints"]
    try:
        first = reward_pipeline(None, sets)
    finally:
        mlflow.set_tracking_uri(None)
    assert first.promoted and first.evaluation.accuracy == 0.5  # no champion yet: nothing to beat
    from prefect.settings import PREFECT_API_URL

    done = subprocess.run([alignflow_executable(), "reward", "run", *[a for o in sets for a in ("--set", o)]],
                          env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # a stage alone reports its failed gates and exits 0
    row = next(line for line in done.stdout.splitlines() if "beats_champion" in line and "FAIL" in line)
    assert re.search(r"beats_champion\s*│\s*0\.5\s*│\s*> champion accuracy 0\.5\s*│\s*FAIL", row), row
    assert "a tie keeps the champion" in done.stdout and "version 2: not promoted" in done.stdout
    assert "the champion on the same 15 pairs: accuracy 0.5, mean margin" in done.stdout
    assert str(client(tmp_path).get_model_version_by_alias(REWARD_MODEL, "champion").version) == "1"
    tags = client(tmp_path).get_model_version(REWARD_MODEL, "2").tags
    assert tags["alignflow.gates_passed"] == "false" and tags["alignflow.gates_failed"] == "beats_champion"
