"""Reruns of the reward-model stage: the same configuration and the same rows give the same metrics, every one at every
step, bit for bit on the CPU, whichever file form (JSONL, CSV, Parquet, a directory) holds the rows. The model is a
tiny GPT-2 whose config has dropout (0.1, GPT-2's own), the data the hh-rlhf fixture's pairs.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from support import hh_rlhf_pair_rows, one_thread, save_tiny_lm_with_dropout, write_in_each_form  # noqa: F401 - one thread

from flows.reward_pipeline import reward_pipeline

pytestmark = pytest.mark.slow  # five stage runs, ~60 s


@pytest.fixture(scope="module")
def base_with_dropout(tmp_path_factory) -> Path:
    """A tiny GPT-2 with GPT-2's dropout in its config: its body gets a new one-output head, seeded by the run."""
    return save_tiny_lm_with_dropout(tmp_path_factory.mktemp("gpt2-dropout"))


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, Path]:
    """The hh-rlhf fixture's pairs as prompt / chosen / rejected / margin rows, the same rows in each file form."""
    rows = hh_rlhf_pair_rows()
    assert len(rows) >= 16
    return write_in_each_form(rows, tmp_path_factory.mktemp("forms"))


def run_and_read(store: Path, base: Path, source: Path) -> dict[str, list[tuple[int, float]]]:
    """One reward-stage run in a store of its own (no champion to compare with); every metric's whole history."""
    uri = f"sqlite:///{store}/mlflow.db"
    overrides = [f"model.base={base}", f"data.source={source}", "data.format=explicit", "data.margin_field=margin",
                 "data.check_dvc=false", "data.eval_fraction=0.25", "model.max_length=128", "evaluation.gold_scorer=null",
                 "training.batch_size=4", "training.max_steps=6", "checkpoint.every=3", "evaluation.bootstrap_samples=100",
                 f"tracking.tracking_uri={uri}", f"checkpoint.dir={store}/checkpoints"]
    try:
        result = reward_pipeline(None, overrides)
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    keys = client.get_run(result.run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(result.run_id, key)] for key in sorted(keys)}


@pytest.fixture(scope="module")
def first(tmp_path_factory, base_with_dropout, forms):
    return run_and_read(tmp_path_factory.mktemp("first"), base_with_dropout, forms["jsonl"])


def test_two_runs_of_the_same_configuration_log_the_same_metrics_at_every_step(first, tmp_path, base_with_dropout, forms):
    again = run_and_read(tmp_path, base_with_dropout, forms["jsonl"])
    assert len(first["train/loss"]) == 6 and "eval/candidate/accuracy" in first
    assert again == first


@pytest.mark.parametrize("form", ["csv", "parquet", "directory"])
def test_the_same_rows_as_csv_parquet_or_a_directory_log_the_same_metrics_as_jsonl(first, tmp_path, base_with_dropout,
                                                                                   forms, form):
    assert run_and_read(tmp_path, base_with_dropout, forms[form]) == first
