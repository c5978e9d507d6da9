"""The one way the champion alias moves, for the pipeline and the CLI alike: the lock, then compare-and-set, then
the tags (components/registry.py does the last two).

The lock serialises every promotion and rollback on one registry:
  - a registry in a local SQLite file: an exclusive file lock beside the database (every process that can write
    that file shares it; the kernel drops the lock of a process that dies holding it);
  - a tracking server (a team's): a Prefect global concurrency limit of 1 (`alignflow-promotion`) on the Prefect
    server everyone who promotes shares (PREFECT_API_URL); its 300 s lease frees a slot whose holder died.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from components import registry
from components.config import RewardRunConfig, RunConfig
from components.tracking import file_lock, use_tracking

PROMOTION_LOCK = "alignflow-promotion"


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, timeout_seconds: float = 600) -> Iterator[None]:
    """Hold the registry's promotion lock for the block."""
    path = registry.local_store_lock_path(tracking_uri)
    if path is not None:
        with file_lock(path, timeout_seconds):
            yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(PROMOTION_LOCK, 1)
    # A failed lease renewal is logged, not fatal: Prefect's default would cancel the holder mid-call, and a registry
    # update cut in half is worse than a late one (the intent tag completes it anyway).
    with concurrency(PROMOTION_LOCK, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                     raise_on_lease_renewal_failure=False):
        yield


def promote(config: RunConfig | RewardRunConfig, version: str, *, force: bool = False, reason: str | None = None,
            user: str | None = None, evaluated_against: str | None | bool = False, score: float | None = None,
            score_tag: str = registry.SCORE_TAG) -> tuple[bool, str]:
    """Make `version` the champion of the configured registered model (a policy's or a reward model's), under the lock
    (see registry.promote)."""
    uri = use_tracking(config.tracking)
    with promotion_lock(uri):
        return registry.promote(config.tracking.registered_model, version, config.tracking.champion_alias, force=force,
                                reason=reason, user=user, evaluated_against=evaluated_against, score=score,
                                score_tag=score_tag)


def rollback(config: RunConfig | RewardRunConfig, *, reason: str | None = None, user: str | None = None):
    """Move the champion back to the previous one, under the lock (see registry.rollback)."""
    uri = use_tracking(config.tracking)
    with promotion_lock(uri):
        return registry.rollback(config.tracking.registered_model, config.tracking.champion_alias, user=user, reason=reason)


def needs_prefect_server(config: RunConfig) -> bool:
    """Whether promoting on this registry takes the Prefect lock and no Prefect server is configured."""
    uri = use_tracking(config.tracking)
    return registry.local_store_lock_path(uri) is None and not os.environ.get("PREFECT_API_URL")
