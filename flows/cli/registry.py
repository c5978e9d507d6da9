"""`alignflow runs`, `models`, `promote` and `rollback`: what was run, what was registered, and the champion."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.security import secrets
from flows.cli import ConfigOption, SetOption, app, console, explain_errors, fail, reachable_tracking, resolved
from flows.cli.run import prefect_api


@app.command()
@explain_errors
def runs(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption, limit: int = typer.Option(10, "-n")) -> None:
    """Recent pipeline runs: algorithm, status, stop reason, score gain, KL, gate result and model version. With --config (or
    --set), the runs of its experiment; without, the runs of every experiment of the tracking store."""
    from components.tracking import runs as tracking

    run_config = reachable_tracking(resolved(config, set_))
    uri = tracking.use_tracking(run_config.tracking)
    experiment = run_config.tracking.experiment if (config or set_) else None
    title = f"Recent runs of experiment {experiment}" if experiment else \
        "Recent runs of every experiment (--config F shows the runs of F's experiment)"
    table = Table(title=f"{title}, {secrets.redact_uri(uri)}")
    columns = ("run id", "algorithm", "start", "status", "stop reason", "score gain", "KL", "gates", "version")
    for column in (() if experiment else ("experiment",)) + columns:
        table.add_column(column)
    for row in refused_in_words(lambda: tracking.recent_runs(experiment, limit),
                                f"read the runs of {'experiment ' + experiment if experiment else 'the experiments'}"):
        gates = {None: "-", True: "[green]passed", False: "[red]failed"}[row["gates_passed"]]
        cells = (row["run_id"][:12], row["algorithm"] or "-", row["start_time"].strftime("%Y-%m-%d %H:%M"), row["status"], row["stop_reason"] or "-",
                 _num(row["score_gain"]), _num(row["kl"]), gates, row["model_version"] or "-")
        table.add_row(*((() if experiment else (escape(row["experiment"]),)) + cells))
    console.print(table)


def refused_in_words(read, action: str):
    """`read()`, with MLflow's 401/403 said in one line (who, and what to set) instead of a traceback."""
    from mlflow.exceptions import MlflowException

    from components.security.access import explain

    try:
        return read()
    except MlflowException as exc:
        message = explain(exc, action, "it", "READ", "an MLflow admin can give the reader role (README, 'Run it for a team')")
        if message is None:
            raise
        fail(message)


