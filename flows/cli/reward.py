"""`alignflow reward run|deploy|models|promote|rollback`: the reward-model stage, as `alignflow run`, `deploy`, `models`,
`promote` and `rollback` are the policy's; and `alignflow rlhf`: both stages in order."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.security import secrets
from components.config import PROJECT_ROOT, RewardRunConfig, Validated, given_keys
from flows.cli import CronOption, IntervalOption, SetOption, app, console, explain_errors, fail, flow_overrides, reachable_tracking, resolved
from flows.cli.data import ensure_demo_data
from flows.cli.registry import promote_version, refused_in_words, roll_back
from flows.cli.run import deploy_flow, prefect_api, trigger_remote

reward_app = typer.Typer(help="The reward-model stage: train, evaluate, gate, register and promote reward models.",
                         no_args_is_help=True)
app.add_typer(reward_app, name="reward")

RewardConfigOption = typer.Option(None, "--config", "-c", help="Reward-stage configuration (YAML). Default: configs/reward.yaml.")
REWARD_FLOW = "alignflow-reward"


def reward_config(config: Optional[Path], overrides: list[str]) -> RewardRunConfig:
    return resolved(config, overrides, schema=RewardRunConfig)


def prepare_demo_base(run: RewardRunConfig) -> None:
    """The demo's reward stage starts from the demo's instruct model: bootstrapped (with its data) if missing."""
    if run.model.base.startswith("artifacts/demo") or run.data.source.startswith("data/demo"):
        from components.demo.bootstrap import bootstrap

        ensure_demo_data()
        if run.model.base.startswith("artifacts/demo"):
            bootstrap(PROJECT_ROOT / "data/demo", PROJECT_ROOT / "artifacts/demo")


@reward_app.command("run")
@explain_errors
def reward_run(
    config: Optional[Path] = RewardConfigOption,
    set_: list[str] = SetOption,
    resume: Optional[str] = typer.Option(None, help="Resume this MLflow run id from its last checkpoint."),
    remote: Optional[str] = typer.Option(None, help="Trigger this deployment of the reward flow on the Prefect server."),
    wait: bool = typer.Option(False, help="With --remote: wait for the flow run to finish and report its state."),
) -> None:
    """Train a reward model on preference pairs, evaluate it on the held-out pairs, gate, register, promote."""
    run_config = reward_config(config, set_)  # parsed and validated once; the flow gets the object (a worker: path, --set)
    if remote:
        trigger_remote(remote if "/" in remote else f"{REWARD_FLOW}/{remote}",
                       {"config_path": str(config) if config else None, "overrides": flow_overrides(set_, here=False),
                        "resume_run_id": resume}, wait)
        return
    if resume:  # another stage's run, or settings other than the recorded ones: one line, changing nothing
        from components.tracking.runs import resumed_config

        run_config = resumed_config(run_config, resume, "reward", given_keys(config, set_))
    prepare_demo_base(run_config)
    from components.data.preferences import load_pairs

    load_pairs(run_config.data, PROJECT_ROOT)  # a file that cannot be read, a missing column: one line, before any work
    from flows.reward_pipeline import reward_pipeline

    with prefect_api():
        result = reward_pipeline(resume_run_id=resume, validated=Validated(run_config))
    show_reward_result(result, run_config)


def show_reward_result(result, run_config: RewardRunConfig) -> None:
    from components.tracking.runs import resolve_tracking_uri

    evaluation = result.evaluation
    table = Table(title=f"Reward model on {evaluation.n} held-out pairs")
    for column in ("metric", "candidate") + (("champion",) if result.champion_accuracy is not None else ()):
        table.add_column(column, justify="left" if column == "metric" else "right")
    low, high = evaluation.accuracy_ci
    table.add_row("accuracy", f"{evaluation.accuracy:.4f} [{low:.3f}, {high:.3f}]",
                  *((f"{result.champion_accuracy:.4f}",) if result.champion_accuracy is not None else ()))
    for name, value in (("mean margin", evaluation.mean_margin), ("calibration error", evaluation.calibration_error)):
        table.add_row(name, f"{value:.4f}", *(("",) if result.champion_accuracy is not None else ()))
    for bucket in evaluation.by_length:
        table.add_row(f"accuracy, length {bucket['bucket']} (n={bucket['n']})", f"{bucket['accuracy']:.4f}",
                      *(("",) if result.champion_accuracy is not None else ()))
    console.print(table)
    console.print(result.gates.to_rich_table())
    for note in result.gates.notes:
        console.print(f"[dim]{escape(note)}[/]")
    colour = "green" if result.gates.passed else "red"
    console.print(f"gates: [{colour}]{escape(result.gates.summary())}[/]")
    name, alias = run_config.tracking.registered_model, run_config.tracking.champion_alias
    state = f"promoted to @{alias}" if result.promoted else f"not promoted (@{alias} unchanged)"
    console.print(f"{result.steps} steps, {result.pairs_seen} pairs; registered [bold]{name}[/] version "
                  f"[bold]{result.model_version}[/]: {state}")
    console.print(f"policies use it with --set reward.model=models:/{name}@{alias}")
    uri = secrets.redact_uri(resolve_tracking_uri(run_config.tracking))
    console.print(f"MLflow run {result.run_id}; open the UI with:\n  mlflow ui --backend-store-uri {uri}"
                  if uri.startswith("sqlite") else f"MLflow run {result.run_id} at {uri}")


@reward_app.command("deploy")
@explain_errors
def reward_deploy(
    config: Optional[Path] = RewardConfigOption,
    set_: list[str] = SetOption,
    cron: Optional[str] = CronOption,
    interval: Optional[int] = IntervalOption,
    name: str = typer.Option("scheduled", help="Deployment name."),
    pool: str = typer.Option("alignflow-pool", help="Work pool whose workers run it (a process pool)."),
) -> None:
    """Create (or update) the reward flow's deployment on the Prefect server, with its schedule and work pool."""
    reward_config(config, set_)
    overrides = flow_overrides(set_, here=False)  # refused before anything reaches the server
    deploy_flow("flows/reward_pipeline.py:reward_pipeline", REWARD_FLOW, name, pool, cron, interval,
                {"config_path": str(config) if config else None, "overrides": overrides})


