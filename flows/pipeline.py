"""The alignflow pipeline, as Prefect tells it.

prepare_dataset -> load_reward_model -> evaluate baseline -> PPO epochs -> evaluate candidate
-> gates -> register -> promote

Each step is a thin task around one component call (flows/tasks.py); the math lives in components/.
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
    run_id = tasks.start_tracking(config, resume_run_id)
    try:
        version = tasks.check_data_version(config)
        data = tasks.as_prepared(tasks.prepare_dataset(config, version.md5))
        tasks.log_dataset(config, data, version)
        scorer = tasks.load_reward_model(config)
        policy, tokenizer = tasks.load_policy(config)
        trainer = tasks.build_trainer(config, policy, tokenizer, scorer, run_id)
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
        model_version = tasks.register(config, trainer, version.md5, report, candidate, stop_reason)
        promoted = tasks.promote(config, model_version, report, candidate, champion)
        result = tasks.finish(run_id, config, trainer, stop_reason, baseline, candidate, report, model_version, promoted, champion)
    except BaseException as exc:
        tasks.end_tracking(run_id, failed=True)
        raise tasks.explain_failure(exc, config, run_id) from exc
    tasks.end_tracking(run_id, failed=False)
    return result
