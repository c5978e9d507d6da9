"""The reward-model stage, as Prefect tells it.

check inputs -> load and check the preference pairs -> (the MLflow run starts) -> train, a checkpoint at a time
-> evaluate on the held-out pairs (and the champion on the same pairs) -> gates -> register -> promote -> finish

`rlhf` runs both stages in order: this one, then the policy pipeline against the reward model it promoted.
"""

from __future__ import annotations

from prefect import flow

from components.config import RewardRunConfig, Validated, load_config
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


@flow(name="alignflow-rlhf", log_prints=True)
def rlhf(reward_config_path: str | None = None, reward_overrides: list[str] | None = None,
         config_path: str | None = None, overrides: list[str] | None = None,
         validated_reward: Validated | None = None, validated_policy: Validated | None = None):
    """Both stages in order: the reward model, then the policy against the reward-model champion (the version this
    run just promoted, or the one that kept the alias when it was not). Returns (reward result, policy result).

    Both configurations are parsed once, here (the policy's with `reward.model` the champion's alias), unless the
    command that runs this flow hands them over validated; each stage's flow gets its own as it is."""
    if validated_reward is None:
        validated_reward = Validated(load_config(reward_config_path, reward_overrides or [], schema=RewardRunConfig))
    champion = champion_uri(validated_reward.config)
    if validated_policy is None:
        validated_policy = Validated(load_config(config_path, [*(overrides or []), f"reward.model={champion}"]))
    reward = reward_pipeline(validated=validated_reward)
    if not reward.promoted:
        print(f"reward model version {reward.model_version} was not promoted ({reward.gates.summary()}): the policy "
              f"trains against {champion} as it stands")
    policy = pipeline(validated=validated_policy)
    return reward, policy


def champion_uri(reward_config: RewardRunConfig) -> str:
    """The reward-model champion a policy trains against after `rlhf`'s reward stage: `models:/NAME@ALIAS`."""
    return f"models:/{reward_config.tracking.registered_model}@{reward_config.tracking.champion_alias}"
