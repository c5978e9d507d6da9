"""The alignflow pipeline, as Prefect tells it.

check inputs -> prepare the prompts -> load the reward model and the policy -> (the MLflow run starts)
-> evaluate the reference -> train, a checkpoint at a time -> evaluate the candidate (and the champion) -> gates
-> register -> promote -> finish

Each step is a thin task around one component call: the policy's own in flows/tasks.py, those every stage shares in
flows/stage.py; the math lives in components/. Every step can
run again: `alignflow run --resume RUN_ID` after a crash at any point ends where an uninterrupted run ends.
"""

from __future__ import annotations

from prefect import flow

from components.tracking import registry
from components.config import RunConfig, Validated, load_config
from flows import stage, tasks
from flows.tasks import PipelineResult


@flow(name="alignflow-pipeline", log_prints=True)
def pipeline(config_path: str | None = None, overrides: list[str] | None = None, resume_run_id: str | None = None,
             validated: Validated | None = None) -> PipelineResult:
    """Align the configured policy with RL against the reward model; promote it if every gate passes.

    A deployment's run gives a config path and `--set` strings, parsed here once; a command running the flow in its
    own process hands over the configuration it validated (`validated`: on --resume, the run's recorded one)."""
    if validated is not None:
        given: RunConfig = validated.config
    else:
        given = load_config(config_path, overrides or [])
        if resume_run_id:  # the run's own configuration; other settings given here are refused, changing nothing
            given = stage.resumed_config(given, resume_run_id, config_path, overrides or [], "policy")
    config = tasks.pin_models(given, resume_run_id)  # registry aliases pinned to versions, once, for the whole run
    models = stage.check_inputs(config, tasks.resolve)  # the same run with its model URIs resolved here
    data_version = stage.check_data_version(config)
    data = tasks.as_prepared(tasks.prepare_dataset(config, models, data_version.md5))
    scorer = tasks.load_reward_model(models)
    judge = tasks.load_judge(models)
    policy, tokenizer = tasks.load_policy(models)
    trainer = tasks.build(models, policy, tokenizer, scorer)

    pinned = tasks.pinned_models(given, config)
    run_id = stage.start_tracking(given, resume_run_id, "policy", tasks.provenance(given, pinned))  # inputs are good

    def train_and_register() -> PipelineResult:
        tasks.log_dataset(data, data_version)
        tasks.resume(trainer, config, run_id)
        reference = tasks.evaluate("reference", lambda: (trainer.reference, tokenizer), data.eval_prompts, scorer, config,
                                   judge=judge)

        while trainer.stop_reason is None:
            tasks.train(trainer, trainer.iteration, data.train_prompts, config, run_id)

        candidate = tasks.evaluate("candidate", lambda: (trainer.policy, tokenizer), data.eval_prompts, scorer, config,
                                   reference=trainer.reference, judge=judge)
        champion_version = stage.find_champion(config)
        champion = None if champion_version is None else tasks.evaluate(
            "champion", tasks.registered_policy(config, champion_version), data.eval_prompts, scorer, config,
            version=champion_version)
        report = tasks.gates(config, reference, candidate, champion)
        policy_dir = stage.export(config, run_id, tasks.save_policy(trainer, config))
        version = tasks.register(config, policy_dir, run_id, data_version, report, candidate, champion, trainer.stop_reason)
        promoted = stage.promote(config, version, report, champion_version, candidate.summary.mean_score,
                                 registry.SCORE_TAG, "alignflow-pipeline")
        return tasks.finish(run_id, config, trainer.history, trainer.stop_reason, reference, candidate, report, version,
                            promoted, champion)

    return stage.settle(config, run_id, "policy", resume_run_id, train_and_register, PipelineResult.from_json, tasks.end_tags)
