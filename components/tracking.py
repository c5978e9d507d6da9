"""Everything MLflow: where runs go, what a run records, and the model registry.

Small functions the flow calls; the engine never imports this module. Logging functions use
MLflow's active run (`with start_run(config, run_id): ...`); registry functions use the
tracking URI set by `use_tracking` / `start_run`.

Names the flow writes and `recent_runs` reads back:
    run tags      alignflow.stop_reason, alignflow.gates_passed ("true"/"false"),
                  alignflow.model_version
    run metrics   eval/reward_gain, eval/kl
    version tags  gates_passed ("true"/"false"); `promote` adds promoted_by, promoted_at,
                  promotion_reason, forced, previous_<alias>; `rollback` adds rolled_back_*.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from components import access, secrets
from components.config import PROJECT_ROOT, RunConfig, TrackingConfig

STOP_REASON_TAG = "alignflow.stop_reason"
GATES_PASSED_TAG = "alignflow.gates_passed"
MODEL_VERSION_TAG = "alignflow.model_version"
REWARD_GAIN_METRIC = "eval/reward_gain"
KL_METRIC = "eval/kl"

VERSION_GATES_TAG = "gates_passed"
DEFAULT_REGISTRY_CACHE = PROJECT_ROOT / "artifacts" / "registry"
MAX_DIGEST_LENGTH = 36  # MLflow's dataset digest column; a DVC md5 (with `.dir`) fits exactly

_REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")


class PromotionError(RuntimeError):
    """A promotion or rollback that must not happen; the message says why and what to do."""


class ModelReferenceError(ValueError):
    """A `models:/...` reference that cannot be turned into a loadable directory."""


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


def use_tracking(tracking: TrackingConfig) -> str:
    """Point MLflow (tracking and registry) at the configured store; returns the URI."""
    uri = resolve_tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(tracking: TrackingConfig) -> str:
    """The experiment's id, creating it (with the artifact location above) if needed."""
    uri = use_tracking(tracking)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return client.create_experiment(tracking.experiment, artifact_location=artifact_location(uri, tracking.experiment))
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(
            f"experiment {tracking.experiment!r} is deleted in {uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set tracking.experiment"
        )
    return experiment.experiment_id


def start_run(config: RunConfig, run_id: str | None = None) -> mlflow.ActiveRun:
    """Start a run in the configured experiment, or resume `run_id` (a retried task resumes its run)."""
    use_tracking(config.tracking)
    if run_id is not None:
        # MLflow refuses a run of another experiment than the active one: make the run's own active.
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(experiment_id=ensure_experiment(config.tracking), run_name=config.name)


def end_run(run_id: str, failed: bool = False) -> None:
    """Mark a run finished or failed (whether or not it is the active run)."""
    status = "FAILED" if failed else "FINISHED"
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        MlflowClient().set_terminated(run_id, status)


# --- what a run records -----------------------------------------------------------------------


def log_config(config: RunConfig) -> None:
    """Every `section.key` as a param (YAML-style values) and the resolved config as `config.yaml`, both without
    secrets (components/secrets.py)."""
    mlflow.log_params({key: _param_value(value) for key, value in secrets.redacted_params(config.flat()).items()})
    mlflow.log_text(secrets.redacted_yaml(config), "config.yaml")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)  # None -> null, True -> true
    if len(text) > MAX_PARAM_VAL_LENGTH:
        suffix = "...(truncated; see config.yaml)"
        text = text[: MAX_PARAM_VAL_LENGTH - len(suffix)] + suffix
    return text


