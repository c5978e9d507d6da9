"""The life every stage shares, around what it trains (the style guide's "a stage is one shape").

A stage's flow (the policy pipeline, flows/pipeline.py with flows/tasks.py; the reward model, flows/reward_pipeline.py
with flows/reward_tasks.py) is:

    resumed_config (on --resume) -> [pin_aliases] -> check_inputs (with its own `resolve`) -> check_data_version
    -> its own inputs -> start_tracking -> settle, around the stage's body (a settled run only closes):
        its own training, a checkpoint at a time -> its own evaluations (recorded_evaluation), the champion's found by
        find_champion -> its gates, recorded by record_gates -> export (its own save) -> register_version (its own
        tags) -> promote -> its own finish
    -> close -> end_tracking; on any failure: end_tracking(failed) and explain_failure

Everything here is written once for every stage and is safe to run again (a resumed run ends where an
uninterrupted one ends); a stage's module holds only what is its own: its inputs, training, evaluation, the model it
logs, the tags of its versions and its result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from components.tracking import registry, runs as tracking

from components.security import access, secrets
from components.checkpoint import check_writable
from components.config import PROJECT_ROOT, given_keys
from components.errors import AlignflowError, retryable, translated, unreachable
from components.faults import crash_point
from components.evaluation.gates import GateReport
from components.data.versioning import DatasetVersion, dataset_version
from components.models import uris
from components.models.loading import ModelLoadError
from flows import promotion

COMMANDS = {"policy": "alignflow run", "reward": "alignflow reward run"}  # how a person resumes a stage's run


# --- where a run keeps its files ---------------------------------------------------------------


def checkpoint_root(config) -> Path:
    root = Path(config.checkpoint.dir)
    return root if root.is_absolute() else PROJECT_ROOT / root


def run_directory(config, run_id: str) -> Path:
    """What a run keeps on disk for --resume, one directory per MLflow run: concurrent runs never share one."""
    return checkpoint_root(config) / run_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- inputs -----------------------------------------------------------------------------------


def pin_aliases(config, resume_run_id: str | None, refs: dict[str, str | None]) -> dict[str, str]:
    """{key: models:/NAME/VERSION} for each `models:/NAME@ALIAS` among a stage's model URIs `refs`, pinned to the
    version the alias points at now, once, at the start of a run: a model promoted mid-run never changes a running job,
    and a resumed run takes the versions its first attempt pinned (recorded on the run, `tracking.PINNED_TAG`)."""
    aliased = {key: ref for key, ref in refs.items() if ref and ref.startswith("models:") and "@" in ref}
    if not aliased:
        return {}
    tracking.use_tracking(config.tracking)
    recorded = json.loads(tracking.find_run(config.tracking, resume_run_id).data.tags.get(tracking.PINNED_TAG, "{}")) if resume_run_id else {}
    pinned = {}
    for key, ref in aliased.items():
        try:
            pinned[key] = recorded.get(key) or uris.pin_model_uri(ref)
        except uris.ModelURIError as exc:
            raise ModelLoadError(f"{key}: {exc}") from None
    for key, ref in aliased.items():
        get_run_logger().info("%s: %s is %s for this run", key, ref, pinned[key])
    return pinned


@task(cache_policy=NONE)
def check_inputs(config, resolve: Callable[[Any], Any]):
    """Before anything heavy or recorded: the names the run writes to and reads are no other account's
    (access.check_owned), the stage's models are found and safe to load (`resolve(config)`, the stage's own check,
    gives the configuration with its model URIs as this machine loads them, which this returns), and the checkpoint
    directory is writable. A fault is named by its key. (The run a resume continues was found, once, by
    resumed_config, which gave `config`.)"""
    access.check_owned(tracking.use_tracking(config.tracking), experiment=config.tracking.experiment,
                       registered_model=config.tracking.registered_model, reads=access.registry_reads(config))
    resolved = resolve(config)
    check_writable(checkpoint_root(config), "checkpoint.dir")
    return resolved


@task(retries=1, retry_condition_fn=retryable)
def check_data_version(config) -> DatasetVersion:
    """The version of the dataset the run reads (prompts, preference pairs): the md5 of its bytes, checked against the
    .dvc file that pins it."""
    return dataset_version(config.data, PROJECT_ROOT)


# --- tracking around the flow ------------------------------------------------------------------


@task(cache_policy=NONE)
def resumed_config(given, resume_run_id: str, config_path: str | None, overrides: list[str], stage: str):
    """The configuration the run to resume recorded (tracking.resumed_config): refused, changing nothing, when it is
    another stage's run or a setting given here differs from the recorded one."""
    config = tracking.resumed_config(given, resume_run_id, stage, given_keys(config_path, overrides))
    get_run_logger().info("resuming run %s with %s", resume_run_id, "the configuration it recorded" if config is not given
                          else "the configuration given (the run was interrupted before recording its own)")
    return config


