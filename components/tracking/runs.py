"""Everything MLflow records about a run: where runs go, their params, metrics, inputs and artifacts.

Small functions the flow calls; the engine never imports this module (the registry is components/tracking/registry.py).
Logging functions use MLflow's active run (`with start_run(config, run_id): ...`). Every record is written so that a
run resumed after a crash writes nothing twice: step metrics are logged for the steps the run does not have yet
(`log_history`), one-off metrics only when the run lacks them (`log_metrics_once`), dataset inputs once, and results
a later stage needs (evaluations) are recorded as JSON artifacts that a resumed run reads back (`record`/`recorded`).

Names the flow writes and `recent_runs` reads back:
    run tags      alignflow.stage ("policy"/"reward", set as the run is created), alignflow.recorded ("true" once the
                  run's record is whole: params, config.yaml and provenance tags), alignflow.stop_reason, alignflow.gates_passed ("true"/"false"), alignflow.model_version,
                  alignflow.promoted, alignflow.finished ("true" once the run has nothing left to do)
    run metrics   eval/score_gain (eval/reward_gain in a run of an earlier release), eval/candidate/kl
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from components.security import secrets
from components.config import PROJECT_ROOT, RunConfig, TrackingConfig, flatten, renamed
from components.errors import UserError
from components.faults import crash_point

STAGE_TAG = "alignflow.stage"  # policy, reward: set when the run is created, so even a run killed at once has it
RECORDED_TAG = "alignflow.recorded"  # "true" once the run's record (params, config.yaml, provenance tags) is whole
ALGORITHM_TAG = "alignflow.algorithm"  # ppo, rloo, grpo, dr_grpo, reinforce_pp, reinforce_pp_baseline
STOP_REASON_TAG = "alignflow.stop_reason"
GATES_PASSED_TAG = "alignflow.gates_passed"
MODEL_VERSION_TAG = "alignflow.model_version"
PROMOTED_TAG = "alignflow.promoted"
FINISHED_TAG = "alignflow.finished"
PINNED_TAG = "alignflow.pinned_models"  # {key: models:/NAME/VERSION} a run's registry aliases resolved to, at its start
SCORE_GAIN_METRIC = "eval/score_gain"
OLD_SCORE_GAIN_METRIC = "eval/reward_gain"  # its name in runs of an earlier release
KL_METRIC = "eval/candidate/kl"
STEP_METRIC = "iteration"  # logged at every training step: which steps a run already has

MAX_DIGEST_LENGTH = 36  # MLflow's dataset digest column; a DVC md5 (with `.dir`) fits exactly


class RunNotFound(UserError):
    """`--resume RUN_ID` names no run of the tracking store."""


class ResumeRefused(UserError):
    """`--resume RUN_ID` names a run this command must not continue: another stage's or experiment's run, or
    settings that differ from the ones the run recorded. Nothing is changed."""


# --- where runs go ----------------------------------------------------------------------------


def resolve_tracking_uri(tracking: TrackingConfig) -> str:
    """`tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<project root>/mlruns.db`."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a local SQLite store, `<db folder>/mlartifacts/<experiment>` (so artifacts never land in
    the working directory); None lets the server or file store decide."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (db_path.parent / "mlartifacts" / slug).as_uri()


_READY: set[str] = set()


def use_tracking(tracking: TrackingConfig) -> str:
    """Point MLflow (tracking and registry) at the configured store; returns the URI. A new SQLite store is created
    under a lock beside it: two runs starting at once would otherwise both try to create its tables."""
    uri = resolve_tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _READY:
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        with file_lock(database.with_name(database.name + ".init-lock")):
            MlflowClient().search_experiments(max_results=1)
        _READY.add(uri)
    return uri


