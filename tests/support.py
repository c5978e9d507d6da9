"""Helpers several test modules share."""

from __future__ import annotations

from pathlib import Path

import mlflow

from components import registry, tracking
from components.config import TrackingConfig


def register_versions(config: TrackingConfig, model: str, policy_dir: Path, scores: list[float]) -> list[str]:
    """One run per score, each logging `policy_dir` and registering it as a version of `model` that passed its gates
    with that evaluation score, as the pipeline registers; returns the versions."""
    tracking.use_tracking(config)
    versions = []
    for score in scores:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(config)) as run:
            uri = registry.log_policy(policy_dir)
            version = registry.register(model, run.info.run_id, uri, {registry.GATES_TAG: True, registry.SCORE_TAG: score})
        versions.append(str(version.version))
    return versions
