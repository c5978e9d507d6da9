"""The policy pipeline's own tasks: each wraps one component call and adds what Prefect is for (retries, caching,
artifacts). What every stage does alike (checking inputs, tracking, failures, evaluations recorded, the champion,
gates on the run, exporting, registering, promoting, closing) is flows/stage.py; here is what the policy's own is. The MLflow run is started by the flow; tasks run in the flow's thread, so MLflow's active run is
theirs.

Every task is safe to run again, so that `alignflow run --resume RUN_ID` after a crash ends where an uninterrupted run
ends: training continues from the run's checkpoint, which carries every iteration's statistics (each step logged
once, `tracking.log_history`); evaluations are recorded on the run and read back; registration finds the run's
version; promotion completes an interrupted alias move. A task whose error a retry cannot fix (components.errors)
is not retried.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from components.security import secrets

from components.models import uris

from components.tracking import registry, runs as tracking
from components.config import PROJECT_ROOT, RunConfig
from components.data.prompts import PreparedData, prepare
from components.data.dialogue import render_transcript
from components.errors import retryable
from components.evaluation.policy import PolicyEval, compare, comparison_table, evaluate_policy
from components.faults import crash_point
from components.evaluation.gates import GateReport, check_gates
from components.models.lengths import check_lengths
from components.models.memory_plan import GIB, check_fits
from components.models.loading import (
    load_policy as load_policy_model, load_tokenizer, tokenizer_fingerprint, with_models,
)
from components.rl.reward import RewardScorer
from components.rl import Trainer, TrainResult
from components.rl import build as run_build
from components.rl.build import compute_device
from components.checkpoint import check_writable, recover
from components.rl.progress import ProgressBar
from components.rl.tokenization import prompt_ids
from components.data.versioning import DatasetVersion
from flows import multinode, stage


@dataclass
class Evaluated:
    """One policy's evaluation, and the samples behind it (each prompt as the policy read it)."""

    name: str
    summary: PolicyEval
    prompts: list[str]
    completions: list[str]
    scores: list[float]
    version: str | None = None  # a registered policy's version (the champion's)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Evaluated":
        return cls(**{**value, "summary": PolicyEval.from_json(value["summary"])})


@dataclass
class PipelineResult(stage.Result):
    """What a run came to: the flow's return value, recorded on the run (result.json) once settled."""

    run_id: str
    stop_reason: str | None
    episodes: int
    reference: PolicyEval
    candidate: PolicyEval  # its KL from the reference included
    gates: GateReport
    model_version: str
    promoted: bool
    champion_version: str | None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "PipelineResult":
        return cls(**{**value, "reference": PolicyEval.from_json(value["reference"]),
                      "candidate": PolicyEval.from_json(value["candidate"]), "gates": GateReport.from_json(value["gates"])})


# --- tracking around the flow ------------------------------------------------------------------


def provenance(config: RunConfig, pinned: dict[str, str]) -> Callable[[], dict[str, str]]:
    """The policy run's own provenance tags (stage.start_tracking): the configuration's registry aliases as pinned to
    versions (`pinned`), the base policy, the reward model and its lineage, the algorithm."""
    reward_model = pinned.get("reward.model", config.reward.model)
    return lambda: {"alignflow.base_policy": pinned.get("policy.model", config.policy.model),
                    "alignflow.reward_model": reward_model, tracking.ALGORITHM_TAG: config.rl.algorithm,
                    tracking.PINNED_TAG: json.dumps(pinned),
                    **registry.lineage(reward_model, "reward")}


def end_tags(result: PipelineResult) -> dict[str, str]:
    """What `stage.close` tags a policy run with: the stage's end tags and why training stopped."""
    return {tracking.STOP_REASON_TAG: result.stop_reason, **stage.end_tags(result)}


# --- inputs -----------------------------------------------------------------------------------


@task(cache_policy=NONE)
def pin_models(config: RunConfig, resume_run_id: str | None) -> RunConfig:
    """The configuration with each `models:/NAME@ALIAS` (a reward-model or policy champion) pinned to its version
    for the whole run (stage.pin_aliases)."""
    pinned = stage.pin_aliases(config, resume_run_id, {
        "policy.model": config.policy.model, "reward.model": config.reward.model, "critic.model": config.critic.model,
        "judge.model": config.judge.model if config.judge else None})
    return with_models(config, lambda key, ref: pinned.get(key, ref)) if pinned else config


