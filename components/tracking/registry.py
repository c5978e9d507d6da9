"""The model registry: log a policy, register it once per run, promote and roll back the champion alias.

Every change here is idempotent, so a run killed at any point and resumed ends as an uninterrupted run does:
  - `log_policy` reuses the policy a killed attempt already logged to the run (and deletes one left half-logged);
  - `register` creates the version WITH all its tags in one call, and a resumed run finds its version by run id
    instead of registering a second one;
  - `promote` and `rollback` write their move ahead on the registered model before moving the alias, and their
    record after (the versions' tags, then the alias's history), so a move interrupted between the two is completed
    by the next registry command, whichever it is, before it acts. They must run under the registry's promotion
    lock (flows/promotion.py takes it), so that a compare-and-set (`evaluated_against`) and the history stay
    consistent when several runs and people promote at once.

Version tags written here: the caller's (gates, data, lineage under the runs' `alignflow.` names, the evaluation
under its metrics' names), then by promotion `promoted_by`,
`promoted_at`, `promotion_reason`, `forced`, `previous_<alias>`; by rollback `rolled_back_*`. Registered-model tags:
`alignflow.pending_move.<alias>` and `alignflow.history.<alias>.<number>` (one per move).
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.security import access
from components.config import parse_registry_uri
from components.errors import UserError
from components.faults import crash_point
from components.models.loading import load_policy
from components.models.uris import adapter_base

GATES_TAG = "alignflow.gates_passed"
SCORE_TAG = "eval/candidate/mean_score"  # the version's evaluation, under the metric's own name
KL_TAG = "eval/candidate/kl"
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class PromotionError(UserError):
    """A promotion or rollback that must not happen; the message says why and what to do."""


# --- logging and registering a policy ---------------------------------------------------------


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


def log_policy(
    policy_dir: Path,
    *,
    artifact_name: str = "policy",
    model_config: dict[str, Any] | None = None,
    pip_requirements: list[str] | None = None,
) -> str:
    """Log the saved policy (model + tokenizer, or LoRA adapter + tokenizer) to the active run; returns its model URI.

    A causal LM is logged in MLflow's transformers flavour as a text-generation pipeline; a LoRA adapter as a PEFT
    model on its base (only the adapter is stored; a local base is referenced by path, a hub base by id). An
    encoder-decoder (T5, BART), which transformers 5 no longer serves through a pipeline, is logged as a pyfunc
    `Seq2SeqGenerator` holding the saved folder. Either way `mlflow.pyfunc.load_model(...).predict` generates text.

    A policy this run logged before (a resumed run) is reused; one left half-logged by a killed attempt is deleted
    (or, where the account may not delete, tagged `alignflow.abandoned`)."""
    from transformers import AutoConfig, AutoTokenizer


    reused = _reuse_logged(artifact_name)
    if reused is not None:
        return reused
    policy_dir = Path(policy_dir)
    base = adapter_base(policy_dir)
    if base is None and not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a saved model (no config.json) or adapter (no adapter_config.json)")
    pip_requirements = pip_requirements or default_pip_requirements(with_peft=base is not None)
    if getattr(AutoConfig.from_pretrained(base or policy_dir), "is_encoder_decoder", False):
        info = mlflow.pyfunc.log_model(
            name=artifact_name, python_model=Seq2SeqGenerator(), artifacts={"policy": str(policy_dir)},
            code_paths=[str(Path(__file__).resolve().parent)], pip_requirements=pip_requirements, model_config=model_config,
        )
    else:
        if base is None:
            model = load_policy(str(policy_dir))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_policy(base), str(policy_dir))
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": AutoTokenizer.from_pretrained(policy_dir)},
            name=artifact_name, task="text-generation", pip_requirements=pip_requirements, model_config=model_config,
            base_model_path=base if base is not None and Path(base).is_dir() else None,
        )
    return info.model_uri


def log_reward_model(model_dir: Path, *, artifact_name: str = "reward_model", pip_requirements: list[str] | None = None) -> str:
    """Log a saved reward model (sequence classifier with one output, and its tokenizer) to the active run in MLflow's
    transformers flavour, as a text-classification pipeline whose raw score is the reward; returns its model URI.
    As `log_policy`: one logged by an earlier attempt of this run is reused, one left half-logged deleted."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reused = _reuse_logged(artifact_name)
    if reused is not None:
        return reused
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": AutoTokenizer.from_pretrained(model_dir)}, name=artifact_name,
        task="text-classification", pip_requirements=pip_requirements or default_pip_requirements(),
        inference_config={"function_to_apply": "none", "top_k": None},
    )
    return info.model_uri


