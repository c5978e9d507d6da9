"""What both stages' configurations share: the base of every section, model URIs, LoRA, checkpoints,
tracking, the data source's common keys, and the gold scorer allow-list."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key(s) and what is allowed."""


def parse_registry_uri(ref: str) -> tuple[str, str | None, str | None] | None:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None), `models:/NAME/VERSION` -> (NAME, None, VERSION); else None."""
    match = _REGISTRY_URI.match(ref.strip())
    return (match["name"], match["alias"], match["version"]) if match else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def refuse_remote_code(value: bool) -> bool:
    if value:
        raise ValueError("alignflow never runs code shipped with a model (transformers' trust_remote_code): use a model "
                         "whose architecture transformers implements; remove this key")
    return value


ALLOW_PICKLE = ("Load this model's weights from a pickle checkpoint (pytorch_model.bin, *.pt) when it has no "
                 "safetensors file. Unpickling a file can run any code it holds: only for a model whose origin you trust.")
TRUST_REMOTE_CODE = "Never true: a model's own code (transformers' trust_remote_code) is not run; true is refused."


def check_model_ref(value: str) -> str:
    """A model is a hub id (`org/name`), a local path, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`."""
    value = value.strip()
    if not value:
        raise ValueError("must name a model: a hub id, a local path or models:/NAME@ALIAS")
    if value.startswith("models:") and parse_registry_uri(value) is None:
        raise ValueError(f"{value!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class LoraConfig(Section):
    """LoRA adapters on the policy: only they (and the value head) train; the reference is the policy with them off."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight of the policy.")
    r: int = Field(8, gt=0, description="The adapters' rank.")
    alpha: int = Field(16, gt=0, description="The adapters' scaling numerator (scale = alpha / r).")
    target_modules: list[str] | None = Field(
        None, description="None picks PEFT's per-family defaults (c_attn for GPT-2, q_proj/v_proj for Llama, q/v for T5...)."
    )
    save_mode: Literal["merged", "adapter"] = Field("merged", description="Register the merged model, or base plus adapter.")


class CheckpointConfig(Section):
    """What a run keeps on disk so that `alignflow run --resume RUN_ID` continues it."""

    dir: str = Field("checkpoints", description="Where each run keeps its checkpoint (one directory per MLflow run).")
    every: int = Field(10, gt=0, description="Iterations between checkpoints (each a Prefect task; metrics logged after each).")
    keep: bool = Field(
        False,
        description="Keep a run's last checkpoint after the run has registered its model; by default it is deleted "
        "then. A failed or interrupted run always keeps it, for `alignflow run --resume RUN_ID`.",
    )


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here.")
    experiment: str = Field("alignflow", description="The MLflow experiment runs are recorded in.")
    registered_model: str = Field("alignflow-policy", description="The registered model each run's policy is a version of.")
    champion_alias: str = Field("champion", description="The alias of the version in production.")


GOLD_SCORER_PACKAGES = ("components", "benchmarks")


def gold_scorer_allowed(module: str, function: str) -> bool:
    """Whether `module:function` may be imported as a gold scorer: a public function (no leading underscore) of a
    module under GOLD_SCORER_PACKAGES."""
    parts = module.split(".")
    return (parts[0] in GOLD_SCORER_PACKAGES and not any(part.startswith("_") for part in parts)
            and not function.startswith("_"))


class ModelSource(Section):
    """A model a stage loads: where it is (its `model` key), its hub revision, and the safety keys every loaded model has."""

    model: str = Field(description="Hub id, local path or models:/NAME@ALIAS.")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) of a hub model.")
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE)
    trust_remote_code: bool = Field(False, description=TRUST_REMOTE_CODE)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return check_model_ref(value)

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        return refuse_remote_code(value)


class DataSource(Section):
    """Where a stage's rows come from, read the same way by both stages: a hub dataset, or local files that DVC pins."""

    source: str = Field(
        description="Hub dataset id, or a local file (.jsonl, .json, .csv, .parquet; .gz, .bz2, .xz or .zst compressed) "
        "or directory of them, relative to the project root.",
    )
    split: str = Field("train", description="Split to read (hub datasets and directories).")
    subset: str | None = Field(None, description="A hub dataset's configuration name (datasets' `name`), if it has several.")
    data_dir: str | None = Field(None, description="A hub dataset's sub-directory, e.g. harmless-base of Anthropic/hh-rlhf.")
    chosen_field: str = Field("chosen", description="Column holding the preferred answer or whole transcript.")
    rejected_field: str = Field("rejected", description="Column holding the other answer or transcript.")
    check_dvc: bool = Field(
        True,
        description="Refuse a local dataset that DVC does not track, or whose bytes differ from what its .dvc file "
        "pins. false: run on it anyway; the run records the file's own md5 and tags it unversioned.",
    )
