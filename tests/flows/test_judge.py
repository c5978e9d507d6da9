"""Reward hacking caught by a held-out judge, on the demo.

A run pushed into reward hacking (no KL penalty, 10x the learning rate) makes the demo's reward model (the proxy)
score its completions far higher while the truth falls. A judge trained by the reward stage on the same kind of
pairs is fooled too: it shares the proxy's blind spot (README, "Against reward hacking"). So, as a team would, the
demo's annotators label the completions of earlier hacked runs (three other seeds) against the reference's
(`alignflow demo annotate`); the reward stage trains the judge on those pairs and the demo's; and the judge then
sees a loss where the proxy sees a clear gain in a hacked run it never saw (its own seed, its own degenerate
wording): the judge's gate fails and nothing is promoted. (The labelled prompts are all 2,000 demo prompts, the
judged run's held-out ones among them, with other policies' completions; the judge never sees the judged run's.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from components.config import PROJECT_ROOT
from flows.cli import app

pytestmark = pytest.mark.slow

# The push: no KL penalty, 10x the demo's learning rate (README, "Against reward hacking").
HACKED = ["rl.kl_coef=0", "rl.learning_rate=1e-3", "rl.total_episodes=1280", "data.eval_size=64",
          "evaluation.bootstrap_samples=300", "checkpoint.every=10"]
ANNOTATED, JUDGED = (1, 3, 4), 2  # the seeds of the runs the annotators label, and of the run the judge then judges


def hacked_run(store: Path, seed: int, *extra: str):
    from flows.pipeline import pipeline

    try:
        return pipeline(None, [f"seed={seed}", f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
                               f"checkpoint.dir={store}/checkpoints", *HACKED, *extra])
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def caught(demo_kit, tmp_path_factory):
    store = tmp_path_factory.mktemp("judge")
    uri = f"sqlite:///{store}/mlflow.db"
    data = store / "judge-pairs"
    data.mkdir()
    shutil.copy(demo_kit.data_dir / "preferences.jsonl", data / "preferences.jsonl")
    outputs = []
    for seed in ANNOTATED:  # earlier hacked runs, whose completions the annotators label against the reference's
        earlier = hacked_run(store, seed)
        labelled = CliRunner().invoke(app, ["demo", "annotate", f"models:/alignflow-policy/{earlier.model_version}",
                                            "--out", str(data / f"policy-{seed}.jsonl"), "--prompts", "2000",
                                            "--seed", str(seed), "--set", f"tracking.tracking_uri={uri}"])
        assert labelled.exit_code == 0, labelled.output
        outputs.append(labelled.output)

    from flows.reward_pipeline import reward_pipeline

    try:
        judge = reward_pipeline(str(PROJECT_ROOT / "configs/reward.yaml"), [
            f"data.source={data}", "data.check_dvc=false", "seed=1", f"tracking.tracking_uri={uri}",
            "tracking.registered_model=judge", f"checkpoint.dir={store}/judge-checkpoints", "evaluation.bootstrap_samples=300"])
    finally:
        mlflow.set_tracking_uri(None)
    assert judge.promoted
    judged = hacked_run(store, JUDGED, "judge.model=models:/judge@champion", "judge.max_length=128")
    return outputs, judged, MlflowClient(uri, registry_uri=uri)


def test_the_annotators_mostly_prefer_the_references_completions_to_a_hacked_policys(caught):
    outputs, _, _ = caught
    for output in outputs:
        found = re.search(r"wrote (\d+) labelled pairs to (\S+) \((\d+) prompts sampled, (\d+) near-ties left unlabelled; "
                          r"the policy's completion chosen in (\d+) of (\d+)\)", " ".join(output.split()))
        assert found, output
        pairs, path, sampled, ties, chosen, of = found.groups()
        assert int(sampled) == 2000 and int(pairs) + int(ties) == 2000 and int(of) == int(pairs)
        assert len(Path(path).read_text().splitlines()) == int(pairs)
        assert int(chosen) / int(pairs) < 0.3  # the truth prefers the reference's; 10% of labels are flipped


def test_a_hacked_run_the_proxy_calls_a_gain_is_caught_by_the_judge_and_not_promoted(caught):
    _, second, client = caught
    gates = {gate.name: gate for gate in second.gates.gates}
    metrics = client.get_run(second.run_id).data.metrics
    # The proxy sees a clear gain, the truth a loss ...
    assert gates["score_gain"].passed and gates["score_gain_ci_low"].passed
    assert second.candidate.gold_positive_share < second.reference.gold_positive_share
    # ... and so does the judge: its gate fails, and the version is kept from the alias.
    assert not gates["judge_gain_ci_low"].passed and metrics["eval/judge_gain_ci_high"] < 0
    assert not second.promoted
    assert any("by the reward model" in note and "by the judge" in note for note in second.gates.notes)