def start_tracking(config, resume_run_id: str | None, stage: str, provenance: Callable[[], dict[str, str]]) -> str:
    """Start (or resume) the stage's MLflow run and make its record whole (tracking.record_run: a run killed before or
    inside it gets it from its resume): the configuration, the commit, the Prefect flow run and the stage's own
    `provenance()`."""
    run = tracking.start_run(config, resume_run_id, stage=stage)
    logger = get_run_logger()
    logger.info("MLflow run %s", run.info.run_id)
    tracking.record_run(config, lambda: {"alignflow.git_commit": git_commit(),
                                         "alignflow.prefect_flow_run_id": flow_run.id or "", **provenance()})
    if resume_run_id is None:  # from here a resume takes the run's recorded configuration: no settings to repeat
        logger.info("if it is interrupted: %s --resume %s", COMMANDS[stage], run.info.run_id)
    return run.info.run_id


def recorded_result(from_json: Callable[[dict], Any]):
    """The result the run recorded once its outcome was settled (`finish`): a resumed run that has it only closes."""
    recorded = tracking.recorded("result.json")
    return from_json(recorded) if recorded else None


def settle(config, run_id: str, stage: str, resume_run_id: str | None, body: Callable[[], Any],
           from_json: Callable[[dict], Any], end_tags: Callable[[Any], dict[str, str]]):
    """The stage's `body` (its training through its recorded result) in the started run, then `close` with the
    result's `end_tags`; a resumed run that had settled its outcome (its result recorded, read back by `from_json`)
    only closes. On any failure the run is marked failed and the failure explained (explain_failure) as it is raised."""
    try:
        settled = recorded_result(from_json) if resume_run_id else None
        if settled is not None:
            print(f"run {run_id} had settled its outcome: closing it")
            close(config, run_id, end_tags(settled))
            end_tracking(run_id, failed=False)
            return settled
        result = body()
        close(config, run_id, end_tags(result))
    except BaseException as exc:
        end_tracking(run_id, failed=True)
        failure = explain_failure(exc, config, run_id, stage)
        if failure is exc:
            raise
        raise failure from exc
    end_tracking(run_id, failed=False)
    return result


def end_tracking(run_id: str, failed: bool) -> None:
    try:
        tracking.end_run(run_id, failed=failed)
    except Exception as exc:  # the tracking server (or its disk) may be what failed; keep the original error in front
        if not failed:
            raise
        print(f"could not mark MLflow run {run_id} failed: {exc}")


class ServerUnreachable(AlignflowError):
    """A server the pipeline needs stayed unreachable through every retry."""


def explain_failure(exc: BaseException, config, run_id: str, stage: str) -> BaseException:
    """A library's error with one cause the user can act on, said as such (a full disk, a Prefect credential); an
    MLflow server that could not be reached, named with how to resume; else `exc` itself."""
    translation = translated(exc)
    if translation is not None:
        return translation
    if isinstance(exc, AlignflowError) or not unreachable(exc):
        return exc
    uri = secrets.redact_uri(tracking.resolve_tracking_uri(config.tracking))
    return ServerUnreachable(
        f"the MLflow tracking server at {uri} is unreachable (after retries with backoff): {exc}\n"
        f"Nothing was promoted and the checkpoints are kept. When the server is back, resume with\n"
        f"  {COMMANDS[stage]} --resume {run_id}"
    )


# --- evaluation, gates, registry ---------------------------------------------------------------------


def recorded_evaluation(name: str, evaluate: Callable[[], tuple[Any, Any]], from_json: Callable[[Any], Any]):
    """An evaluation as the run recorded it (`evaluations/NAME.json`, read back by `from_json`: a resumed run does not
    evaluate again), else `evaluate()`'s (the evaluation and its record), recorded."""
    artifact = f"evaluations/{name}.json"
    done = tracking.recorded(artifact)
    if done is not None:
        return from_json(done)
    evaluation, record = evaluate()
    tracking.record(record, artifact)
    crash_point("evaluation.recorded")
    return evaluation


