"""The pipeline's tasks: each wraps one component call and adds what Prefect is for (retries, caching,
artifacts). The MLflow run is started by the flow; tasks run in the flow's thread, so MLflow's active run is theirs.

Every task is safe to run again, so that `alignflow run --resume RUN_ID` after a crash ends where an uninterrupted run
ends: training continues from the run's checkpoint, which carries the statistics of every iteration (each step is
logged once, `tracking.log_history`); evaluations are recorded on the run and read back; registration finds the
run's version; promotion completes an interrupted alias move. A task whose error a retry cannot fix
(`components.errors`) is not retried.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run, task_run

from components import registry, tracking
from components.config import PROJECT_ROOT, RunConfig
from components.data import PreparedData, prepare
from components.dialogue import render_transcript
from components.errors import AlignflowError, retryable
from components.evaluation import GateReport, PolicyEval, check_gates, compare, evaluate_policy
from components.faults import crash_point
from components.models import load_policy as load_policy_model, load_tokenizer, tokenizer_fingerprint
from components.ppo import PPOTrainer
from components.ppo.checkpoint import check_writable, recover, write_atomically
from components.ppo.progress import ProgressBar
from components.ppo.rollout import prompt_ids
from components.reward import RewardScorer
from components.versioning import DatasetVersion, dataset_version
from flows import multinode, promotion


@dataclass
class Evaluated:
    """One policy's evaluation and the samples behind it (for the eval-samples table)."""

    name: str
    summary: PolicyEval
    prompts: list[str]
    completions: list[str]
    scores: list[float]
    kl: float | None = None
    version: str | None = None  # the champion's registry version

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Evaluated":
        summary = value["summary"]
        summary = PolicyEval(**{**summary, "scores": tuple(summary["scores"]), "score_ci": tuple(summary["score_ci"])})
        return cls(**{**value, "summary": summary})


@dataclass
class PipelineResult:
    run_id: str
    stop_reason: str | None
    episodes: int
    baseline: dict[str, float]
    candidate: dict[str, float]
    gates_passed: bool
    gate_summary: str
    gate_rows: list[dict[str, Any]]
    model_version: str
    promoted: bool
    champion_version: str | None
    notes: list[str] = field(default_factory=list)


# --- tracking around the flow ------------------------------------------------------------------


def start_tracking(config: RunConfig, resume_run_id: str | None) -> str:
    """Start (or resume) the flow's MLflow run; record the config and provenance once."""
    run = tracking.start_run(config, resume_run_id)
    get_run_logger().info("MLflow run %s%s", run.info.run_id,
                          "" if resume_run_id else f" (if it is interrupted: alignflow run --resume {run.info.run_id})")
    if resume_run_id is None:
        tracking.log_config(config)
        mlflow.set_tags({"alignflow.git_commit": git_commit(), "alignflow.prefect_flow_run_id": flow_run.id or "",
                         "alignflow.base_policy": config.policy.model, "alignflow.reward_model": config.reward.model})
        crash_point("tracking.started")
    return run.info.run_id


def recorded_result() -> PipelineResult | None:
    """The result the run recorded once its outcome was settled (`finish`): a resumed run that has it only closes."""
    recorded = tracking.recorded("result.json")
    return PipelineResult(**recorded) if recorded else None


def end_tracking(run_id: str, failed: bool) -> None:
    try:
        tracking.end_run(run_id, failed=failed)
    except Exception as exc:  # the tracking server may be what failed; keep the original error in front
        if not failed:
            raise
        print(f"could not mark MLflow run {run_id} failed: {exc}")


class ServerUnreachable(AlignflowError):
    """A server the pipeline needs stayed unreachable through every retry."""


_CONNECTION_TROUBLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection", "ConnectionError")