def pinned_models(original: RunConfig, pinned: RunConfig) -> dict[str, str]:
    """{key: pinned URI} for each model URI `pin_models` pinned."""
    keys = (("policy.model", "policy"), ("reward.model", "reward"), ("critic.model", "critic"), ("judge.model", "judge"))
    return {key: getattr(pinned, section).model for key, section in keys
            if getattr(original, section) is not None and getattr(original, section).model != getattr(pinned, section).model}


def resolve(config: RunConfig) -> RunConfig:
    """The policy's part of stage.check_inputs: every model URI found (local, registry or hub; registry URIs
    downloaded) and safe to load, no model fed more tokens than it has positions (lengths.check_lengths), and the
    memory plan saying the run fits its device (memory_plan.check_fits). Returns the configuration with the model URIs
    as this machine loads them."""
    resolved = run_build.locate_models(config)  # no pickle-only checkpoint, no model's own code (components/models/safety.py)
    check_lengths(resolved)  # from the config files, as the plan's sizes
    plan = check_fits(resolved)  # sizes from the config files; nothing loaded yet
    get_run_logger().info("memory plan: peak %.2f GiB per %s device, %s available", plan.peak_bytes / GIB, plan.device,
                          "?" if plan.device_bytes is None else f"{plan.device_bytes / GIB:.2f} GiB")
    return resolved


def _prepare_key(context, parameters) -> str:
    config: RunConfig = parameters["config"]
    models: RunConfig = parameters["models"]
    settings = {"md5": parameters["data_md5"], "data": config.data.model_dump(mode="json"), "seed": config.seed,
                "generation": config.generation.model_dump(mode="json"), "chat": config.policy.use_chat_template,
                "tokenizer": tokenizer_fingerprint(models.policy.model)}
    return "prepare-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


@task(cache_key_fn=_prepare_key, persist_result=True, result_serializer="json")
def prepare_dataset(config: RunConfig, models: RunConfig, data_md5: str) -> dict[str, Any]:
    """Load the prompts, fit them to the policy's prompt limit (counted with its tokenizer, as the engine renders
    them), split off the held-out ones. Cached by data version, data and generation settings, and tokenizer."""
    tokenizer = load_tokenizer(models.policy.model, models.policy.revision)
    chat = config.policy.use_chat_template
    prepared = prepare(config.data, config.generation, lambda prompt: len(prompt_ids(tokenizer, [prompt], chat)[0]),
                       config.seed, PROJECT_ROOT)
    return asdict(prepared)


def as_prepared(raw: dict[str, Any]) -> PreparedData:
    return PreparedData(**raw)


@task(cache_policy=NONE)
def log_dataset(data: PreparedData, version: DatasetVersion) -> None:
    """The data version on the run (tags, and a dataset input named after the dataset, whose digest is the md5 of the
    bytes read) and what happened to its rows (data/* metrics)."""
    get_run_logger().info(data.summary)
    mlflow.set_tags(version.as_tags())
    tracking.log_metrics_once(data.report)
    as_text = lambda p: p if isinstance(p, str) else render_transcript(p)  # noqa: E731
    rows = [{"prompt": as_text(p), "split": "train"} for p in data.train_prompts] + [
        {"prompt": as_text(p), "split": "eval"} for p in data.eval_prompts]
    tracking.log_dataset(version.name, secrets.redact_text(version.source), version.md5, rows=rows)


# --- models -----------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def load_reward_model(config: RunConfig) -> RewardScorer:
    """Load the reward model and check it scores a probe pair. `config` holds resolved model URIs (check_inputs)."""
    scorer = run_build.load_scorer(config.reward, config, compute_device(config))
    probe = scorer(["The film was", "The film was"], [" wonderful and moving.", " dull."])
    if probe.shape != (2,) or not bool(probe.isfinite().all()):
        raise ValueError(f"reward.model {config.reward.model}: probe pair scored {probe.tolist()}; expected two finite scores")
    get_run_logger().info("reward model %s scores the probe pair %s", config.reward.model, [round(x, 4) for x in probe.tolist()])
    return scorer


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def load_judge(config: RunConfig) -> RewardScorer | None:
    """The judge (`judge.model`, a held-out reward model that scores the evaluations only), or None."""
    if config.judge is None:
        return None
    judge = run_build.load_scorer(config.judge, config, compute_device(config))
    get_run_logger().info("judge %s scores the evaluations beside the reward model", config.judge.model)
    return judge


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def load_policy(config: RunConfig):
    """The starting policy (causal LM or encoder-decoder, from its config) and its tokenizer."""
    return run_build.load_policy(config, compute_device(config))