def log_dataset(name: str, source: str, digest: str, rows=None, context: str = "training"):
    """Log a dataset as a run input whose digest is the DVC md5 of the data.

    `source` is a local path, a URL or a hub dataset id; `rows` (list of dicts or a DataFrame)
    adds a schema and profile. Returns the MLflow dataset.
    """
    if not digest or len(digest) > MAX_DIGEST_LENGTH:
        raise ValueError(f"dataset digest must be 1-{MAX_DIGEST_LENGTH} characters (a DVC md5); got {digest!r}")
    dataset_source = _dataset_source(source)
    if rows is None:
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(source=dataset_source, name=name, digest=digest)
    else:
        import pandas as pd

        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        dataset = mlflow.data.from_pandas(frame, source=dataset_source, name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    return dataset


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
    """Metrics at `step` (names like `policy/approxkl` are fine); None values are skipped."""
    mlflow.log_metrics({name: float(value) for name, value in stats.items() if value is not None}, step=step)


def log_training_curves(
    history: list[dict[str, float]],
    *,
    step_key: str = "episode",
    score_key: str = "objective/scores",
    kl_key: str = "objective/kl",
    artifact_file: str = "training_curves.png",
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
    score_ax.set_title("PPO training")
    mlflow.log_figure(figure, artifact_file)
    return figure


EVAL_SAMPLE_COLUMNS = ("prompt", "baseline_completion", "candidate_completion", "baseline_score", "candidate_score")


def log_eval_samples(rows: list[dict[str, Any]], artifact_file: str = "eval_samples.json") -> None:
    """A table artifact of evaluation samples: `EVAL_SAMPLE_COLUMNS` first, extra keys after."""
    if not rows:
        return
    missing = [column for column in EVAL_SAMPLE_COLUMNS if any(column not in row for row in rows)]
    if missing:
        raise KeyError(f"eval sample rows need {', '.join(EVAL_SAMPLE_COLUMNS)}; missing: {', '.join(missing)}")
    extra = [key for key in rows[0] if key not in EVAL_SAMPLE_COLUMNS]
    columns = list(EVAL_SAMPLE_COLUMNS) + extra
    mlflow.log_table({column: [row.get(column) for row in rows] for column in columns}, artifact_file=artifact_file)


# --- the registry -----------------------------------------------------------------------------


def default_pip_requirements(with_peft: bool = False) -> list[str]:
    """Pinned to what is installed here (local version suffixes like `+cpu` dropped)."""
    pins = []
    packages = ("torch", "transformers", "tokenizers", "safetensors", "accelerate") + (("peft",) if with_peft else ())
    for package in packages:
        try:
            pins.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_policy_model(
    policy_dir: Path,
    registered_model: str,
    tags: dict[str, Any],
    pip_requirements: list[str] | None = None,
    *,
    artifact_name: str = "policy",
    model_config: dict[str, Any] | None = None,
) -> ModelVersion:
    """Log the saved policy (model + tokenizer, or LoRA adapter + tokenizer) and register it.

    A causal LM is logged in MLflow's transformers flavour as a text-generation pipeline; a LoRA
    adapter as a PEFT model on its base (only the adapter is stored; a local base is referenced by
    path, a hub base by id, and must be there when the model is loaded). An encoder-decoder (T5,
    BART), which transformers 5 no longer serves through a pipeline, is logged as a pyfunc
    `Seq2SeqGenerator` holding the saved folder. Either way `mlflow.pyfunc.load_model(...).predict`
    turns prompts into generated text.

    `tags` become model-version tags (include `gates_passed` so `promote` can check it);
    `model_config` holds default generation settings for pyfunc (e.g. `max_new_tokens`).
    """
    from transformers import AutoConfig, AutoTokenizer

    from components.models import adapter_base, load_policy

    policy_dir = Path(policy_dir)
    base = adapter_base(policy_dir)
    if base is None and not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a saved model (no config.json) or adapter (no adapter_config.json)")
    pip_requirements = pip_requirements or default_pip_requirements(with_peft=base is not None)
    if getattr(AutoConfig.from_pretrained(base or policy_dir), "is_encoder_decoder", False):
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=Seq2SeqGenerator(),
            artifacts={"policy": str(policy_dir)},
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=pip_requirements,
            registered_model_name=registered_model,
            model_config=model_config,
        )
    else:
        if base is None:
            model = load_policy(str(policy_dir))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_policy(base), str(policy_dir))
        local_base = base if base is not None and Path(base).is_dir() else None
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": AutoTokenizer.from_pretrained(policy_dir)},
            name=artifact_name,
            task="text-generation",
            pip_requirements=pip_requirements,
            registered_model_name=registered_model,
            model_config=model_config,
            base_model_path=local_base,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, _tag_value(value))
    return client.get_model_version(registered_model, version)


class Seq2SeqGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc for an encoder-decoder policy: prompts (a list of strings or a one-column DataFrame) ->
    generated texts. The artifact `policy` is a saved model, or a LoRA adapter on its base model."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from components.models import load_policy

        self.model = load_policy(context.artifacts["policy"])
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["policy"])
        self.defaults = dict(context.model_config or {})

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import pandas as pd
        import torch

        if isinstance(model_input, pd.DataFrame):
            prompts = model_input.iloc[:, 0].astype(str).tolist()
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        settings = {**self.defaults, **(params or {})}
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(**batch, **settings)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


