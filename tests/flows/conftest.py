from pathlib import Path

import mlflow
import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """A temporary Prefect database and API for the whole flows session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_data(demo_kit) -> Path:
    """The pinned demo data in data/ (a fresh clone regenerates exactly what data.dvc pins)."""
    return demo_kit.data_dir


@pytest.fixture
def tracking_uri(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def small_run(tmp_path, tracking_uri):
    """Overrides of the demo config for a run of a few seconds, with the given models."""

    def overrides(policy: Path, reward: Path, *extra: str) -> list[str]:
        return [
            f"policy.model={policy}",
            f"reward.model={reward}",
            f"tracking.tracking_uri={tracking_uri}",
            f"checkpoint.dir={tmp_path / 'checkpoints'}",
            "rl.rollout_batch_size=16",
            "rl.mini_batch_size=8",
            "rl.update_epochs=2",
            "rl.total_episodes=64",
            "checkpoint.every=2",
            "data.eval_size=32",
            "generation.max_new_tokens=12",
            "evaluation.bootstrap_samples=200",
            *extra,
        ]

    return overrides