def _reuse_logged(artifact_name: str) -> str | None:
    """The URI of the model `artifact_name` the active run logged completely before (a resumed run); one left
    half-logged by a killed attempt is deleted (or, where the account may not delete, tagged abandoned)."""
    run = mlflow.active_run()
    for logged in mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    ):
        if logged.name != artifact_name:
            continue
        if str(logged.status).endswith("READY"):
            return logged.model_uri
        try:
            MlflowClient().delete_logged_model(logged.model_id)
        except MlflowException as exc:  # deleting needs MANAGE on the experiment; a service account may hold only EDIT
            if exc.error_code != "PERMISSION_DENIED":
                raise
            MlflowClient().set_logged_model_tags(logged.model_id, {"alignflow.abandoned": "a killed attempt's half-logged model"})
    return None


def version_of_run(name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` that run `run_id` registered, if any (at most one: `register` never makes a second)."""
    try:
        found = MlflowClient().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def version_tags(gates_passed: bool, gates_failed: list[str], data, run_id: str, evaluated_against: str | None, *,
                 git_commit: str, flow_run_id: str) -> dict[str, Any]:
    """The tags every stage's version is registered with, beside the stage's own: its gates, the data it was trained
    on (a DatasetVersion: md5, name, .dvc file), where it came from, and the champion it was evaluated against.
    `lineage` reads them back."""
    return {GATES_TAG: gates_passed, "alignflow.gates_failed": ",".join(gates_failed), **data.as_tags(),
            "alignflow.git_commit": git_commit, "alignflow.prefect_flow_run_id": flow_run_id, "mlflow_run_id": run_id,
            "evaluated_against": evaluated_against or ""}


def lineage(uri: str, role: str) -> dict[str, str]:
    """The tags that tie a version to the registered model it was made with (`role`: "reward" for the reward model a
    policy trained against): for `models:/NAME/VERSION`, its name and version, the data behind it and its run
    (`version_tags`); nothing for any other model URI."""
    parsed = parse_registry_uri(uri) if uri.startswith("models:") else None
    if parsed is None or parsed[2] is None:
        return {}
    name, _, version = parsed
    tags = namespaced(get_version(name, version).tags)
    return {f"alignflow.{role}_model_name": name, f"alignflow.{role}_model_version": version,
            f"alignflow.{role}_data_md5": tags.get("alignflow.data_md5", ""),
            f"alignflow.{role}_data_name": tags.get("alignflow.data_name", ""),
            f"alignflow.{role}_model_run_id": tags.get("mlflow_run_id", "")}


# What a run and its version are both tagged with has one name, the run's `alignflow.NAME`; versions registered by
# earlier releases carry these as NAME, which every reader of a version's tags still takes (`namespaced`).
UNNAMESPACED_TAGS = ("gates_passed", "gates_failed", "data_md5", "data_name", "data_dvc_file", "data_versioned",
                     "git_commit", "prefect_flow_run_id", "algorithm", "stop_reason", "base_policy", "reward_model",
                     "reward_model_name", "reward_model_version", "reward_data_md5", "reward_data_name",
                     "reward_model_run_id", "stage", "base_model")


def namespaced(tags: dict[str, str]) -> dict[str, str]:
    """A version's tags with those an earlier release wrote as NAME also under their name now, `alignflow.NAME`
    (where the version has no such tag already)."""
    found = dict(tags)
    for old in UNNAMESPACED_TAGS:
        if old in tags:
            found.setdefault(f"alignflow.{old}", tags[old])
    return found


def register(name: str, run_id: str, model_uri: str, tags: dict[str, Any]) -> ModelVersion:
    """Register the run's logged policy as a version of `name`, with all its tags in the same call. A run that already
    registered one (a resumed run) gets that version back, any tag it lacks added."""
    client = MlflowClient()
    tags = {key: tag_value(value) for key, value in tags.items()}
    existing = version_of_run(name, run_id)
    if existing is None:
        existing = mlflow.register_model(model_uri, name, tags=tags)
    else:
        for key, value in tags.items():
            if key not in existing.tags:
                client.set_model_version_tag(name, existing.version, key, value)
    return client.get_model_version(name, str(existing.version))


class Seq2SeqGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc for an encoder-decoder policy: prompts (a list of strings or a one-column DataFrame) -> generated
    texts. The artifact `policy` is a saved model, or a LoRA adapter on its base model."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer


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


# --- the champion -----------------------------------------------------------------------------


def local_store_lock_path(tracking_uri: str) -> Path | None:
    """The lock file that serialises promotions on a registry kept in a local SQLite file, or None for a server."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    return database.with_name(database.name + ".promotion-lock")


def get_champion(name: str, alias: str = "champion") -> ModelVersion | None:
    """The version holding `alias`, or None when the model or the alias does not exist."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _MISSING or access.model_is_missing(exc, name):  # basic auth: 403 for no such model
            return None
        raise


def get_version(name: str, version: str | int) -> ModelVersion:
    """The version, or a PromotionError that lists the versions that do exist."""
    try:
        return MlflowClient().get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in _MISSING:
            raise
    existing = [str(v.version) for v in list_versions(name)]
    listing = f"its versions are {', '.join(reversed(existing))}" if existing else "it has no versions"
    raise PromotionError(f"{name} has no version {version}: {listing} (see `alignflow models`)") from None


@access.explains_denial("move @{alias} of {name} to version {version}")
def promote(
    name: str,
    version: str | int,
    alias: str = "champion",
    *,
    force: bool = False,
    reason: str | None = None,
    user: str | None = None,
    evaluated_against: str | None | bool = False,
    score: float | None = None,
    score_tag: str = SCORE_TAG,
) -> tuple[bool, str]:
    """Point `alias` at `version`; returns (moved, what happened). Call under the promotion lock.

    A version is promoted without `force` only when its gates passed as its own run recorded them (`verified_gates`):
    an `alignflow.gates_passed` tag set by hand is not enough. Otherwise `force` with a `reason`. For a pipeline run,
    `evaluated_against` is the champion its gates compared it with (None: there was none) and `score` its evaluation
    score: if another version took the alias since, this one takes it only with a higher score (compare-and-set; the
    holder's score is its `score_tag`). The default False skips that check (a person promoting by hand).

    A move another command left pending is completed first (`complete_pending`). For a person, a pending move that
    was this same promotion ends the command; any other is completed and the command refused, naming it, so that
    nobody moves the alias on a state they did not see. The pipeline goes on to its compare-and-set."""
    client = MlflowClient()
    version = str(version)
    target = get_version(name, version)
    completed = complete_pending(name, alias)
    if completed is not None:
        if completed["action"] == "promote" and completed["version"] == version:
            return True, f"version {version} is now {alias} (its interrupted promotion, {describe(completed)}, completed)"
        if evaluated_against is False:
            raise PromotionError(f"an interrupted move of @{alias} was pending ({describe(completed)}): it is completed "
                                 f"now, and @{alias} is on version {completed['version']}. Nothing else was changed: "
                                 f"run `alignflow promote {version}` again if you still want it")
    current = get_champion(name, alias)
    if current is not None and str(current.version) == version:
        return False, f"version {version} is already {alias}"
    if evaluated_against is not False:  # a pipeline's resume never undoes a rollback of the version it promoted
        undone = next((m for m in history(name, alias) if m["action"] == "rollback" and m["from"] == version), None)
        if undone is not None:
            return False, (f"version {version} was rolled back ({describe(undone)}); {alias} unchanged (a person "
                           f"may promote it again: alignflow promote {version})")
    passed, why = verified_gates(target)
    if not passed:
        if not force:
            raise PromotionError(f"refusing to make {name} version {version} the {alias}: {why}. To promote it anyway, "
                                 f"force it with a reason (alignflow promote {version} --force --reason \"...\")")
        if not reason or not reason.strip():
            raise PromotionError(f"forcing {name} version {version} to {alias} needs a reason (who asked, and why)")
    if evaluated_against is not False and current is not None and str(current.version) != (evaluated_against or ""):
        current_score = float(current.tags.get(score_tag, current.tags.get("eval_mean_score", "-inf")))  # or its old name
        if score is None or current_score >= score:
            return False, (f"version {current.version} became {alias} meanwhile with score {current_score:.4g} "
                           f">= {score if score is not None else float('nan'):.4g}; {alias} unchanged")
    move = _move("promote", name, alias, version, current, user, reason or "all gates passed", forced=not passed)
    client.set_registered_model_tag(name, pending_tag(alias), json.dumps(move))
    crash_point("promote.intent")
    client.set_registered_model_alias(name, alias, version)
    crash_point("promote.alias_moved")
    _complete_move(client, name, alias, move)
    return True, f"version {version} is now {alias}"


@access.explains_denial("move @{alias} of {name} back")
def rollback(name: str, alias: str = "champion", *, user: str | None = None, reason: str | None = None) -> ModelVersion:
    """Move `alias` back to the champion before the current one, as the alias's history has it: each rollback undoes
    the newest promotion not yet undone, so rolling back again goes one further and never loops. Call under the
    promotion lock. A pending rollback (a rollback killed midway) is completed and counts as this one; another pending
    move is completed and this rollback refused, naming it."""
    client = MlflowClient()
    completed = complete_pending(name, alias)
    if completed is not None:
        if completed["action"] == "rollback":
            return client.get_model_version(name, completed["version"])
        raise PromotionError(f"an interrupted move of @{alias} was pending ({describe(completed)}): it is completed "
                             f"now, and @{alias} is on version {completed['version']}. Nothing was rolled back: run "
                             "`alignflow rollback` again if you still want it")
    current = get_champion(name, alias)
    if current is None:
        raise PromotionError(f"{name} has no {alias} to roll back")
    champions = champion_stack(history(name, alias))
    if champions and champions[-1] != str(current.version):
        raise PromotionError(f"@{alias} of {name} is on version {current.version}, but alignflow's history of it ends "
                             f"on version {champions[-1]}: the alias was moved outside alignflow. Promote the version "
                             f"you want instead (alignflow promote VERSION)")
    previous = rollback_target(name, alias, current)
    if not previous:
        raise PromotionError(f"{name} version {current.version} is the first {alias} alignflow's history has: nothing "
                             "to roll back to (see `alignflow models --history`)")
    get_version(name, previous)
    move = _move("rollback", name, alias, previous, current, user, reason or "", forced=False)
    client.set_registered_model_tag(name, pending_tag(alias), json.dumps(move))
    crash_point("rollback.intent")
    client.set_registered_model_alias(name, alias, previous)
    crash_point("rollback.alias_moved")
    _complete_move(client, name, alias, move)
    return client.get_model_version(name, previous)


# A move of an alias is written ahead on the registered model (tag `pending_tag(alias)`: the move's JSON while in
# progress, NO_MOVE after) and, once made, appended to the alias's history: one tag per move, numbered, never
# rewritten (`history_tag`). Tags of the registered model need only EDIT on it, which promoters hold.
NO_MOVE = "none"  # overwritten, not deleted: deleting a tag needs MANAGE, and promoters hold only EDIT
_HISTORY_PREFIX = "alignflow.history."


def pending_tag(alias: str) -> str:
    return f"alignflow.pending_move.{alias}"


def history_tag(alias: str, number: int) -> str:
    return f"{_HISTORY_PREFIX}{alias}.{number:06d}"


def _move(action: str, name: str, alias: str, version: str, current: ModelVersion | None, user: str | None,
          reason: str, forced: bool) -> dict:
    return {"number": max((m["number"] for m in history(name, alias)), default=0) + 1, "action": action, "version": version,
            "from": str(current.version) if current is not None else "", "by": user or current_identity(),
            "at": _now(), "reason": reason[:500], "forced": forced}


def describe(move: dict) -> str:
    """One line for a move: `promote 2 -> 3 by alice at ...`."""
    return (f"{move['action']} {move['from'] or '(none)'} -> {move['version']} by {move['by']} at {move['at']}"
            + (" (forced)" if move.get("forced") else ""))


def pending_move(name: str, alias: str = "champion") -> dict | None:
    """The move of `alias` written ahead and not completed, or None."""
    try:
        value = MlflowClient().get_registered_model(name).tags.get(pending_tag(alias))
    except MlflowException as exc:
        if exc.error_code in _MISSING or access.model_is_missing(exc, name):  # basic auth: 403 for no such model
            return None
        raise
    return None if value in (None, NO_MOVE) else json.loads(value)


def complete_pending(name: str, alias: str = "champion") -> dict | None:
    """Complete the move of `alias` a killed command left pending (the alias moved, the versions' records, the
    history); returns that move, or None when nothing was pending. Idempotent."""
    move = pending_move(name, alias)
    if move is None:
        return None
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, move["version"])
    crash_point(f"{move['action']}.alias_moved")  # the state a kill there leaves, whether the move began here or not
    _complete_move(client, name, alias, move)
    return move


def _complete_move(client: MlflowClient, name: str, alias: str, move: dict) -> None:
    if move["action"] == "rollback":
        client.set_model_version_tag(name, move["from"], f"rolled_back_from_{alias}", f"{move['at']} by {move['by']}")
        record = {"rolled_back_by": move["by"], "rolled_back_at": move["at"], "rollback_reason": move["reason"],
                  "rolled_back_from": move["from"]}
    else:
        record = {"promoted_by": move["by"], "promoted_at": move["at"], "promotion_reason": move["reason"],
                  "forced": tag_value(move["forced"])}
        if move["from"]:
            record[f"previous_{alias}"] = move["from"]
    for key, value in record.items():
        client.set_model_version_tag(name, move["version"], key, value)
    client.set_registered_model_tag(name, history_tag(alias, move["number"]), json.dumps(move))
    client.set_registered_model_tag(name, pending_tag(alias), NO_MOVE)


def history(name: str, alias: str = "champion") -> list[dict]:
    """Every completed move of `alias`, oldest first: {number, action, version, from, by, at, reason, forced}."""
    try:
        tags = MlflowClient().get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code in _MISSING or access.model_is_missing(exc, name):
            return []
        raise
    prefix = f"{_HISTORY_PREFIX}{alias}."
    return [json.loads(value) for key, value in sorted(tags.items()) if key.startswith(prefix)]


def champion_stack(moves: list[dict]) -> list[str]:
    """The champions a rollback returns to, oldest first, the current one last: each promotion pushes its version,
    each rollback pops the newest (`promote 1, 2, 3, 2` then rollbacks walk 3, 2, 1). A move that did not start from
    the top (the first moves after this history began, an alias moved outside alignflow) pushes where it started."""
    stack: list[str] = []
    for move in moves:
        if move["action"] == "promote":
            if move["from"] and (not stack or stack[-1] != move["from"]):
                stack.append(move["from"])
            stack.append(move["version"])
        else:
            if stack and stack[-1] == move["from"]:
                stack.pop()
            if not stack or stack[-1] != move["version"]:
                stack.append(move["version"])
    return stack


def rollback_target(name: str, alias: str, current: ModelVersion) -> str | None:
    """The version a rollback of `alias` (held by `current`) returns to: the champion before it in the history; at
    the bottom of the history, the `previous_<alias>` the holder was tagged with before the history began; else None."""
    champions = champion_stack(history(name, alias))
    if len(champions) > 1:
        return champions[-2]
    return current.tags.get(f"previous_{alias}") or None


GATES_METRIC = "gate/passed"  # what the pipeline's gates task logs on the run (components/evaluation/gates.py)


def verified_gates(version: ModelVersion) -> tuple[bool, str]:
    """Whether `version` passed its gates, as the run that registered it recorded them (its `gate/passed` metric,
    written by the pipeline under its own account), and if not, why. The version's `alignflow.gates_passed` tag (or
    `gates_passed`, as earlier releases wrote it) must agree: a tag set by hand on the version proves nothing."""
    tag = namespaced(version.tags).get(GATES_TAG)
    if tag != "true":
        return False, ("its promotion gates failed" if tag == "false" else f"it has no gate result (tag {GATES_TAG})")
    try:
        recorded = MlflowClient().get_run(version.run_id).data.metrics.get(GATES_METRIC) if version.run_id else None
    except MlflowException as exc:
        if exc.error_code == "PERMISSION_DENIED":
            return False, (f"its run {version.run_id} cannot be read by this account to check its {GATES_TAG} tag "
                           "against the gate result the run recorded")
        if exc.error_code not in _MISSING:
            raise
        recorded = None
    if recorded is None:
        return False, (f"its run {version.run_id or '(none)'} recorded no gate result ({GATES_METRIC}), so its "
                       f"{GATES_TAG} tag cannot be checked")
    if recorded != 1.0:
        return False, (f"its {GATES_TAG} tag says true but its run {version.run_id} recorded {GATES_METRIC}="
                       f"{recorded:g}: the tag was changed after the pipeline wrote it")
    return True, "its gates passed"


@dataclass(frozen=True)
class VersionSummary:
    version: int
    aliases: list[str]
    tags: dict[str, str]


def registered_models() -> list[str]:
    """The names of every registered model of the store."""
    return sorted(model.name for model in MlflowClient().search_registered_models())


def list_versions(name: str) -> list[VersionSummary]:
    """Every version of a registered model, newest first, with its aliases and tags (`namespaced`)."""
    client = MlflowClient()
    try:
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases_by_version.setdefault(str(version), []).append(alias)
    except MlflowException as exc:
        if exc.error_code in _MISSING or access.model_is_missing(exc, name):
            return []
        raise
    versions = client.search_model_versions(f"name='{name}'")
    return sorted(
        (VersionSummary(int(v.version), sorted(aliases_by_version.get(str(v.version), [])), namespaced(v.tags))
         for v in versions),
        key=lambda summary: summary.version,
        reverse=True,
    )


# --- helpers ----------------------------------------------------------------------------------


def tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def current_identity() -> str:
    """Who is acting, as the registry knows them: the MLflow account (MLFLOW_TRACKING_USERNAME) on a server with
    accounts; else the login name of this process."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"]
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