@task(cache_policy=NONE)
def build(config: RunConfig, policy, tokenizer, scorer: RewardScorer) -> Trainer:
    """The engine around the starting policy, and a check, before any training, that the checkpoint directory's
    disk has room for a checkpoint of it (a save holds the previous checkpoint and the new one at once)."""
    trainer = run_build.build(config, policy, tokenizer, scorer)
    check_writable(stage.checkpoint_root(config), "checkpoint.dir", need_bytes=2 * trainer.checkpoint_bytes())
    return trainer


@task(cache_policy=NONE)
def resume(trainer: Trainer, config: RunConfig, run_id: str) -> None:
    """Continue from this run's checkpoint when one exists (a checkpoint kept aside by a save that died between its
    renames included), and log the steps it holds that MLflow lacks: a run that checkpointed its last iteration
    and then lost MLflow trains no more, so its training task would never log them. The run is tagged with the
    models whose forwards run on packed episodes."""
    mlflow.set_tag("alignflow.packed_sequences", ", ".join(trainer.packed_models) or "none")
    directory = stage.run_directory(config, run_id) / "checkpoint"
    if recover(directory):
        trainer.load_checkpoint(directory)
        get_run_logger().info("resumed from %s at iteration %d (%d episodes)", directory, trainer.iteration, trainer.episodes)
        tracking.log_history(trainer.history)


# --- evaluation -------------------------------------------------------------------------------


@task(cache_policy=NONE, task_run_name="evaluate-{name}")
def evaluate(name: str, load: Callable[[], tuple[Any, Any]], prompts: list, scorer: RewardScorer, config: RunConfig,
             reference=None, version: str | None = None, judge: RewardScorer | None = None) -> Evaluated:
    """Sample the held-out prompts with the evaluation seed and score them (and, given the `reference`, measure the
    KL from it). `load()` gives (policy, tokenizer); it is not called for a result the run recorded already
    (`evaluations/NAME.json`), which a resumed run reads back instead of evaluating again."""
    def run() -> tuple[Evaluated, dict[str, Any]]:
        policy, tokenizer = load()
        summary, samples, scores = evaluate_policy(policy, tokenizer, prompts, scorer, config.generation,
                                                   config.evaluation, config.policy.use_chat_template, reference, judge)
        evaluated = Evaluated(name, summary, samples.prompts_seen, samples.completions, scores, version)
        return evaluated, asdict(evaluated)

    evaluated = stage.recorded_evaluation(name, run, Evaluated.from_json)
    tracking.log_metrics_once(evaluated.summary.as_metrics(f"eval/{name}"))
    return evaluated


def registered_policy(config: RunConfig, version: str) -> Callable[[], tuple[Any, Any]]:
    """A loader of a registered version of the policy (the champion), for `evaluate`."""
    def load():
        path = uris.resolve_model_uri(f"models:/{config.tracking.registered_model}/{version}")
        return load_policy_model(path).to(compute_device(config)), load_tokenizer(path)
    return load


# --- training ---------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, retry_condition_fn=retryable,
      task_run_name="train-from-iteration-{start}")
def train(trainer: Trainer, start: int, prompts: list, config: RunConfig, run_id: str) -> TrainResult:
    """One segment: the iterations up to the next checkpoint (every `checkpoint.every`) or the end, then the
    checkpoint, then their metrics; returns what they did.

    Idempotent: a retry (or a rerun with --resume) reloads the last checkpoint, logs the steps it holds that MLflow
    lacks, and runs only the iterations still missing. The statistics live in the checkpoint, so no step is logged
    twice and none is lost while MLflow is down."""
    directory = stage.run_directory(config, run_id) / "checkpoint"
    if task_run.run_count > 1 and recover(directory):
        trainer.load_checkpoint(directory)
        get_run_logger().warning("attempt %d: resumed from %s at iteration %d", task_run.run_count, directory, trainer.iteration)
    tracking.log_history(trainer.history)  # what an earlier attempt checkpointed but did not log
    iterations = config.checkpoint.every - trainer.iteration % config.checkpoint.every
    if config.launch.num_processes > 1:
        before = len(trainer.history)
        multinode.launch_iterations(trainer, prompts, config, directory, iterations)
        result = TrainResult(trainer.stop_reason or "iterations", len(trainer.history) - before, trainer.episodes,
                             trainer.history[before:])
    else:
        with ProgressBar(config.rl.total_episodes, config.rl.algorithm, start_episodes=trainer.episodes) as bar:
            result = trainer.train(prompts, iterations=iterations, callback=bar)
        trainer.save_checkpoint(directory)
    crash_point("train.checkpointed")
    tracking.log_history(trainer.history)
    crash_point("train.logged")
    if result.history:
        last = result.last
        get_run_logger().info("iteration %d: %d episodes, score %.3f, kl %.3f", trainer.iteration, trainer.episodes,
                              last["objective/scores"], last["objective/kl"])
    return result