def explain_failure(exc: BaseException, config: RunConfig, run_id: str) -> BaseException:
    """Name the server and URL when MLflow could not be reached, and say how to resume."""
    if isinstance(exc, AlignflowError) or not any(sign in f"{type(exc).__name__}: {exc}" for sign in _CONNECTION_TROUBLE):
        return exc
    uri = tracking.resolve_tracking_uri(config.tracking)
    return ServerUnreachable(
        f"the MLflow tracking server at {uri} is unreachable (after retries with backoff): {exc}\n"
        f"Nothing was promoted and the checkpoints are kept. When the server is back, resume with\n"
        f"  alignflow run --resume {run_id} (and the same --config/--set)"
    )


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- inputs -----------------------------------------------------------------------------------


def checkpoint_root(config: RunConfig) -> Path:
    root = Path(config.ppo.checkpoint_dir)
    return root if root.is_absolute() else PROJECT_ROOT / root


def run_directory(config: RunConfig, run_id: str) -> Path:
    """What a run keeps on disk for --resume, one directory per MLflow run: concurrent runs never share one."""
    return checkpoint_root(config) / run_id


def checkpoint_dir(config: RunConfig, run_id: str) -> Path:
    return run_directory(config, run_id) / "checkpoint"


@task(cache_policy=NONE)
def check_inputs(config: RunConfig, resume_run_id: str | None) -> RunConfig:
    """Before anything heavy or recorded: the run to resume exists, every model reference is found (local, registry
    or hub; registry URIs downloaded) and the checkpoint directory is writable. Returns the configuration with the
    references as this machine loads them. A fault is named by its key."""
    if resume_run_id is not None:
        tracking.find_run(config.tracking, resume_run_id)
    resolved = multinode.resolved_models(config)
    check_writable(checkpoint_root(config), "ppo.checkpoint_dir")
    return resolved


@task(retries=1, retry_condition_fn=retryable)
def check_data_version(config: RunConfig) -> DatasetVersion:
    """The version of the dataset this run reads: the md5 of its bytes, checked against the .dvc file that pins it."""
    return dataset_version(config.data, PROJECT_ROOT)


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
    tracking.log_dataset(version.name, version.source, version.md5, rows=rows)


# --- models -----------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def load_reward_model(config: RunConfig) -> RewardScorer:
    """Load the reward model and check it scores a probe pair. `config` holds resolved references (check_inputs)."""
    scorer = RewardScorer.from_config(config.reward)
    probe = scorer(["The film was", "The film was"], [" wonderful and moving.", " dull."])
    if probe.shape != (2,) or not bool(probe.isfinite().all()):
        raise ValueError(f"reward.model {config.reward.model}: probe pair scored {probe.tolist()}; expected two finite scores")
    get_run_logger().info("reward model %s scores the probe pair %s", config.reward.model, [round(x, 4) for x in probe.tolist()])
    return scorer


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def load_policy(config: RunConfig):
    """The starting policy (causal LM or encoder-decoder, from its config) and its tokenizer."""
    return load_policy_model(config.policy.model, config.policy.revision), load_tokenizer(config.policy.model, config.policy.revision)


# --- evaluation -------------------------------------------------------------------------------


@task(cache_policy=NONE, task_run_name="evaluate-{name}")
def evaluate(name: str, policy, tokenizer, prompts: list[str], scorer: RewardScorer, config: RunConfig, reference=None) -> Evaluated:
    """Sample the held-out prompts with the evaluation seed, score them, and (for a candidate) its KL. The result is
    recorded on the run (`evaluations/NAME.json`); a resumed run reads it back instead of evaluating again."""
    artifact = f"evaluations/{name}.json"
    done = tracking.recorded(artifact)
    if done is not None:
        evaluated = Evaluated.from_json(done)
    else:
        chat = config.policy.use_chat_template
        summary, samples, scores = evaluate_policy(policy, tokenizer, prompts, scorer, config.generation, config.evaluation, chat)
        kl = None
        if reference is not None:
            from components.ppo import sequence_kl

            kl = sequence_kl(policy, reference, tokenizer, prompts, samples.completions, config.generation,
                             samples.ended_with_eos, use_chat_template=chat)
        evaluated = Evaluated(name, summary, samples.prompts_seen, samples.completions, scores, kl)
        tracking.record(evaluated.to_json(), artifact)
        crash_point("evaluation.recorded")
    tracking.log_metrics_once(evaluated.summary.as_metrics(f"eval/{name}"))
    return evaluated


