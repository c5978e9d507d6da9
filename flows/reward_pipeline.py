"""The reward-model stage, as Prefect tells it.

check inputs -> load and check the preference pairs -> (the MLflow run starts) -> train, a checkpoint at a time
-> evaluate on the held-out pairs (and the champion on the same pairs) -> gates -> register -> promote -> finish

`rlhf` runs both stages in order: this one, then the policy pipeline against the reward model it promoted.
"""

from __future__ import annotations

from prefect import flow

from components.config import RewardRunConfig, load_config
from flows import reward_tasks as tasks
from flows import stage
from flows.reward_tasks import RewardResult


@flow(name="alignflow-reward", log_prints=True)
def reward_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                    resume_run_id: str | None = None) -> RewardResult:
    """Train a reward model on human preference pairs; register it; promote it if every gate passes."""
    config: RewardRunConfig = load_config(config_path, overrides or [], schema=RewardRunConfig)
    if resume_run_id:  # the run's own configuration; other settings given here are refused, changing nothing
        config = stage.resumed_config(config, resume_run_id, config_path, overrides or [], "reward")
    resolved = tasks.check_inputs(config, resume_run_id)
    data_version = tasks.check_data_version(config)
    data = tasks.prepare_pairs(config, resolved)

    run_id = stage.start_tracking(config, resume_run_id, "reward", tasks.provenance(config))
    try:
        settled = tasks.recorded_result() if resume_run_id else None
        if settled is not None:
            print(f"run {run_id} had settled its outcome: closing it")
            stage.close(config, run_id, stage.end_tags(settled))
            stage.end_tracking(run_id, failed=False)
            return settled
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
        model_dir = tasks.export(trainer, tokenizer, config, run_id)
        version = tasks.register(config, model_dir, run_id, data_version, report, candidate, champion_version, data)
        promoted = stage.promote(config, version, report, champion_version, candidate.accuracy, tasks.ACCURACY_TAG,
                                 "alignflow-reward")
        result = tasks.finish(run_id, trainer, candidate, report, version, promoted, champion_version, champion, config)
        stage.close(config, run_id, stage.end_tags(result))
    except BaseException as exc:
        stage.end_tracking(run_id, failed=True)
        failure = stage.explain_failure(exc, config, run_id, "reward")
        if failure is exc:
            raise
        raise failure from exc
    stage.end_tracking(run_id, failed=False)
    return result


@flow(name="alignflow-rlhf", log_prints=True)
def rlhf(reward_config_path: str | None = None, reward_overrides: list[str] | None = None,
         config_path: str | None = None, overrides: list[str] | None = None):
    """Both stages in order: the reward model, then the policy against the reward-model champion (the version this
    run just promoted, or the one that kept the alias when it was not). Returns (reward result, policy result)."""
    from flows.pipeline import pipeline

    reward_config: RewardRunConfig = load_config(reward_config_path, reward_overrides or [], schema=RewardRunConfig)
    reward = reward_pipeline(reward_config_path, reward_overrides, None)
    tracking = reward_config.tracking
    champion = f"models:/{tracking.registered_model}@{tracking.champion_alias}"
    if not reward.promoted:
        print(f"reward model version {reward.model_version} was not promoted ({reward.gates.summary()}): the policy "
              f"trains against {champion} as it stands")
    policy = pipeline(config_path, [*(overrides or []), f"reward.model={champion}"], None)
    return reward, policy
