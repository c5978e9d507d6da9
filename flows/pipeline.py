"""The alignflow pipeline, as Prefect tells it.

check inputs -> prepare_dataset -> load models -> (start the MLflow run) -> evaluate baseline -> PPO epochs
-> evaluate candidate -> gates -> register -> promote -> finish

Each step is a thin task around one component call (flows/tasks.py); the math lives in components/. Every step can
run again: `alignflow run --resume RUN_ID` after a crash at any point ends where an uninterrupted run ends.
"""

from __future__ import annotations

from prefect import flow

from components.config import RunConfig, load_config
from flows import tasks
from flows.tasks import PipelineResult


@flow(name="alignflow-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, overrides: list[str] | None = None, resume_run_id: str | None = None) -> PipelineResult:
    """Align the configured policy with PPO against the reward model; promote it if every gate passes."""
    config: RunConfig = load_config(config_path, overrides or [])
    models = tasks.check_inputs(config, resume_run_id)  # the same run with its model references resolved here
    data_version = tasks.check_data_version(config)
    data = tasks.as_prepared(tasks.prepare_dataset(config, models, data_version.md5))
    scorer = tasks.load_reward_model(models)
    policy, tokenizer = tasks.load_policy(models)
    trainer = tasks.build_trainer(models, policy, tokenizer, scorer)

    run_id = tasks.start_tracking(config, resume_run_id)  # inputs are good: the run is recorded from here on
    try:
        settled = tasks.recorded_result() if resume_run_id else None
        if settled is not None:
            print(f"run {run_id} had settled its outcome: closing it")
            tasks.close(config, settled)
            tasks.end_tracking(run_id, failed=False)
            return settled
        tasks.log_dataset(data, data_version)
        tasks.resume_trainer(trainer, config, run_id)
        reference = trainer.reference
        baseline = tasks.evaluate("baseline", reference, tokenizer, data.eval_prompts, scorer, config)

        stop_reason = trainer.stop_reason
        for epoch in range(tasks.max_epochs(config)):
            if stop_reason is not None:
                break
            stop_reason = tasks.ppo_epoch(trainer, epoch, data.train_prompts, config, run_id)

        candidate = tasks.evaluate("candidate", trainer.policy, tokenizer, data.eval_prompts, scorer, config, reference=reference)
        champion = tasks.evaluate_champion(config, data.eval_prompts, scorer)
        report = tasks.gates(config, baseline, candidate, champion)
        model_version = tasks.register(config, trainer, run_id, data_version, report, candidate, champion, stop_reason)
        promoted = tasks.promote(config, model_version, report, candidate, champion)
        result = tasks.finish(run_id, config, trainer, stop_reason, baseline, candidate, report, model_version, promoted, champion)
        tasks.close(config, result)
    except BaseException as exc:
        tasks.end_tracking(run_id, failed=True)
        failure = tasks.explain_failure(exc, config, run_id)
        if failure is exc:
            raise
        raise failure from exc
    tasks.end_tracking(run_id, failed=False)
    return result