@task(cache_policy=NONE)
def find_champion(config) -> str | None:
    """The version holding the champion alias, recorded on the run: a resumed run compares with the champion its
    first attempt saw, even if the alias moved since."""
    done = tracking.recorded("evaluations/champion_version.json")
    if done is not None:
        return done["version"]
    champion = registry.get_champion(config.tracking.registered_model, config.tracking.champion_alias)
    version = None if champion is None else str(champion.version)
    tracking.record({"version": version}, "evaluations/champion_version.json")
    return version


def record_gates(report: GateReport, extra_metrics: dict[str, float], key: str, description: str) -> None:
    """A gate report on the run (gate/* metrics, alignflow.gates_* tags, gate_report.md) and as a Prefect artifact."""
    tracking.log_metrics_once({**extra_metrics, **report.as_metrics()})
    mlflow.set_tags(report.as_tags())
    mlflow.log_text(report.to_markdown(), "gate_report.md")
    create_markdown_artifact(markdown=report.to_markdown(), key=key, description=description)


def register_version(config, run_id: str, data: DatasetVersion, report: GateReport, evaluated_against: str | None,
                     log_model: Callable[[], str], tags: Callable[[], dict[str, Any]]) -> str:
    """Log the stage's model (`log_model()`, its model URI) and register it as a version of the configured registered
    model with every tag in the same call: the gates, the data, the provenance, and the stage's own `tags()`. A resumed
    run that registered already gets its version back."""
    name = config.tracking.registered_model
    existing = registry.version_of_run(name, run_id)
    if existing is None:
        model_uri = log_model()
        crash_point("register.logged")
        existing = registry.register(name, run_id, model_uri, {
            **registry.version_tags(report.passed, report.failed_names, data, run_id, evaluated_against,
                                    git_commit=git_commit(), flow_run_id=flow_run.id or ""), **tags()})
        crash_point("register.created")
    mlflow.set_tag(tracking.MODEL_VERSION_TAG, existing.version)
    return str(existing.version)


@task(cache_policy=NONE)
def export(config, run_id: str, save: Callable[[Path], Path]) -> Path | None:
    """The trained model saved for registration by the stage's `save(directory)`, in the run's directory; None when the
    run registered its version already (a resumed run)."""
    if registry.version_of_run(config.tracking.registered_model, run_id) is not None:
        return None
    return save(run_directory(config, run_id) / "export")


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, retry_condition_fn=retryable)
def promote(config, version: str, report: GateReport, evaluated_against: str | None, score: float, score_tag: str,
            who: str) -> bool:
    """Only a version that passed every gate becomes champion; a failure leaves the champion alone. Under the
    registry's promotion lock, the alias is compared-and-set: of candidates finishing together, the best passing
    evaluation (`score`, the holder's `score_tag`) wins (flows/promotion.py). Returns whether this version holds the
    alias now."""
    logger = get_run_logger()
    if not report.passed:
        logger.warning("%s version %s not promoted: %s", config.tracking.registered_model, version, report.summary())
        return False
    _, why = promotion.promote(config, version, user=f"{who} ({registry.current_identity()})", reason=report.summary(),
                               evaluated_against=evaluated_against, score=score, score_tag=score_tag)
    holder = registry.get_champion(config.tracking.registered_model, config.tracking.champion_alias)
    promoted = holder is not None and str(holder.version) == version
    (logger.info if promoted else logger.warning)("%s version %s: %s", config.tracking.registered_model, version, why)
    return promoted


@task(cache_policy=NONE)
def close(config, run_id: str, end_tags: dict[str, str]) -> None:
    """The run's end tags, then its checkpoint removed unless `checkpoint.keep` (the registered version holds the
    model now); last, the tag that says the run has nothing left to do."""
    mlflow.set_tags(end_tags)
    crash_point("finish.tagged")
    if not config.checkpoint.keep:
        shutil.rmtree(run_directory(config, run_id), ignore_errors=True)
    mlflow.set_tag(tracking.FINISHED_TAG, "true")


class Result:
    """What a stage's result (a dataclass, recorded as result.json once settled) has beside its own fields: its
    `gates` (a GateReport), `promoted`, `model_version`, which `end_tags` reads."""

    @property
    def gates_passed(self) -> bool:
        return self.gates.passed


def end_tags(result: Result) -> dict[str, str]:
    """What `close` tags a run with, from its recorded result."""
    return {tracking.GATES_PASSED_TAG: str(result.gates.passed).lower(), tracking.PROMOTED_TAG: str(result.promoted).lower(),
            tracking.MODEL_VERSION_TAG: result.model_version}