@task(cache_policy=NONE)
def evaluate_champion(config: RunConfig, prompts: list[str], scorer: RewardScorer) -> Evaluated | None:
    """The current champion on the same prompts and seed, or None when there is none yet. Recorded like the other
    evaluations: a resumed run compares with the champion the first attempt saw, even if the alias moved since."""
    done = tracking.recorded("evaluations/champion.json")
    if done is not None:
        return Evaluated.from_json(done) if done.get("version") else None
    champion = registry.get_champion(config.tracking.registered_model, config.tracking.champion_alias)
    if champion is None:
        tracking.record({"version": None}, "evaluations/champion.json")
        return None
    path = registry.resolve_model_reference(f"models:/{config.tracking.registered_model}/{champion.version}")
    model, tokenizer = load_policy_model(path), load_tokenizer(path)
    summary, samples, scores = evaluate_policy(model, tokenizer, prompts, scorer, config.generation, config.evaluation,
                                               config.policy.use_chat_template)
    evaluated = Evaluated("champion", summary, samples.prompts_seen, samples.completions, scores, version=str(champion.version))
    tracking.record(evaluated.to_json(), "evaluations/champion.json")
    tracking.log_metrics_once(summary.as_metrics("eval/champion"))
    return evaluated


# --- PPO --------------------------------------------------------------------------------------


@task(cache_policy=NONE)
def build_trainer(config: RunConfig, policy, tokenizer, scorer: RewardScorer) -> PPOTrainer:
    """The engine around the starting policy. Checks, before any training, that the checkpoint directory's disk has
    room for a checkpoint of this trainer (a save holds the previous checkpoint and the new one at once)."""
    trainer = PPOTrainer.from_config(config, policy, tokenizer, scorer)
    check_writable(checkpoint_root(config), "ppo.checkpoint_dir", need_bytes=2 * trainer.checkpoint_bytes())
    return trainer


@task(cache_policy=NONE)
def resume_trainer(trainer: PPOTrainer, config: RunConfig, run_id: str) -> None:
    """Continue from this run's checkpoint when one exists (a checkpoint kept aside by a save that died between its
    renames included), logging the steps it holds that the run lacks. The run is tagged with the models whose
    forwards run on packed episodes (ppo.pack_sequences, where the family allows)."""
    mlflow.set_tag("alignflow.packed_sequences", ", ".join(trainer.packed_models) or "none")
    directory = checkpoint_dir(config, run_id)
    if recover(directory):
        trainer.load_checkpoint(directory)
        get_run_logger().info("resumed from %s at iteration %d (%d episodes)", directory, trainer.iteration, trainer.episodes)
    tracking.log_history(trainer.history)


