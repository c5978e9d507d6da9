"""The reward-model stage's tasks: each wraps one component call (components/data/preferences.py,
components/reward/training.py and evaluation.py, components/tracking/registry.py) and adds what Prefect is for; what
every stage does alike is flows/stage.py. Like the policy pipeline's (flows/tasks.py), every task
is safe to run again, so `alignflow reward run --resume RUN_ID` after a crash ends where an uninterrupted run ends:
training continues from the run's checkpoint (which carries every step's statistics), evaluations are recorded on
the run and read back, registration finds the run's version, promotion completes an interrupted alias move.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from components.security import secrets

from components.tracking import registry, runs as tracking
from components.config import PROJECT_ROOT, RewardRunConfig
from components.errors import retryable
from components.evaluation.policy import load_gold_scorer
from components.faults import crash_point
from components.evaluation.gates import GateReport
from components.models.safety import check_model_files
from components.models.lengths import check_lengths
from components.models.loading import load_reward_model, load_tokenizer, locate
from components.data.preferences import PairReport, PreferencePair, drop_too_long, load_pairs, split_pairs
from components.reward.evaluation import (
    RewardEval, check_reward_gates, evaluate_pairs, gold_accuracy_of, plot_reliability, plot_score_distributions,
)
from components.reward.training import RewardTrainer, encode_pairs, load_base, pair_texts, score_pairs
from components.checkpoint import recover, write_atomically
from components.data.versioning import DatasetVersion
from flows import stage
from components.rl.progress import StepBar
from components.models.uris import resolve_model_uri

ACCURACY_TAG = "eval/accuracy"  # a reward-model version's held-out accuracy: what compare-and-set promotion compares
STEP_METRIC = "step"


@dataclass
class PreparedPairs:
    train: list[PreferencePair]
    held_out: list[PreferencePair]
    report: PairReport
    format: str


@dataclass
class RewardResult(stage.Result):
    """What a reward-model run came to: the flow's return value, recorded on the run (result.json) once settled."""

    run_id: str
    steps: int
    pairs_seen: int
    evaluation: RewardEval
    gates: GateReport
    model_version: str
    promoted: bool
    champion_version: str | None
    champion_accuracy: float | None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "RewardResult":
        return cls(**{**value, "evaluation": RewardEval.from_json(value["evaluation"]),
                      "gates": GateReport.from_json(value["gates"])})


# --- inputs -----------------------------------------------------------------------------------


def resolve(config: RewardRunConfig) -> RewardRunConfig:
    """The reward stage's part of stage.check_inputs: the base model found (a registry URI pinned to its version and
    downloaded), safe to load, and with positions for `model.max_length` tokens (lengths.check_lengths). Returns the
    configuration with `model.base` as this machine loads it."""
    tracking.use_tracking(config.tracking)
    base = locate("model.base", config.model.base, config.model.revision)
    check_model_files(Path(base) if Path(base).is_absolute() else PROJECT_ROOT / base, "model.base", config.model.allow_pickle)
    resolved = config.model_copy(update={"model": config.model.model_copy(update={"base": base})})
    check_lengths(resolved)
    return resolved


@task(cache_policy=NONE)
def prepare_pairs(config: RewardRunConfig, resolved: RewardRunConfig) -> PreparedPairs:
    """Load the pairs, leave out (and report by row) the bad ones and those over `model.max_length` tokens as the
    base model's tokenizer counts them, split off the held-out pairs with the seed."""
    pairs = load_pairs(config.data, PROJECT_ROOT)
    tokenizer = load_tokenizer(resolved.model.base, resolved.model.revision, padding_side="right")
    chat = bool(getattr(tokenizer, "chat_template", None))
    count = lambda pair: max(map(len, pair_texts(pair, tokenizer, config.model.append_eos, chat)))  # noqa: E731
    pairs = drop_too_long(pairs, count, config.model.max_length)
    train, held_out = split_pairs(pairs.pairs, config.data.eval_fraction, config.seed)
    get_run_logger().info("%s; %d training pairs, %d held out", pairs.report.summary(), len(train), len(held_out))
    return PreparedPairs(train, held_out, pairs.report, pairs.format)


# --- tracking around the flow ------------------------------------------------------------------