@access.explains_denial("move @{alias} of {name} to version {version}")
def promote(
    name: str,
    version: str | int,
    alias: str = "champion",
    *,
    force: bool = False,
    reason: str | None = None,
    user: str | None = None,
    passed_gates: bool | None = None,
) -> ModelVersion:
    """Point `alias` at `version`, remembering the previous holder in tag `previous_<alias>`.

    `passed_gates` is the gate result (recorded in tag `gates_passed`); None reads that tag. A
    version whose gates failed, or with no gate result, is refused unless `force` with a `reason`.
    """
    client = MlflowClient()
    version = str(version)
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        raise PromotionError(f"cannot promote {name} version {version}: {exc.message}") from None
    if passed_gates is not None:
        client.set_model_version_tag(name, version, VERSION_GATES_TAG, _tag_value(passed_gates))
        gates = _tag_value(passed_gates)
    else:
        gates = target.tags.get(VERSION_GATES_TAG)
    if gates != "true":
        why = "its promotion gates failed" if gates == "false" else f"it has no gate result (tag {VERSION_GATES_TAG})"
        if not force:
            raise PromotionError(
                f"refusing to make {name} version {version} the {alias}: {why}; "
                f"pass force=True with a reason to promote it anyway"
            )
        if not reason or not reason.strip():
            raise PromotionError(f"forcing {name} version {version} to {alias} needs a reason (who asked, and why)")

    previous = get_champion(name, alias)
    client.set_registered_model_alias(name, alias, version)
    record = {
        "promoted_by": user or _current_user(),
        "promoted_at": _now(),
        "promotion_reason": reason or "all gates passed",
        "forced": _tag_value(force and gates != "true"),
    }
    if previous is not None and str(previous.version) != version:
        record[f"previous_{alias}"] = str(previous.version)
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    return client.get_model_version(name, version)


def promote_if_best(
    name: str,
    version: str | int,
    score: float,
    alias: str = "champion",
    *,
    evaluated_against: str | None,
    user: str | None = None,
    reason: str | None = None,
    score_tag: str = "eval_mean_score",
) -> tuple[bool, str]:
    """Compare-and-set on the alias, for a version that passed its gates.

    The gates compared the candidate with the champion it saw (`evaluated_against`, None for no
    champion). If another run moved the alias since, the candidate takes it only with a higher
    evaluation score (tag `score_tag`, same prompts and seed). Call it inside a lock that every
    promoter shares, so the read and the write cannot interleave.
    """
    current = get_champion(name, alias)
    if current is not None and str(current.version) != (evaluated_against or ""):
        current_score = float(current.tags.get(score_tag, "-inf"))
        if current_score >= score:
            return False, (f"version {current.version} became {alias} meanwhile with score {current_score:.4g} "
                           f">= {score:.4g}; {alias} unchanged")
    promote(name, version, alias, passed_gates=True, user=user, reason=reason)
    return True, f"version {version} is now {alias}"


@access.explains_denial("move @{alias} of {name} back")
def rollback(name: str, alias: str = "champion", *, user: str | None = None, reason: str | None = None) -> ModelVersion:
    """Move `alias` back to the version recorded in the current holder's `previous_<alias>` tag."""
    client = MlflowClient()
    current = get_champion(name, alias)
    if current is None:
        raise PromotionError(f"{name} has no {alias} to roll back")
    previous = current.tags.get(f"previous_{alias}")
    if not previous:
        raise PromotionError(f"{name} version {current.version} has no previous_{alias} tag: nothing to roll back to")
    client.set_registered_model_alias(name, alias, previous)
    who, when = user or _current_user(), _now()
    client.set_model_version_tag(name, str(current.version), f"rolled_back_from_{alias}", f"{when} by {who}")
    record = {"rolled_back_by": who, "rolled_back_at": when, "rollback_reason": reason or "", "rolled_back_from": str(current.version)}
    for key, value in record.items():
        client.set_model_version_tag(name, previous, key, value)
    return client.get_model_version(name, previous)