def max_epochs(config: RunConfig) -> int:
    iterations = -(-config.ppo.max_steps // config.ppo.batch_size)
    return -(-iterations // config.ppo.iterations_per_epoch)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, task_run_name="ppo-epoch-{epoch}",
      retry_condition_fn=retryable)
def ppo_epoch(trainer: PPOTrainer, epoch: int, prompts: list[str], config: RunConfig, run_id: str) -> str | None:
    """PPO iterations up to the end of this epoch, then a checkpoint, then the iterations' metrics; returns the stop
    reason, if any.

    Idempotent: a retry (or a rerun with --resume) reloads the last checkpoint, logs the steps it holds that MLflow
    lacks, and runs only the iterations this epoch still lacks. The statistics live in the checkpoint, so no step is
    logged twice and none is lost while MLflow is down."""
    directory = checkpoint_dir(config, run_id)
    if task_run.run_count > 1 and recover(directory):
        trainer.load_checkpoint(directory)
        tracking.log_history(trainer.history)
        get_run_logger().warning("attempt %d of epoch %d: resumed from %s at iteration %d",
                                 task_run.run_count, epoch, directory, trainer.iteration)
    missing = (epoch + 1) * config.ppo.iterations_per_epoch - trainer.iteration
    if missing > 0:
        if config.ppo.num_processes > 1:
            multinode.launch_iterations(trainer, prompts, config, directory, missing)
        else:
            with ProgressBar(config.ppo.max_steps, f"PPO epoch {epoch}", start_episodes=trainer.episodes) as bar:
                trainer.train(prompts, iterations=missing, callback=bar)
            trainer.save_checkpoint(directory)
        crash_point("epoch.checkpointed")
        tracking.log_history(trainer.history)
        crash_point("epoch.logged")
        last = trainer.history[-1]
        get_run_logger().info("epoch %d: %d episodes, score %.3f, kl %.3f", epoch, trainer.episodes,
                              last["objective/scores"], last["objective/kl"])
    return trainer.stop_reason


# --- gates, registry --------------------------------------------------------------------------


@task(cache_policy=NONE)
def gates(config: RunConfig, baseline: Evaluated, candidate: Evaluated, champion: Evaluated | None) -> GateReport:
    comparison = compare(baseline.summary, candidate.summary, n_resamples=config.evaluation.bootstrap_samples,
                         seed=config.evaluation.seed)
    champion_score = champion.summary.mean_score if champion else None
    report = check_gates(comparison, candidate.kl if candidate.kl is not None else float("nan"), config.gates, champion_score)
    tracking.log_metrics_once({**report.as_metrics(), "eval/reward_gain": comparison.reward_gain,
                               "eval/reward_gain_ci_low": comparison.reward_gain_ci[0],
                               "eval/reward_gain_ci_high": comparison.reward_gain_ci[1], "eval/win_rate": comparison.win_rate,
                               "eval/length_ratio": comparison.length_ratio, "eval/kl": report.kl})
    mlflow.set_tags(report.as_tags())
    mlflow.log_text(report.to_markdown(), "gate_report.md")
    create_markdown_artifact(markdown=report.to_markdown(), key="gate-report", description="alignflow promotion gates")
    return report


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def register(config: RunConfig, trainer: PPOTrainer, run_id: str, data: DatasetVersion, report: GateReport, candidate: Evaluated,
             champion: Evaluated | None, stop_reason: str | None) -> str:
    """Log the policy (with tokenizer) in MLflow's transformers flavour and register it as a version whose tags are
    written with it. A resumed run that registered already gets its version back."""
    name = config.tracking.registered_model
    existing = registry.version_of_run(name, run_id)
    if existing is None:
        export = run_directory(config, run_id) / "export"
        trainer.export_policy(export, merge=config.policy.lora.save_mode == "merged")
        model_uri = registry.log_policy(export, model_config={"max_new_tokens": config.generation.max_new_tokens,
                                                              "do_sample": True, "temperature": config.generation.temperature})
        crash_point("register.logged")
        tags = {
            registry.GATES_TAG: report.passed,
            "gates_failed": ",".join(report.failed_names),
            "data_md5": data.md5,
            "data_name": data.name,
            "data_dvc_file": data.dvc_file or "",
            "data_versioned": data.versioned,
            "reward_model": config.reward.model,
            "base_policy": config.policy.model,
            "git_commit": git_commit(),
            "prefect_flow_run_id": flow_run.id or "",
            "mlflow_run_id": run_id,
            registry.SCORE_TAG: candidate.summary.mean_score,
            "eval_kl": candidate.kl,
            "evaluated_against": champion.version if champion else "",
            "stop_reason": stop_reason or "epochs",
        }
        existing = registry.register(name, run_id, model_uri, tags)
        crash_point("register.created")
    mlflow.set_tag(tracking.MODEL_VERSION_TAG, existing.version)
    return str(existing.version)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, retry_condition_fn=retryable)