@contextlib.contextmanager
def file_lock(path: Path, timeout_seconds: float = 600) -> Iterator[None]:
    """An exclusive lock on `path` (fcntl) shared by every process on this machine; released when the holder ends,
    even by SIGKILL (the kernel drops a dead process's locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout_seconds:.0f} s for the lock {path}: another process holds it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(tracking: TrackingConfig) -> str:
    """The experiment's id, creating it (with the artifact location above) if needed."""
    uri = use_tracking(tracking)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        try:
            return client.create_experiment(tracking.experiment, artifact_location=artifact_location(uri, tracking.experiment))
        except MlflowException as exc:  # another run created it a moment ago
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(
            f"experiment {tracking.experiment!r} is deleted in {uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set tracking.experiment"
        )
    return experiment.experiment_id


def find_run(tracking: TrackingConfig, run_id: str):
    """The run `run_id` of the configured store, or RunNotFound saying where it was looked for."""
    uri = use_tracking(tracking)
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RunNotFound(f"--resume {run_id}: the tracking store {uri} has no run with this id; "
                              "`alignflow runs` lists the runs (give it the same --config/--set as the run)") from None
        raise


def start_run(config: RunConfig, run_id: str | None = None, stage: str = "policy") -> mlflow.ActiveRun:
    """Start a run of `stage` in the configured experiment (its stage tag written as it is created), or resume
    `run_id` (checked first with `resumed_config`)."""
    use_tracking(config.tracking)
    if run_id is not None:
        # MLflow refuses a run of another experiment than the active one: make the run's own active.
        mlflow.set_experiment(experiment_id=find_run(config.tracking, run_id).info.experiment_id)
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(experiment_id=ensure_experiment(config.tracking), run_name=config.name,
                            tags={STAGE_TAG: stage})


def record_run(config: RunConfig, tags: Callable[[], dict[str, str]]) -> bool:
    """The active run's record: every setting as a param and `config.yaml` (log_config), then the provenance `tags()`,
    then RECORDED_TAG. Idempotent: a run killed before or inside its record gets it completed by its resume (params it
    has are not logged again); a run whose record is whole is left alone. Returns whether anything was written."""
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    if run.data.tags.get(RECORDED_TAG) == "true":
        return False
    crash_point("tracking.created")
    log_config(config, present=run.data.params)
    crash_point("tracking.config_logged")
    mlflow.set_tags({**tags(), RECORDED_TAG: "true"})
    crash_point("tracking.started")
    return True


def end_run(run_id: str, failed: bool = False) -> None:
    """Mark a run finished or failed (whether or not it is the active run)."""
    status = "FAILED" if failed else "FINISHED"
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        MlflowClient().set_terminated(run_id, status)


# --- what a run records -----------------------------------------------------------------------


def log_config(config: RunConfig, present: dict[str, str] | None = None) -> None:
    """Every `section.key` as a param (YAML-style values; those in `present` not again) and the resolved config as
    `config.yaml`, both without secrets (components/security/secrets.py)."""
    params = {key: _param_value(value) for key, value in secrets.redacted_params(config.flat()).items()}
    mlflow.log_params({key: value for key, value in params.items() if key not in (present or {})})
    mlflow.log_text(secrets.redacted_yaml(config), "config.yaml")


WHERE_KEYS = {"tracking.tracking_uri"}  # where the run is kept, not how it runs: a resume may name the store anew


