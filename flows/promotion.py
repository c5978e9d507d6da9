"""The one way the champion alias moves, for the pipeline and the CLI alike: the lock, then compare-and-set, then
the tags (components/tracking/registry.py does the last two).

The lock serialises every promotion and rollback on one registry:
  - a registry in a local SQLite file: an exclusive file lock beside the database (every process that can write
    that file shares it; the kernel drops the lock of a process that dies holding it);
  - a tracking server (a team's): a Prefect global concurrency limit of 1 (`alignflow-promotion`) on the Prefect
    server everyone who promotes shares (PREFECT_API_URL). Its slot is leased for LEASE_SECONDS (60 s, the shortest
    lease Prefect's server accepts) and renewed by the holder every 45 s, so a holder that dies (SIGKILL, a lost
    machine) blocks promotions for at most FREED_WITHIN_SECONDS (80 s): the lease runs out, the Prefect server's
    repossessor revokes it (it looks every 15 s, PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS) and a waiting
    promotion, which asks every 2 s, gets it. A command that waits says so, once, on stderr: what it waits for, who holds it (the Prefect variable
    `alignflow-promotion-holder`, written by the holder) and for how long at most.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Iterator

from components.tracking import registry
from components.config import RewardRunConfig, RunConfig
from components.errors import AlignflowError
from components.tracking.runs import file_lock, use_tracking

PROMOTION_LOCK = "alignflow-promotion"
HOLDER_VARIABLE = "alignflow-promotion-holder"
LEASE_SECONDS = 60  # the server's minimum; Prefect's default, 300 s, kept every promotion waiting 5 min after a holder died
REPOSSESSOR_SECONDS = 15  # the Prefect server's default loop for revoking expired leases
POLL_SECONDS = 2
FREED_WITHIN_SECONDS = 80  # LEASE_SECONDS + REPOSSESSOR_SECONDS + POLL_SECONDS, rounded up


class PromotionLockTimeout(AlignflowError, TimeoutError):
    """The promotion lock stayed held for the whole wait; nothing was changed."""


@contextlib.contextmanager
def promotion_lock(tracking_uri: str, timeout_seconds: float = 600, action: str = "a promotion") -> Iterator[None]:
    """Hold the registry's promotion lock for the block (`action` says what for, to those who wait for it)."""
    path = registry.local_store_lock_path(tracking_uri)
    if path is not None:
        with file_lock(path, timeout_seconds):
            yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(PROMOTION_LOCK, 1)
    with contextlib.ExitStack() as held:
        _acquire(held, timeout_seconds)
        _say_who_holds(action)
        held.callback(_forget_holder)  # before the slot is released: the next holder writes its own
        yield


def _acquire(held: contextlib.ExitStack, timeout_seconds: float) -> None:
    """The slot, asked for every POLL_SECONDS until `timeout_seconds` (one line on stderr when it must wait)."""
    from prefect.concurrency.sync import concurrency

    deadline = time.monotonic() + timeout_seconds
    waiting = False
    while True:
        try:
            # A failed lease renewal is logged, not fatal: Prefect's default would cancel the holder mid-call, and a
            # registry update cut in half is worse than a late one (the intent tag completes it anyway).
            held.enter_context(concurrency(PROMOTION_LOCK, occupy=1, max_retries=0, lease_duration=LEASE_SECONDS,
                                           strict=True, raise_on_lease_renewal_failure=False))
            return
        except Exception as exc:  # noqa: BLE001 - only a 423 (the slot is taken) is waited out
            if not _taken(exc):
                raise
        holder = _holder()
        if not waiting:
            print(f"waiting for the registry's promotion lock held by {holder}, up to {timeout_seconds:.0f} s (a holder "
                  f"that died frees it within {FREED_WITHIN_SECONDS} s)", file=sys.stderr, flush=True)
            waiting = True
        if time.monotonic() + POLL_SECONDS > deadline:
            raise PromotionLockTimeout(f"waited {timeout_seconds:.0f} s for the registry's promotion lock (Prefect's "
                                       f"concurrency limit {PROMOTION_LOCK}), held by {holder}; nothing was changed")
        time.sleep(POLL_SECONDS)


def _taken(exc: BaseException) -> bool:
    """Whether Prefect refused the slot because it is held (HTTP 423), anywhere in the exception's chain."""
    import httpx

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 423:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _holder() -> str:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            variable = client.read_variable_by_name(HOLDER_VARIABLE)
    except Exception:  # noqa: BLE001 - who holds it is said when it can be, never needed
        variable = None
    return str(variable.value) if variable is not None and variable.value else "another promotion (it did not say whose)"


def _say_who_holds(action: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    who = registry.current_identity()
    where = f"flow run {run.flow_run.name} ({run.flow_run.id})" if run and run.flow_run else f"pid {os.getpid()}"
    value = (f"{who}'s {action} ({where} on {socket.gethostname()}, since "
             f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} UTC)")
    try:
        with get_client(sync_client=True) as client:
            if client.read_variable_by_name(HOLDER_VARIABLE) is None:
                client.create_variable(VariableCreate(name=HOLDER_VARIABLE, value=value))
            else:
                client.update_variable(VariableUpdate(name=HOLDER_VARIABLE, value=value))
    except Exception:  # noqa: BLE001 - a promotion never fails for want of saying who holds the lock
        pass


def _forget_holder() -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.delete_variable_by_name(HOLDER_VARIABLE)
    except Exception:  # noqa: BLE001 - as above
        pass


def promote(config: RunConfig | RewardRunConfig, version: str, *, force: bool = False, reason: str | None = None,
            user: str | None = None, evaluated_against: str | None | bool = False, score: float | None = None,
            score_tag: str = registry.SCORE_TAG) -> tuple[bool, str]:
    """Make `version` the champion of the configured registered model (a policy's or a reward model's), under the lock
    (see registry.promote)."""
    uri = use_tracking(config.tracking)
    with promotion_lock(uri, action=f"promotion of {config.tracking.registered_model} version {version}"):
        return registry.promote(config.tracking.registered_model, version, config.tracking.champion_alias, force=force,
                                reason=reason, user=user, evaluated_against=evaluated_against, score=score,
                                score_tag=score_tag)


def rollback(config: RunConfig | RewardRunConfig, *, reason: str | None = None, user: str | None = None):
    """Move the champion back to the previous one, under the lock (see registry.rollback)."""
    uri = use_tracking(config.tracking)
    with promotion_lock(uri, action=f"rollback of {config.tracking.registered_model}"):
        return registry.rollback(config.tracking.registered_model, config.tracking.champion_alias, user=user, reason=reason)


def needs_prefect_server(config: RunConfig) -> bool:
    """Whether promoting on this registry takes the Prefect lock and no Prefect server is configured."""
    uri = use_tracking(config.tracking)
    return registry.local_store_lock_path(uri) is None and not os.environ.get("PREFECT_API_URL")