def _num(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


@app.command()
@explain_errors
def models(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    history: bool = typer.Option(False, "--history", help="Every move of the champion alias, oldest first, instead."),
) -> None:
    """Versions of the registered policy with their aliases, gate results, the reward model (a registered one by its
    version, with the preference data it was trained on) and the prompt data behind each.
    With --config (or --set), its registered model; without, every registered model of the store. A score from
    another reward model than the champion's (or the newest version's) is marked: scores of different reward models
    are not comparable."""
    from components.tracking import registry, runs as tracking

    run_config = reachable_tracking(resolved(config, set_))
    uri = tracking.use_tracking(run_config.tracking)
    names = [run_config.tracking.registered_model] if (config or set_) else refused_in_words(
        registry.registered_models, "list the registered models")
    for name in names:
        if history:
            show_history(name, run_config.tracking.champion_alias, uri)
            continue
        versions = refused_in_words(lambda: registry.list_versions(name), f"read the versions of {name}")
        reference = next((v for v in versions if run_config.tracking.champion_alias in v.aliases), versions[0] if versions else None)
        scorer = reference.tags.get("alignflow.reward_model") if reference else None
        table = Table(title=f"Registered model {name}, {secrets.redact_uri(uri)}" + ("" if (config or set_) else " (--config F shows F's model)"))
        for column in ("version", "aliases", "algorithm", "gates", "failed gates", "eval score", "KL", "reward model",
                       "reward data", "data", "promoted by"):
            table.add_column(column, overflow="fold")
        mismatched = False
        for version in versions:
            tags = version.tags
            gates = {"true": "[green]passed", "false": "[red]failed"}.get(tags.get(registry.GATES_TAG, ""), "-")
            score = tags.get(registry.SCORE_TAG, tags.get("eval_mean_score", "-"))[:7]
            if tags.get("alignflow.reward_model") != scorer:
                score, mismatched = f"{score} [yellow]*[/]", True
            data = f"{tags.get('alignflow.data_name', '?')} {tags.get('alignflow.data_md5', '-')[:8]}"
            reward_data = (f"{tags['alignflow.reward_data_name']} {tags['alignflow.reward_data_md5'][:8]}"
                           if tags.get("alignflow.reward_data_md5") else "-")
            table.add_row(str(version.version), ", ".join(version.aliases) or "-", tags.get(tracking.ALGORITHM_TAG, "-"), gates,
                          tags.get("alignflow.gates_failed") or "-",
                          score, tags.get(registry.KL_TAG, tags.get("eval_kl", "-"))[:7], escape(tags.get("alignflow.reward_model", "-")),
                          escape(reward_data), escape(data), tags.get("promoted_by", "-"))
        console.print(table)
        pending = registry.pending_move(name, run_config.tracking.champion_alias)
        if pending is not None:
            console.print(f"[yellow]an interrupted move of @{run_config.tracking.champion_alias} is pending[/] "
                          f"({escape(registry.describe(pending))}): the next promote or rollback completes it first")
        if mismatched:
            console.print(f"[yellow]*[/] scored by another reward model than {escape(str(scorer))} (the "
                          f"{'champion' if reference and run_config.tracking.champion_alias in reference.aliases else 'newest version'}"
                          "'s): not comparable with the other scores")
    if not names:
        console.print(f"no registered models in {secrets.redact_uri(uri)}")


def show_history(name: str, alias: str, uri: str) -> None:
    """The moves of `alias` of `name`, oldest first; rollbacks walk this history back (registry.champion_stack)."""
    from components.tracking import registry

    moves = refused_in_words(lambda: registry.history(name, alias), f"read the history of {name}")
    table = Table(title=f"@{alias} of {name}, every move, {secrets.redact_uri(uri)}")
    for column in ("#", "action", "from", "to", "by", "at", "forced", "reason"):
        table.add_column(column, overflow="fold")
    for move in moves:
        table.add_row(str(move["number"]), move["action"], move["from"] or "-", move["version"], escape(move["by"]),
                      move["at"], "yes" if move.get("forced") else "-", escape(move["reason"] or "-"))
    console.print(table)
    pending = registry.pending_move(name, alias)
    if pending is not None:
        console.print(f"[yellow]pending[/] (interrupted): {escape(registry.describe(pending))}; the next promote or "
                      "rollback completes it first")
    current = registry.get_champion(name, alias)
    target = None if current is None else registry.rollback_target(name, alias, current)
    console.print(f"a rollback now returns to version {target}" if target else "nothing to roll back to")


@app.command()
@explain_errors
def promote(
    version: str,
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    force: bool = typer.Option(False, help="Promote a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the version's tags)."),
) -> None:
    """Make VERSION the champion; refuses a version that failed its gates unless --force --reason. Takes the same lock
    as the pipeline's promotions, so promotions at the same time keep one champion and a consistent chain."""
    promote_version(reachable_tracking(resolved(config, set_)), version, force, reason)


def promote_version(run_config, version: str, force: bool, reason: Optional[str]) -> None:
    """`promote` for a policy's or a reward model's configuration: the lock (a Prefect server if needed), then the move."""
    from flows import promotion

    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    with prefect_api() if promotion.needs_prefect_server(run_config) else contextlib.nullcontext():
        moved, why = promotion.promote(run_config, version, force=force, reason=reason)
    console.print(f"{name}: {why}" if moved else f"{name}: {why}; @{alias} unchanged")


@app.command()
@explain_errors
def rollback(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the versions' tags)."),
) -> None:
    """Move the champion alias back to the previous champion."""
    roll_back(reachable_tracking(resolved(config, set_)), reason)


def roll_back(run_config, reason: Optional[str]) -> None:
    """`rollback` for a policy's or a reward model's configuration, under the same lock as promotions."""
    from flows import promotion

    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    with prefect_api() if promotion.needs_prefect_server(run_config) else contextlib.nullcontext():
        restored = promotion.rollback(run_config, reason=reason)
    console.print(f"{name} @{alias} is back on version {restored.version}")