def resumed_config(given, run_id: str, stage: str, keys_given: set[str]):
    """The configuration `--resume RUN_ID` continues with: the one the run recorded (config.yaml), with the secrets it
    could not record taken from `given`. Refused (ResumeRefused, nothing changed) when the run is another stage's or
    its experiment is not the configured one, or when a key the user set (`keys_given`: config file and --set)
    differs from the recorded value: a resume continues the run as it was configured. A run killed before its record
    continues with `given` (its resume writes the record)."""
    run = find_run(given.tracking, run_id)
    tags = run.data.tags
    run_stage = tags.get(STAGE_TAG) or ("policy" if ALGORITHM_TAG in tags else None)
    command = "alignflow reward run" if stage == "reward" else "alignflow run"
    if run_stage is not None and run_stage != stage:
        other = "alignflow reward run" if run_stage == "reward" else "alignflow run"
        raise ResumeRefused(f"--resume {run_id}: that is a {run_stage}-stage run, not a {stage}-stage one: "
                            f"resume it with `{other} --resume {run_id}`; nothing was changed")
    text = _artifact_text(run, "config.yaml") if tags.get(RECORDED_TAG) == "true" else None
    if tags.get(RECORDED_TAG) == "true" and text is None:
        raise ResumeRefused(f"--resume {run_id}: the run's config.yaml cannot be read from its artifact store "
                            f"({run.info.artifact_uri}); try again when it can; nothing was changed")
    config = given
    if text is not None:
        recorded = renamed(yaml.safe_load(text))  # an earlier release's keys and values under this one's names
        given_tree = given.model_dump(mode="json")
        given_flat, redacted_flat, recorded_flat = (
            flatten(given_tree), flatten(secrets.redact_tree(given_tree)), flatten(recorded))
        covered = lambda key: any(key == k or key.startswith(k + ".") for k in keys_given)  # noqa: E731
        differing = sorted(key for key in set(recorded_flat) | set(redacted_flat)
                           if recorded_flat.get(key) != redacted_flat.get(key) and covered(key) and key not in WHERE_KEYS)
        if differing:
            shown = [f"{key}: recorded {json.dumps(recorded_flat.get(key))}, given {json.dumps(redacted_flat.get(key))}"
                     for key in differing]
            raise ResumeRefused(f"--resume {run_id}: the run was recorded with other settings than given here:\n  "
                                + "\n  ".join(shown) + f"\nA resume continues the run as it was recorded: run "
                                f"`{command} --resume {run_id}` without those settings (it takes the run's own), or "
                                "start a new run with the new ones; nothing was changed")
        unrecorded = [key for key, value in recorded_flat.items()  # what secrets.redact_tree wrote in place of a secret
                      if value == secrets.REDACTED or (isinstance(value, str) and f"://{secrets.REDACTED}@" in value)]
        missing = [key for key in unrecorded if redacted_flat.get(key) != recorded_flat[key]]
        if missing:
            raise ResumeRefused(f"--resume {run_id}: {', '.join(missing)} held a secret the run did not record: give it "
                                "again as the run was started (the same --config/--set or ALIGNFLOW_* variable); "
                                "nothing was changed")
        tree = _unflatten({key: given_flat[key] if key in unrecorded else value for key, value in recorded_flat.items()})
        tree["tracking"]["tracking_uri"] = given.tracking.tracking_uri  # where the run was found, not what it did
        try:
            config = type(given).model_validate(renamed(tree))
        except ValueError as exc:  # pydantic's ValidationError: a key this version renamed or retired
            raise ResumeRefused(f"--resume {run_id}: the configuration the run recorded is not valid in this version of "
                                f"alignflow ({' '.join(str(exc).split())[:400]}); resume it with the version that "
                                "started it, or start a new run; nothing was changed") from None
    else:  # killed before its record was whole: what it logged of it must be what is given now
        params = {key: _param_value(value) for key, value in secrets.redacted_params(given.flat()).items()}
        free = WHERE_KEYS | ({"tracking.experiment"} - keys_given)  # the store, and the run's experiment unless given
        logged = flatten(renamed(_unflatten(dict(run.data.params))))  # under this release's names, as given
        differing = sorted(key for key, value in logged.items() if params.get(key, value) != value and key not in free)
        if differing:
            raise ResumeRefused(f"--resume {run_id}: the run logged other values of {', '.join(differing)} than given "
                                "here: resume it with the settings it was started with; nothing was changed")
    experiment = MlflowClient().get_experiment(run.info.experiment_id).name
    if experiment != config.tracking.experiment and "tracking.experiment" not in keys_given:
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"experiment": experiment})})
    if experiment != config.tracking.experiment:
        raise ResumeRefused(f"--resume {run_id}: the run belongs to experiment {experiment!r}, not to "
                            f"tracking.experiment {config.tracking.experiment!r}; nothing was changed")
    return config