# --- gates, registry --------------------------------------------------------------------------


@task(cache_policy=NONE)
def gates(config: RunConfig, reference: Evaluated, candidate: Evaluated, champion: Evaluated | None) -> GateReport:
    comparison = compare(reference.summary, candidate.summary, n_resamples=config.evaluation.bootstrap_samples,
                         seed=config.evaluation.seed)
    report = check_gates(comparison, config.gates, champion.summary.mean_score if champion else None)
    stage.record_gates(report, comparison.as_metrics(), key="gate-report", description="alignflow promotion gates")
    return report


def save_policy(trainer: Trainer, config: RunConfig) -> Callable[[Path], Path]:
    """How stage.export saves the trained policy for registration: merged, or its LoRA adapter (`policy.lora.save_mode`)."""
    return lambda directory: trainer.export_policy(directory, merge=config.policy.lora.save_mode == "merged")


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def register(config: RunConfig, policy_dir: Path | None, run_id: str, data: DatasetVersion, report: GateReport,
             candidate: Evaluated, champion: Evaluated | None, stop_reason: str | None) -> str:
    """Log the exported policy (with tokenizer) in MLflow's transformers flavour and register it as a version whose
    tags are written with it. A resumed run that registered already gets its version back."""
    model_config = {"max_new_tokens": config.generation.max_new_tokens, "do_sample": True,
                    "temperature": config.generation.temperature}
    return stage.register_version(config, run_id, data, report, champion.version if champion else None,
                                  log_model=lambda: registry.log_policy(policy_dir, model_config=model_config),
                                  tags=lambda: {
        "alignflow.reward_model": config.reward.model, **registry.lineage(config.reward.model, "reward"),
        "alignflow.base_policy": config.policy.model, tracking.ALGORITHM_TAG: config.rl.algorithm,
        "samples_per_prompt": config.rl.samples_per_prompt,
        **({"judge_model": config.judge.model, "eval/judge_gain": report_judge_gain(report)} if config.judge else {}),
        registry.SCORE_TAG: candidate.summary.mean_score, registry.KL_TAG: candidate.summary.kl, tracking.STOP_REASON_TAG: stop_reason})


def report_judge_gain(report: GateReport) -> str:
    """The judge's gain CI's lower bound as the gate report has it ("" when the judge gate is off)."""
    return next((str(gate.value) for gate in report.gates if gate.name == "judge_gain_ci_low"), "")


@task(cache_policy=NONE)
def finish(run_id: str, config: RunConfig, history: list[dict[str, float]], stop_reason: str | None, reference: Evaluated,
           candidate: Evaluated, report: GateReport, version: str, promoted: bool,
           champion: Evaluated | None) -> PipelineResult:
    """Artifacts people would rather see than read (curves, samples, the comparison table), and the run's result,
    recorded: from then on the run's outcome is settled."""
    if history:
        tracking.log_training_curves(history, step_key="episodes", score_key="objective/scores")
    n = config.evaluation.num_samples_logged
    tracking.log_eval_samples([
        {"prompt": p, "reference_completion": b, "candidate_completion": c, "reference_score": bs, "candidate_score": cs}
        for p, b, c, bs, cs in list(zip(candidate.prompts, reference.completions, candidate.completions, reference.scores,
                                        candidate.scores))[:n]
    ])
    create_table_artifact(table=comparison_table(reference.summary, candidate.summary), key="reference-vs-candidate",
                          description="held-out evaluation")
    result = PipelineResult(
        run_id=run_id, stop_reason=stop_reason, episodes=int(history[-1]["episodes"]) if history else 0,
        reference=reference.summary, candidate=candidate.summary, gates=report, model_version=version,
        promoted=promoted, champion_version=champion.version if champion else None,
    )
    tracking.record(asdict(result), "result.json")
    crash_point("finish.artifacts")
    return result