@reward_app.command("models")
@explain_errors
def reward_models(config: Optional[Path] = RewardConfigOption, set_: list[str] = SetOption) -> None:
    """Versions of the registered reward model: aliases, gates, held-out accuracy, base model and preference data."""
    from components.tracking import registry, runs as tracking

    run_config = reachable_tracking(reward_config(config, set_))
    uri = tracking.use_tracking(run_config.tracking)
    name = run_config.tracking.registered_model
    versions = refused_in_words(lambda: registry.list_versions(name), f"read the versions of {name}")
    table = Table(title=f"Registered reward model {name}, {secrets.redact_uri(uri)}")
    for column in ("version", "aliases", "gates", "failed gates", "accuracy", "95% CI", "base model", "data", "promoted by"):
        table.add_column(column)
    for version in versions:
        tags = version.tags
        gates = {"true": "[green]passed", "false": "[red]failed"}.get(tags.get(registry.GATES_TAG, ""), "-")
        ci = f"[{tags.get('eval/accuracy_ci_low', '-')[:5]}, {tags.get('eval/accuracy_ci_high', '-')[:5]}]"
        table.add_row(str(version.version), ", ".join(version.aliases) or "-", gates, tags.get("alignflow.gates_failed") or "-",
                      tags.get("eval/accuracy", "-")[:6], ci, escape(tags.get("alignflow.base_model", "-")),
                      escape(f"{tags.get('alignflow.data_name', '?')} {tags.get('alignflow.data_md5', '-')[:8]}"), tags.get("promoted_by", "-"))
    console.print(table if versions else f"no versions of {name} in {secrets.redact_uri(uri)}")


@reward_app.command("promote")
@explain_errors
def reward_promote(
    version: str,
    config: Optional[Path] = RewardConfigOption,
    set_: list[str] = SetOption,
    force: bool = typer.Option(False, help="Promote a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the version's tags)."),
) -> None:
    """Make VERSION the reward-model champion; refuses a version that failed its gates unless --force --reason."""
    promote_version(reward_config(config, set_), version, force, reason)


@reward_app.command("rollback")
@explain_errors
def reward_rollback(
    config: Optional[Path] = RewardConfigOption,
    set_: list[str] = SetOption,
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the versions' tags)."),
) -> None:
    """Move the reward-model champion alias back to the previous champion."""
    roll_back(reward_config(config, set_), reason)


@app.command()
@explain_errors
def rlhf(
    reward_config_path: Optional[Path] = typer.Option(None, "--reward-config", help="Reward-stage configuration (default configs/reward.yaml)."),
    reward_set: list[str] = typer.Option([], "--reward-set", help="Override a reward-stage setting (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Policy configuration (default configs/demo.yaml)."),
    set_: list[str] = SetOption,
    continue_on_gate_failure: bool = typer.Option(
        False, "--continue-on-gate-failure",
        help="Run the policy stage even when the reward stage's gates fail (against the champion as it stands); rlhf "
             "still ends failed (exit 1) naming the stage. Default: stop after a stage whose gates fail."),
) -> None:
    """Both stages in order: train and gate a reward model, then align the policy against the reward-model champion.
    Each stage's results are shown as it ends. A stage whose gates fail stops it there: exit 1, naming the stage and
    its failed gates (--continue-on-gate-failure goes on to the policy stage, and still exits 1)."""
    from flows.cli.data import prepare_demo_if_needed
    from flows.cli.run import show_result
    from flows.reward_pipeline import ON_STAGE_END, champion_uri, rlhf as rlhf_flow

    reward_run_config = reward_config(reward_config_path, reward_set)  # each configuration parsed and validated once
    policy_config = resolved(config, [*set_, f"reward.model={champion_uri(reward_run_config)}"])
    if (reward_run_config.tracking.tracking_uri or None) != (policy_config.tracking.tracking_uri or None):
        fail("the reward stage and the policy pipeline must use one tracking store: set tracking.tracking_uri alike in "
             "both (--reward-set tracking.tracking_uri=... and --set tracking.tracking_uri=...)")
    prepare_demo_base(reward_run_config)
    prepare_demo_if_needed(policy_config)

    def show(stage: str, result) -> None:  # as each stage ends: the reward stage's before the policy stage starts
        if stage == "policy":
            show_result(result, policy_config)
            return
        show_reward_result(result, reward_run_config)
        if not result.gates.passed and continue_on_gate_failure:
            console.print(f"[yellow]continuing on purpose (--continue-on-gate-failure):[/] the policy trains against "
                          f"{escape(champion_uri(reward_run_config))} as it stands", highlight=False)

    shown = ON_STAGE_END.set(show)
    try:
        with prefect_api():  # a stage whose gates fail ends the flow with GatesFailed: its message, exit 1
            rlhf_flow(validated_reward=Validated(reward_run_config), validated_policy=Validated(policy_config),
                      continue_on_gate_failure=continue_on_gate_failure)
    finally:
        ON_STAGE_END.reset(shown)