def _artifact_text(run, artifact_file: str) -> str | None:
    try:
        return mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{artifact_file}")
    except (MlflowException, OSError):
        return None


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return tree


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)  # None -> null, True -> true
    if len(text) > MAX_PARAM_VAL_LENGTH:
        suffix = "...(truncated; see config.yaml)"
        text = text[: MAX_PARAM_VAL_LENGTH - len(suffix)] + suffix
    return text


def log_dataset(name: str, source: str, digest: str, rows=None, context: str = "training"):
    """Log a dataset as a run input whose digest is the DVC md5 of the data (once: a resumed run that has it logs
    nothing). `source` is a local path, a URL or a hub dataset id; `rows` (list of dicts or a DataFrame) adds a
    schema and profile. Returns the MLflow dataset, or None when the run already has it."""
    if not digest or len(digest) > MAX_DIGEST_LENGTH:
        raise ValueError(f"dataset digest must be 1-{MAX_DIGEST_LENGTH} characters (a DVC md5); got {digest!r}")
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    if any(i.dataset.name == name and i.dataset.digest == digest for i in run.inputs.dataset_inputs):
        return None
    dataset_source = _dataset_source(source)
    if rows is None:
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(source=dataset_source, name=name, digest=digest)
    else:
        import pandas as pd

        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        dataset = mlflow.data.from_pandas(frame, source=dataset_source, name=name, digest=digest)
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return dataset
        except MlflowException as error:
            # Two runs of one experiment logging the same new dataset at once: the store checks for the dataset, both
            # find none, and the second insert breaks its unique key. On a retry the store finds the row and links it.
            if attempt == 2 or not _is_duplicate_key(error):
                raise
    return dataset


def _is_duplicate_key(error: MlflowException) -> bool:
    message = str(error).lower()
    return "unique" in message or "duplicate key" in message


def _dataset_source(source: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    if "://" in source:
        return resolve_dataset_source(source)
    for candidate in (Path(source), PROJECT_ROOT / source):
        if candidate.exists():
            return LocalArtifactDatasetSource(str(candidate.resolve()))
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) and not Path(source).suffix:
        return HuggingFaceDatasetSource(path=source)
    return LocalArtifactDatasetSource(str(Path(source).resolve()))


def log_stats(stats: dict[str, float], step: int) -> None:
    """Metrics at `step` (names like `policy/approxkl` are fine), in one request; None values are skipped."""
    mlflow.log_metrics({name: float(value) for name, value in stats.items() if value is not None}, step=step)


def log_history(history: list[dict[str, float]], step_key: str = "episodes", step_metric: str = STEP_METRIC) -> int:
    """Log each training step of `history` the active run does not have yet (told by its `step_metric`, the policy's
    iteration or the reward model's step), at step `row[step_key]`; a step's metrics go in one request, so a step is
    either logged whole or not at all. Returns how many steps were logged."""
    run_id = mlflow.active_run().info.run_id
    logged = {int(m.value) for m in MlflowClient().get_metric_history(run_id, step_metric)}
    missing = [row for row in history if int(row[step_metric]) not in logged]
    for row in missing:
        log_stats(row, step=int(row[step_key]))
    return len(missing)


def log_metrics_once(metrics: dict[str, float]) -> None:
    """One-off metrics (data, evaluation, gates) at step 0, each only if the active run does not have it yet."""
    present = MlflowClient().get_run(mlflow.active_run().info.run_id).data.metrics
    todo = {name: float(value) for name, value in metrics.items() if value is not None and name not in present}
    if todo:
        mlflow.log_metrics(todo, step=0)


def record(value: Any, artifact_file: str) -> None:
    """A result later stages need (an evaluation), as a JSON artifact of the active run."""
    mlflow.log_dict(value, artifact_file)


def _has_artifact(artifact_file: str) -> bool:
    folder, _, name = artifact_file.rpartition("/")
    listed = MlflowClient().list_artifacts(mlflow.active_run().info.run_id, folder or None)
    return name in {Path(item.path).name for item in listed}