def provenance(config: RewardRunConfig) -> Callable[[], dict[str, str]]:
    """The reward run's own provenance tags (stage.start_tracking): the base model it trains."""
    return lambda: {"alignflow.base_model": config.model.base}


@task(cache_policy=NONE)
def log_dataset(data: PreparedPairs, version: DatasetVersion) -> None:
    """The data version on the run (tags; a dataset input whose digest is the md5 of the bytes read), and the bad
    rows by kind (data/* metrics, and a JSON artifact with their row numbers)."""
    get_run_logger().info(data.report.summary())
    mlflow.set_tags(version.as_tags())
    tracking.log_metrics_once({**data.report.as_metrics(), "data/pairs_train": len(data.train),
                               "data/pairs_held_out": len(data.held_out)})
    if not tracking.recorded("data_report.json"):
        tracking.record(data.report.as_json(), "data_report.json")
    text = lambda prompt: prompt if isinstance(prompt, str) else str(prompt)  # noqa: E731
    rows = [{"prompt": text(p.prompt), "chosen": p.chosen, "rejected": p.rejected, "split": split}
            for split, pairs in (("train", data.train), ("eval", data.held_out)) for p in pairs]
    tracking.log_dataset(version.name, secrets.redact_text(version.source), version.md5, rows=rows)


# --- training ---------------------------------------------------------------------------------


@task(cache_policy=NONE)
def build(config: RewardRunConfig, data: PreparedPairs) -> tuple[RewardTrainer, Any]:
    """The model to train (`model.base` with one output; LoRA if enabled) and its trainer on the training pairs."""
    model, tokenizer = load_base(config.model, config.seed)
    encoded = encode_pairs(data.train, tokenizer, config.model.append_eos)
    return RewardTrainer(model, encoded, config.training, config.seed, tokenizer.pad_token_id), tokenizer


@task(cache_policy=NONE)
def resume(trainer: RewardTrainer, config: RewardRunConfig, run_id: str) -> None:
    """Continue from this run's checkpoint when one exists; log the steps it holds that MLflow lacks."""
    directory = stage.run_directory(config, run_id) / "checkpoint"
    if recover(directory):
        trainer.load_checkpoint(directory)
        get_run_logger().info("resumed from %s at step %d of %d", directory, trainer.step, trainer.steps)
        tracking.log_history(trainer.history, step_key="pairs", step_metric=STEP_METRIC)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, retry_condition_fn=retryable,
      task_run_name="train-from-step-{start}")
