"""The reward-model stage, as Prefect tells it.

check inputs -> load and check the preference pairs -> (the MLflow run starts) -> train, a checkpoint at a time
-> evaluate on the held-out pairs (and the champion on the same pairs) -> gates -> register -> promote -> finish

`rlhf` runs both stages in order: this one, then the policy pipeline against the reward model it promoted. A stage
whose gates fail stops it there (unless `continue_on_gate_failure`), and its flow run ends Failed, naming the stage
and the gates; each stage's results are shown as it ends.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

from prefect import flow
from prefect.states import Failed

from components.config import RewardRunConfig, Validated, load_config
from components.errors import AlignflowError
from flows import reward_tasks as tasks
from flows import stage
from flows.pipeline import pipeline
from flows.reward_tasks import RewardResult


@flow(name="alignflow-reward", log_prints=True)
def reward_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                    resume_run_id: str | None = None, validated: Validated | None = None) -> RewardResult:
    """Train a reward model on human preference pairs; register it; promote it if every gate passes.

    A deployment's run gives a config path and `--set` strings, parsed here once; a command (or `rlhf`) running the
    flow in its own process hands over the configuration it validated (`validated`: on --resume, the run's own)."""
    if validated is not None:
        config: RewardRunConfig = validated.config
    else:
        config = load_config(config_path, overrides or [], schema=RewardRunConfig)
        if resume_run_id:  # the run's own configuration; other settings given here are refused, changing nothing
            config = stage.resumed_config(config, resume_run_id, config_path, overrides or [], "reward")
    resolved = stage.check_inputs(config, tasks.resolve)
    data_version = stage.check_data_version(config)
    data = tasks.prepare_pairs(config, resolved)

    run_id = stage.start_tracking(config, resume_run_id, "reward", tasks.provenance(config))

    def train_and_register() -> RewardResult:
        tasks.log_dataset(data, data_version)
        trainer, tokenizer = tasks.build(resolved, data)
        tasks.resume(trainer, config, run_id)
        while not trainer.done:
            tasks.train(trainer, trainer.step, config, run_id)

        candidate = tasks.evaluate("candidate", lambda: (trainer.model, tokenizer), data.held_out, config)
        champion_version = stage.find_champion(config)
        champion = None if champion_version is None else tasks.evaluate(
            "champion", tasks.registered_reward_model(config, champion_version), data.held_out, config, champion_version)
        report = tasks.gates(config, candidate, champion)
        model_dir = stage.export(config, run_id, tasks.save_model(trainer, tokenizer, config))
        version = tasks.register(config, model_dir, run_id, data_version, report, candidate, champion_version, data)
        promoted = stage.promote(config, version, report, champion_version, candidate.accuracy, tasks.ACCURACY_TAG,
                                 "alignflow-reward")
        return tasks.finish(run_id, trainer, candidate, report, version, promoted, champion_version, champion, config)

    return stage.settle(config, run_id, "reward", resume_run_id, train_and_register, RewardResult.from_json, stage.end_tags)


# Who shows a stage's results as it ends, inside `rlhf` (the reward stage's before the policy stage starts): the command
# running the flow here sets it to print its tables; each stage's one-line outcome is logged either way.
ON_STAGE_END: ContextVar[Callable[[str, Any], None] | None] = ContextVar("alignflow_on_stage_end", default=None)


class GatesFailed(AlignflowError):
    """`rlhf` ended because a stage's gates failed: stopped after that stage, or (continuing on purpose) at the end.
    Its flow run ends Failed with this message; `alignflow rlhf` prints it and exits 1. `reward` and `policy` are the
    stages' results (None for a stage that did not run)."""

    exit_code = 1

    def __init__(self, message: str, reward: RewardResult | None = None, policy=None):
        super().__init__(message)
        self.reward, self.policy = reward, policy


@flow(name="alignflow-rlhf", log_prints=True)
def rlhf(reward_config_path: str | None = None, reward_overrides: list[str] | None = None,
         config_path: str | None = None, overrides: list[str] | None = None,
         validated_reward: Validated | None = None, validated_policy: Validated | None = None,
         continue_on_gate_failure: bool = False):
    """Both stages in order: the reward model, then the policy against the reward-model champion (the version this
    run just promoted, or the one that kept the alias). Returns (reward result, policy result).

    A stage whose gates fail ends the flow run Failed, naming the stage and its failed gates: after the reward stage,
    the policy stage does not run. `continue_on_gate_failure` runs the next stage anyway (against the champion as it
    stands); the flow run still ends Failed, naming every stage whose gates failed, so a scheduled run never looks
    green when a model was kept from its alias.

    Both configurations are parsed once, here (the policy's with `reward.model` the champion's alias), unless the
    command that runs this flow hands them over validated; each stage's flow gets its own as it is."""
    if validated_reward is None:
        validated_reward = Validated(load_config(reward_config_path, reward_overrides or [], schema=RewardRunConfig))
    champion = champion_uri(validated_reward.config)
    if validated_policy is None:
        validated_policy = Validated(load_config(config_path, [*(overrides or []), f"reward.model={champion}"]))
    reward = reward_pipeline(validated=validated_reward)
    stage_ended("reward", reward, validated_reward.config)
    if not reward.gates.passed:
        if not continue_on_gate_failure:
            return gates_failed(f"{failed_stage('reward', reward, validated_reward.config)}: rlhf stopped before the "
                                f"policy stage. To train the policy against {champion} as it stands anyway: "
                                "alignflow rlhf --continue-on-gate-failure (the flow's continue_on_gate_failure)",
                                reward)
        print(f"continuing on purpose (continue_on_gate_failure): the policy trains against {champion} as it stands")
    elif not reward.promoted:
        print(f"reward model version {reward.model_version} passed its gates but was not promoted (the reward "
              f"stage's log says why): the policy trains against {champion} as it stands")
    policy = pipeline(validated=validated_policy)
    stage_ended("policy", policy, validated_policy.config)
    failed = [failed_stage(name, result, run.config) for name, result, run in
              (("reward", reward, validated_reward), ("policy", policy, validated_policy)) if not result.gates.passed]
    if failed:
        went_on = "" if reward.gates.passed else " (rlhf went on past the reward stage on purpose: continue_on_gate_failure)"
        return gates_failed("; ".join(failed) + went_on, reward, policy)
    return reward, policy


def stage_ended(stage: str, result, config) -> None:
    """A stage of `rlhf` has ended: its outcome in one line (the flow's log), then its results shown (ON_STAGE_END)."""
    name, alias = config.tracking.registered_model, config.tracking.champion_alias
    state = f"promoted to @{alias}" if result.promoted else f"not promoted (@{alias} unchanged)"
    print(f"the {stage} stage ended: {result.gates.summary()}; {name} version {result.model_version} {state}")
    show = ON_STAGE_END.get()
    if show is not None:
        show(stage, result)


def failed_stage(stage: str, result, config) -> str:
    """`the reward stage failed its gates (1 of 3 gates failed: accuracy 0.62 < min_accuracy 1.0; failed gates:
    accuracy), NAME version 4 registered, not promoted (@champion unchanged)`."""
    return (f"the {stage} stage failed its gates ({result.gates.summary()}; failed gates: "
            f"{', '.join(result.gates.failed_names)}), {config.tracking.registered_model} version {result.model_version} "
            f"registered, not promoted (@{config.tracking.champion_alias} unchanged)")


def gates_failed(message: str, reward: RewardResult, policy=None):
    """The flow run's end when a stage's gates failed: a Failed state with the reason (what the Prefect UI shows a
    scheduled run by); calling the flow raises GatesFailed with it."""
    return Failed(message=message, data=GatesFailed(message, reward, policy))


def champion_uri(reward_config: RewardRunConfig) -> str:
    """The reward-model champion a policy trains against after `rlhf`'s reward stage: `models:/NAME@ALIAS`."""
    return f"models:/{reward_config.tracking.registered_model}@{reward_config.tracking.champion_alias}"