def promote(config: RunConfig, version: str, report: GateReport, candidate: Evaluated, champion: Evaluated | None) -> bool:
    """Only a version that passed every gate becomes champion; a failure leaves the champion alone. Under the
    registry's promotion lock, the alias is compared-and-set: of candidates finishing together, the best passing
    evaluation wins (flows/promotion.py). Returns whether this version holds the alias now."""
    logger = get_run_logger()
    if not report.passed:
        logger.warning("version %s not promoted: %s", version, report.summary())
        return False
    moved, why = promotion.promote(config, version, user=f"alignflow-pipeline ({getpass.getuser()})", reason=report.summary(),
                                   evaluated_against=champion.version if champion else None, score=candidate.summary.mean_score)
    champion_now = registry.get_champion(config.tracking.registered_model, config.tracking.champion_alias)
    promoted = champion_now is not None and str(champion_now.version) == version
    (logger.info if promoted else logger.warning)("version %s: %s", version, why)
    return promoted


@task(cache_policy=NONE)
def finish(run_id: str, config: RunConfig, trainer: PPOTrainer, stop_reason: str | None, baseline: Evaluated,
           candidate: Evaluated, report: GateReport, version: str, promoted: bool, champion: Evaluated | None) -> PipelineResult:
    """Artifacts people would rather see than read (curves, samples, the comparison table), and the run's result,
    recorded: from then on the run's outcome is settled."""
    if trainer.history:
        tracking.log_training_curves(trainer.history, step_key="episodes", score_key="objective/scores")
    n = config.evaluation.num_samples_logged
    tracking.log_eval_samples([
        {"prompt": p, "baseline_completion": b, "candidate_completion": c, "baseline_score": bs, "candidate_score": cs}
        for p, b, c, bs, cs in list(zip(baseline.prompts, baseline.completions, candidate.completions, baseline.scores, candidate.scores))[:n]
    ])
    create_table_artifact(table=comparison_rows(baseline, candidate), key="baseline-vs-candidate", description="held-out evaluation")
    result = PipelineResult(
        run_id=run_id, stop_reason=stop_reason or "epochs", episodes=trainer.episodes,
        baseline=baseline.summary.as_metrics("baseline"), candidate={**candidate.summary.as_metrics("candidate"), "candidate/kl": candidate.kl},
        gates_passed=report.passed, gate_summary=report.summary(), model_version=version, promoted=promoted,
        gate_rows=[{"gate": g.name, "value": g.value, "requirement": g.rule, "passed": g.passed} for g in report.gates],
        champion_version=champion.version if champion else None,
    )
    tracking.record(asdict(result), "result.json")
    crash_point("finish.artifacts")
    return result


@task(cache_policy=NONE)
def close(config: RunConfig, result: PipelineResult) -> None:
    """The run's end tags, then its checkpoint removed unless `ppo.keep_checkpoint` (the registered version holds the
    model now); last, the tag that says the run has nothing left to do."""
    mlflow.set_tags({tracking.STOP_REASON_TAG: result.stop_reason, tracking.GATES_PASSED_TAG: str(result.gates_passed).lower(),
                     tracking.PROMOTED_TAG: str(result.promoted).lower(), tracking.MODEL_VERSION_TAG: result.model_version})
    crash_point("finish.tagged")
    if not config.ppo.keep_checkpoint:
        shutil.rmtree(run_directory(config, result.run_id), ignore_errors=True)
    mlflow.set_tag(tracking.FINISHED_TAG, "true")


def comparison_rows(baseline: Evaluated, candidate: Evaluated) -> list[dict[str, Any]]:
    rows = []
    for key in ("mean_score", "mean_length", "distinct2", "gold_positive_share"):
        b, c = getattr(baseline.summary, key), getattr(candidate.summary, key)
        if b is not None:
            rows.append({"metric": key, "baseline": round(b, 4), "candidate": round(c, 4)})
    rows.append({"metric": "kl_from_reference", "baseline": 0.0, "candidate": round(candidate.kl or 0.0, 4)})
    return rows