def recorded(artifact_file: str) -> Any | None:
    """What `record` wrote to the active run, or None if it has nothing (or half a file) there."""
    run = mlflow.active_run()
    if not _has_artifact(artifact_file):
        return None
    try:
        return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{artifact_file}")
    except (json.JSONDecodeError, MlflowException, OSError):
        return None


def log_training_curves(
    history: list[dict[str, float]],
    *,
    step_key: str = "episode",
    score_key: str = "objective/scores",
    kl_key: str = "objective/kl",
    artifact_file: str = "training_curves.png",
    title: str = "PPO training",
):
    """Score and KL against episodes, one PNG (`artifact_file`); returns the matplotlib figure.

    If rows lack `step_key`, the x axis is the iteration number.
    """
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    if not history:
        raise ValueError("history is empty: nothing to plot")
    available = sorted({key for row in history for key in row})
    for key in (score_key, kl_key):
        if not any(key in row for row in history):
            raise KeyError(f"no row of the training history has {key!r}; keys present: {', '.join(available)}")
    if all(step_key in row for row in history):
        xs, xlabel = [row[step_key] for row in history], step_key
    else:
        xs, xlabel = list(range(1, len(history) + 1)), "iteration"

    figure = Figure(figsize=(7, 5), constrained_layout=True)
    score_ax, kl_ax = figure.subplots(2, 1, sharex=True)
    for ax, key in ((score_ax, score_key), (kl_ax, kl_key)):
        points = [(x, row[key]) for x, row in zip(xs, history) if row.get(key) is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker=".")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    kl_ax.set_xlabel(xlabel)
    score_ax.set_title(title)
    mlflow.log_figure(figure, artifact_file)
    return figure


EVAL_SAMPLE_COLUMNS = ("prompt", "reference_completion", "candidate_completion", "reference_score", "candidate_score")


def log_eval_samples(rows: list[dict[str, Any]], artifact_file: str = "eval_samples.json") -> None:
    """A table artifact of evaluation samples: `EVAL_SAMPLE_COLUMNS` first, extra keys after. Once: MLflow appends a
    table to an existing one of the same name, so a run that has it (a resumed run) logs nothing."""
    missing = [column for column in EVAL_SAMPLE_COLUMNS if any(column not in row for row in rows)]
    if missing:
        raise KeyError(f"eval sample rows need {', '.join(EVAL_SAMPLE_COLUMNS)}; missing: {', '.join(missing)}")
    if not rows or _has_artifact(artifact_file):
        return
    extra = [key for key in rows[0] if key not in EVAL_SAMPLE_COLUMNS]
    columns = list(EVAL_SAMPLE_COLUMNS) + extra
    mlflow.log_table({column: [row.get(column) for row in rows] for column in columns}, artifact_file=artifact_file)


def recent_runs(experiment: str | None, n: int = 10) -> list[dict[str, Any]]:
    """The newest `n` runs of an experiment (None: of every experiment), from the tags and metrics named at the top
    of this module."""
    client = MlflowClient()
    if experiment is None:
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    else:
        found = client.get_experiment_by_name(experiment)
        experiments = {found.experiment_id: found.name} if found else {}
    if not experiments:
        return []
    runs = client.search_runs(list(experiments), max_results=n, order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        gates = tags.get(GATES_PASSED_TAG)
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "algorithm": tags.get(ALGORITHM_TAG),
                "experiment": experiments.get(run.info.experiment_id, run.info.experiment_id),
                "start_time": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
                "status": run.info.status,
                "stop_reason": tags.get(STOP_REASON_TAG),
                "score_gain": metrics.get(SCORE_GAIN_METRIC, metrics.get(OLD_SCORE_GAIN_METRIC)),
                "kl": metrics.get(KL_METRIC),
                "gates_passed": None if gates is None else gates == "true",
                "model_version": tags.get(MODEL_VERSION_TAG),
            }
        )
    return rows
