"""Promotions and runs at the same time, against one SQLite store: one champion, a chain rollback walks, and runs
that keep out of each other's way."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from support import _CONTEXT, _main, cli_in_child

from components.tracking import registry, runs as tracking
from components.config import TrackingConfig, load_config
from support import register_versions

pytestmark = pytest.mark.slow

MODEL = "race-policy"


def _pipeline_promotion(overrides: list[str], version: str, score: float) -> None:
    """What the pipeline's promote task does for a candidate whose gates compared it with version 1."""
    from flows import promotion

    moved, why = promotion.promote(load_config(None, overrides), version, evaluated_against="1", score=score)
    print(f"pipeline promotion of {version}: {why}")


def test_concurrent_promotions_from_the_cli_and_pipelines_keep_one_champion_and_a_chain_rollback_walks(
        tiny_lm_dir, tmp_path):
    from prefect.settings import PREFECT_API_URL

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = ["--set", f"tracking.tracking_uri={uri}", "--set", f"tracking.registered_model={MODEL}"]
    overrides = [f"tracking.tracking_uri={uri}", f"tracking.registered_model={MODEL}"]
    register_versions(TrackingConfig(tracking_uri=uri, experiment="race"), MODEL, tiny_lm_dir, scores=[1, 2, 3, 4, 5, 6, 7])
    registry.promote(MODEL, "1", reason="seed")

    processes = []
    for version in ("2", "3", "4"):  # people promoting by hand
        processes.append(_CONTEXT.Process(target=_main, args=(["promote", version, *store], {}, PREFECT_API_URL.value())))
    for version, score in (("5", 5.0), ("6", 6.0), ("7", 7.0)):  # pipelines finishing at the same time
        processes.append(_CONTEXT.Process(target=_pipeline_promotion, args=(overrides, version, score)))
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
    assert [p.exitcode for p in processes] == [0] * len(processes)

    tracking.use_tracking(TrackingConfig(tracking_uri=uri))
    client = MlflowClient()
    holders = [v for v in registry.list_versions(MODEL) if "champion" in v.aliases]
    assert len(holders) == 1
    promoted = {str(v.version) for v in registry.list_versions(MODEL) if "promoted_by" in v.tags} - {"1"}
    chain = [str(holders[0].version)]
    while chain[-1] != "1":
        chain.append(client.get_model_version(MODEL, chain[-1]).tags["previous_champion"])
    # every promotion that moved the alias is in the chain exactly once: none recorded a holder another overwrote
    assert sorted(chain[:-1]) == sorted(promoted) and len(set(chain)) == len(chain)
    assert registry.pending_move(MODEL) is None
    # the history holds each move once, in the order the lock let them through: the chain, read backwards
    assert [m["version"] for m in registry.history(MODEL)] == list(reversed(chain))

    for expected in chain[1:]:
        assert cli_in_child(["rollback", *store]) == 0
        assert str(registry.get_champion(MODEL).version) == expected


def test_two_runs_at_once_on_one_store_keep_separate_runs_checkpoints_and_versions(demo_data, small_run, tiny_lm_dir,
                                                                                    tiny_reward_dir, tracking_uri, tmp_path):
    settings = sum((["--set", o] for o in small_run(tiny_lm_dir, tiny_reward_dir, "checkpoint.keep=true",
                                                     "gates.beats_champion=false")), [])
    from prefect.settings import PREFECT_API_URL

    runs = [_CONTEXT.Process(target=_main, args=(["run", *settings], {}, PREFECT_API_URL.value())) for _ in range(2)]
    for process in runs:
        process.start()
    for process in runs:
        process.join(600)
    assert [p.exitcode for p in runs] == [0, 0]

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = client.search_runs([client.get_experiment_by_name("alignflow-demo").experiment_id])
    assert len(found) == 2 and {r.info.status for r in found} == {"FINISHED"}
    versions = client.search_model_versions("name='alignflow-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in found}
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == sorted(r.info.run_id for r in found)
    assert all((tmp_path / "checkpoints" / r / "checkpoint" / "trainer_state.json").is_file() for r in kept)