def train(trainer: RewardTrainer, start: int, config: RewardRunConfig, run_id: str) -> int:
    """Steps up to the next checkpoint (every `checkpoint.every` optimizer steps) or the end, then the checkpoint, then
    their metrics; returns the step reached. A retry reloads the last checkpoint first."""

    directory = stage.run_directory(config, run_id) / "checkpoint"
    if trainer.step != start and recover(directory):
        trainer.load_checkpoint(directory)
    tracking.log_history(trainer.history, step_key="pairs", step_metric=STEP_METRIC)
    every = config.checkpoint.every
    with StepBar(trainer.steps, "reward model", start=trainer.step) as bar:
        trainer.train(until=(trainer.step // every + 1) * every, callback=bar)
    trainer.save_checkpoint(directory)
    crash_point("train.checkpointed")
    tracking.log_history(trainer.history, step_key="pairs", step_metric=STEP_METRIC)
    crash_point("train.logged")
    last = trainer.history[-1]
    get_run_logger().info("step %d of %d: loss %.4f, accuracy %.3f", trainer.step, trainer.steps, last["train/loss"],
                          last["train/accuracy"])
    return trainer.step


def save_model(trainer: RewardTrainer, tokenizer, config: RewardRunConfig) -> Callable[[Path], Path]:
    """How stage.export saves the trained reward model for registration: LoRA merged in, with its tokenizer."""
    def save(directory: Path) -> Path:
        model = trainer.model.merge_and_unload() if config.model.lora.enabled else trainer.model

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        return write_atomically(directory, write, key="checkpoint.dir")
    return save


# --- evaluation, gates, registry -----------------------------------------------------------------


@task(cache_policy=NONE, task_run_name="evaluate-{name}")
def evaluate(name: str, load, pairs: list[PreferencePair], config: RewardRunConfig, version: str | None = None) -> RewardEval:
    """Score the held-out pairs with the model `load()` gives, (model, tokenizer), each pair read with that model's
    own tokenizer; record the result (a resumed run reads it back) and the candidate's plots."""
    def run() -> tuple[RewardEval, dict[str, Any]]:
        model, tokenizer = load()
        encoded = encode_pairs(pairs, tokenizer, config.model.append_eos)
        chosen, rejected = score_pairs(model, encoded, tokenizer.pad_token_id, config.evaluation.score_batch_size)
        lengths = [(len(c) + len(r)) / 2 for c, r in zip(encoded.chosen, encoded.rejected)]
        evaluation = evaluate_pairs(chosen, rejected, lengths, config.evaluation)
        if config.evaluation.gold_scorer:
            gold_scorer = load_gold_scorer(config.evaluation.gold_scorer)
            evaluation = replace(evaluation, gold_accuracy=gold_accuracy_of(pairs, chosen, rejected, gold_scorer))
        if name == "candidate":
            mlflow.log_figure(plot_score_distributions(chosen, rejected), "plots/score_distributions.png")
            mlflow.log_figure(plot_reliability(chosen, rejected, config.evaluation.calibration_bins), "plots/reliability.png")
        return evaluation, {"evaluation": asdict(evaluation), "version": version, "scores": {"chosen": chosen, "rejected": rejected}}

    evaluation = stage.recorded_evaluation(name, run, lambda done: RewardEval.from_json(done["evaluation"]))
    tracking.log_metrics_once(evaluation.as_metrics(f"eval/{name}"))
    return evaluation


def registered_reward_model(config: RewardRunConfig, version: str):
    """A loader of a registered reward-model version (the champion), for `evaluate`."""
    def load():
        path = resolve_model_uri(f"models:/{config.tracking.registered_model}/{version}")
        return load_reward_model(path), load_tokenizer(path, padding_side="right")
    return load


@task(cache_policy=NONE)
def gates(config: RewardRunConfig, candidate: RewardEval, champion: RewardEval | None) -> GateReport:
    report = check_reward_gates(candidate, config.gates, champion)
    stage.record_gates(report, {}, key="reward-gate-report", description="reward-model gates")
    return report


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=retryable)
def register(config: RewardRunConfig, model_dir: Path | None, run_id: str, data: DatasetVersion, report: GateReport,
             candidate: RewardEval, champion_version: str | None, pairs: PreparedPairs) -> str:
    """Log the reward model in MLflow's transformers flavour and register it as a version of its own registered model,
    tagged with the preference data's md5, its base model and its evaluation. A resumed run gets its version back."""
    return stage.register_version(config, run_id, data, report, champion_version,
                                  log_model=lambda: registry.log_reward_model(model_dir), tags=lambda: {
        tracking.STAGE_TAG: "reward", "data_source": config.data.source, "alignflow.base_model": config.model.base,
        "pairs_train": len(pairs.train), "pairs_held_out": len(pairs.held_out), "lora": config.model.lora.enabled,
        ACCURACY_TAG: candidate.accuracy, "eval/accuracy_ci_low": candidate.accuracy_ci[0],
        "eval/accuracy_ci_high": candidate.accuracy_ci[1], "eval/mean_margin": candidate.mean_margin,
        "eval/calibration_error": candidate.calibration_error, "eval/n": candidate.n})


@task(cache_policy=NONE)
def finish(run_id: str, trainer: RewardTrainer, candidate: RewardEval, report: GateReport, version: str, promoted: bool,
           champion_version: str | None, champion: RewardEval | None, config: RewardRunConfig) -> RewardResult:
    """The training curves, then the run's result, recorded: from then on the run's outcome is settled."""
    if trainer.history:
        tracking.log_training_curves(trainer.history, step_key="pairs", score_key="train/loss", kl_key="train/accuracy",
                                     artifact_file="plots/training_curves.png", title="reward-model training")
    result = RewardResult(run_id=run_id, steps=trainer.step, pairs_seen=trainer.step * config.training.batch_size,
                          evaluation=candidate, gates=report, model_version=version, promoted=promoted,
                          champion_version=champion_version, champion_accuracy=champion.accuracy if champion else None)
    tracking.record(asdict(result), "result.json")
    crash_point("finish.artifacts")
    return result