def get_champion(name: str, alias: str = "champion") -> ModelVersion | None:
    """The version holding `alias`, or None when the model or the alias does not exist."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        if access.model_is_missing(exc, name):  # basic auth answers 403, not 404, for an alias of no model
            return None
        raise


@dataclass(frozen=True)
class VersionSummary:
    version: int
    aliases: list[str]
    tags: dict[str, str]


def list_versions(name: str) -> list[VersionSummary]:
    """Every version of a registered model, newest first, with its aliases and tags."""
    client = MlflowClient()
    try:
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases_by_version.setdefault(str(version), []).append(alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    versions = client.search_model_versions(f"name='{name}'")
    return sorted(
        (VersionSummary(int(v.version), sorted(aliases_by_version.get(str(v.version), [])), dict(v.tags)) for v in versions),
        key=lambda summary: summary.version,
        reverse=True,
    )


def recent_runs(experiment: str, n: int = 10) -> list[dict[str, Any]]:
    """The newest `n` runs of an experiment, from the tags and metrics named at the top of this module."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=n, order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        gates = tags.get(GATES_PASSED_TAG)
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "start_time": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
                "status": run.info.status,
                "stop_reason": tags.get(STOP_REASON_TAG),
                "reward_gain": metrics.get(REWARD_GAIN_METRIC),
                "kl": metrics.get(KL_METRIC),
                "gates_passed": None if gates is None else gates == "true",
                "model_version": tags.get(MODEL_VERSION_TAG),
            }
        )
    return rows


def pin_model_reference(ref: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION`, the version the alias points at now; any other reference
    unchanged. Machines that resolve a reference later (the other machines of a multi-machine PPO launch) then
    load the same weights as this one even if the alias moves in between."""
    match = _REGISTRY_REF.match(ref.strip()) if ref.startswith("models:") else None
    if match is None or match["alias"] is None:
        return ref
    try:
        found = MlflowClient().get_model_version_by_alias(match["name"], match["alias"])
    except MlflowException as exc:
        raise ModelReferenceError(f"cannot resolve {ref}: {exc.message}") from None
    return f"models:/{match['name']}/{found.version}"


def resolve_model_reference(ref: str, cache_dir: Path | None = None) -> str:
    """A directory `from_pretrained` loads (model and tokenizer) for `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`; any other reference (hub id, local path) is returned unchanged.

    The transformers flavour stores weights in `model/` and the tokenizer in
    `components/tokenizer/`; the download is assembled into one folder, cached per registry and
    version under `cache_dir` (default `artifacts/registry/`).
    """
    if not ref.startswith("models:"):
        return ref
    match = _REGISTRY_REF.match(ref.strip())
    if match is None:
        raise ModelReferenceError(f"{ref!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient()
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelReferenceError(f"cannot resolve {ref}: {exc.message}") from None
    version = str(found.version)
    # Version numbers repeat across registries: the cache key also names the store and the logged model.
    origin = hashlib.sha256(f"{mlflow.get_registry_uri()}|{found.source}|{found.run_id}".encode()).hexdigest()[:12]
    target = Path(cache_dir or DEFAULT_REGISTRY_CACHE) / f"{name}-v{version}-{origin}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=scratch))
        assembled = _assemble_policy_dir(downloaded, ref)
        if target.exists():  # a half-written folder from an interrupted download
            shutil.rmtree(target)
        assembled.rename(target)
    return str(target)


def _assemble_policy_dir(downloaded: Path, ref: str) -> Path:
    """The folder `load_policy` reads: a saved model, or a LoRA adapter whose config names its base."""
    import yaml

    from components.models import adapter_base

    mlmodel = downloaded / "MLmodel"
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}) if mlmodel.is_file() else {}
    flavor = flavors.get("transformers")
    if flavor is None and (downloaded / "artifacts" / "policy").is_dir():  # a Seq2SeqGenerator pyfunc
        return downloaded / "artifacts" / "policy"
    if flavor is None:
        raise ModelReferenceError(f"{ref} is not a model logged by log_policy_model (no transformers flavour or policy artifact)")
    if flavor.get("peft_adaptor"):
        model_dir = downloaded / flavor["peft_adaptor"]
        config_path = model_dir / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = flavor.get("local_base_model_path") or flavor.get("source_model_name")
        config_path.write_text(json.dumps(adapter_config, indent=2))
    else:
        model_dir = downloaded / flavor.get("model_binary", "model")
    if not (model_dir / "config.json").is_file() and adapter_base(model_dir) is None:
        raise ModelReferenceError(
            f"{ref} holds no model weights (logged with save_pretrained=False?); "
            f"its source model is {flavor.get('source_model_name')!r}"
        )
    for component in flavor.get("components", []):
        for item in (downloaded / "components" / component).glob("*"):
            if item.is_file() and not (model_dir / item.name).exists():
                shutil.copy2(item, model_dir / item.name)
    return model_dir


# --- helpers ----------------------------------------------------------------------------------


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
