"""The pipeline's tasks: each wraps one component call and adds what Prefect is for (retries,
caching, artifacts). The MLflow run is started by the flow; tasks run in the flow's thread, so
MLflow's active run is theirs too.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run, task_run

from components import secrets, tracking
from components.config import PROJECT_ROOT, ConfigError, RunConfig
from components.data import DataVersion, PromptSet, check_data, load_prompts, split_prompts
from components.evaluation import GateReport, PolicyEval, check_gates, compare, evaluate_policy
from components.models import load_policy as load_policy_model, load_tokenizer
from components.ppo import PPOTrainer, launcher
from components.ppo.progress import ProgressBar
from components.reward import RewardScorer


@dataclass
class PreparedData:
    train_prompts: list[str]
    eval_prompts: list[str]
    report: dict[str, Any]
    summary: str


@dataclass
class Evaluated:
    """One policy's evaluation and the samples behind it (for the eval-samples table)."""

    name: str
    summary: PolicyEval
    prompts: list[str]
    completions: list[str]
    scores: list[float]
    kl: float | None = None


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


def model_path(ref: str) -> str:
    """A registry URI resolved to a local copy; a path relative to the project root; else a hub id."""
    if ref.startswith("models:/"):
        return tracking.resolve_model_reference(ref)
    local = PROJECT_ROOT / ref
    return str(local) if not Path(ref).is_absolute() and local.exists() else ref


def start_tracking(config: RunConfig, resume_run_id: str | None) -> str:
    """Start (or resume) the flow's MLflow run; record the config and provenance once."""
    run = tracking.start_run(config, resume_run_id)
    if resume_run_id is None:
        tracking.log_config(config)
        mlflow.set_tags({"alignflow.git_commit": git_commit(), "alignflow.prefect_flow_run_id": flow_run.id or "",
                         "alignflow.base_policy": config.policy.model, "alignflow.reward_model": config.reward.model})
    return run.info.run_id


def end_tracking(run_id: str, failed: bool) -> None:
    try:
        tracking.end_run(run_id, failed=failed)
    except Exception as exc:  # the tracking server may be what failed; keep the original error in front
        if not failed:
            raise
        print(f"could not mark MLflow run {run_id} failed: {exc}")


class ServerUnreachable(RuntimeError):
    """A server the pipeline needs stayed unreachable through every retry."""


_CONNECTION_TROUBLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection", "ConnectionError")


def explain_failure(exc: BaseException, config: RunConfig, run_id: str) -> BaseException:
    """Name the server and URL when MLflow could not be reached, and say how to resume."""
    if not any(sign in f"{type(exc).__name__}: {exc}" for sign in _CONNECTION_TROUBLE):
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


# --- data -------------------------------------------------------------------------------------


@task(retries=1)
def check_data_version(config: RunConfig) -> DataVersion:
    """data/ must match data.dvc; the md5 is this run's data version."""
    if not config.data.check_dvc:
        return DataVersion(md5="unchecked", path=config.data.source, files=None, size=None)
    version = check_data(PROJECT_ROOT / config.data.dvc_file)
    mlflow.set_tag("alignflow.data_md5", version.md5)
    return version


def _prepare_key(context, parameters) -> str:
    config: RunConfig = parameters["config"]
    settings = {"md5": parameters["data_md5"], "data": config.data.model_dump(mode="json"), "seed": config.seed,
                "eval_size": config.data.eval_size}
    return "prepare-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


@task(cache_key_fn=_prepare_key, persist_result=True, result_serializer="json")
def prepare_dataset(config: RunConfig, data_md5: str) -> dict[str, Any]:
    """Load, filter and split the prompts. Cached by data version and data settings."""
    prompts: PromptSet = load_prompts(config.data, PROJECT_ROOT)
    train, held_out = split_prompts(prompts.prompts, config.data.eval_size, config.seed)
    report = prompts.report
    return {"train_prompts": train, "eval_prompts": held_out, "report": report.as_metrics(), "summary": report.summary()}


def as_prepared(raw: dict[str, Any]) -> PreparedData:
    return PreparedData(**raw)


@task(cache_policy=NONE)
def log_dataset(config: RunConfig, data: PreparedData, version: DataVersion) -> None:
    logger = get_run_logger()
    logger.info(data.summary)
    mlflow.log_metrics(data.report)
    rows = [{"prompt": p, "split": "train"} for p in data.train_prompts] + [{"prompt": p, "split": "eval"} for p in data.eval_prompts]
    tracking.log_dataset("prompts", config.data.source, version.md5, rows=rows)


# --- models -----------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def load_reward_model(config: RunConfig) -> RewardScorer:
    """Load the reward model (hub id, path or models:/NAME@ALIAS) and check it scores a probe pair."""
    reward = config.reward.model_copy(update={"model": model_path(config.reward.model)})
    scorer = RewardScorer.from_config(reward)
    probe = scorer(["The film was", "The film was"], [" wonderful and moving.", " dull."])
    if probe.shape != (2,) or not bool(probe.isfinite().all()):
        raise ValueError(f"reward.model {config.reward.model}: probe pair scored {probe.tolist()}; expected two finite scores")
    get_run_logger().info("reward model %s scores the probe pair %s", config.reward.model, [round(x, 4) for x in probe.tolist()])
    return scorer


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def load_policy(config: RunConfig):
    """The starting policy (causal LM or encoder-decoder, from its config) and its tokenizer."""
    path = model_path(config.policy.model)
    return (load_policy_model(path, config.policy.revision, allow_pickle=config.policy.allow_pickle),
            load_tokenizer(path, config.policy.revision))


# --- evaluation -------------------------------------------------------------------------------


@task(cache_policy=NONE, task_run_name="evaluate-{name}")
def evaluate(name: str, policy, tokenizer, prompts: list[str], scorer: RewardScorer, config: RunConfig, reference=None) -> Evaluated:
    """Sample the held-out prompts with the evaluation seed, score them, and (for a candidate) its KL."""
    chat = config.policy.use_chat_template
    summary, samples, scores = evaluate_policy(policy, tokenizer, prompts, scorer, config.generation, config.evaluation, chat)
    kl = None
    if reference is not None:
        from components.ppo import sequence_kl

        kl = sequence_kl(policy, reference, tokenizer, prompts, samples.completions, config.generation, samples.ended_with_eos,
                         use_chat_template=chat)
    mlflow.log_metrics(summary.as_metrics(f"eval/{name}"))
    return Evaluated(name, summary, list(prompts), samples.completions, scores, kl)


@task(cache_policy=NONE)
def evaluate_champion(config: RunConfig, prompts: list[str], scorer: RewardScorer) -> tuple[str, Evaluated] | None:
    """The current champion on the same prompts and seed, or None when there is none yet."""
    champion = tracking.get_champion(config.tracking.registered_model, config.tracking.champion_alias)
    if champion is None:
        return None
    path = tracking.resolve_model_reference(f"models:/{config.tracking.registered_model}/{champion.version}")
    model, tokenizer = load_policy_model(path), load_tokenizer(path)
    summary, samples, scores = evaluate_policy(model, tokenizer, prompts, scorer, config.generation, config.evaluation,
                                               config.policy.use_chat_template)
    mlflow.log_metrics(summary.as_metrics("eval/champion"))
    return str(champion.version), Evaluated("champion", summary, list(prompts), samples.completions, scores)


# --- PPO --------------------------------------------------------------------------------------


def checkpoint_dir(config: RunConfig, run_id: str) -> Path:
    """One checkpoint directory per MLflow run: concurrent runs never share one."""
    root = Path(config.ppo.checkpoint_dir)
    return (root if root.is_absolute() else PROJECT_ROOT / root) / run_id


@task(cache_policy=NONE)
def build_trainer(config: RunConfig, policy, tokenizer, scorer: RewardScorer, run_id: str) -> PPOTrainer:
    """The engine around the starting policy; resumes from this run's checkpoint when one exists. The run is
    tagged with the models whose forwards run on packed episodes (ppo.pack_sequences, where the family allows)."""
    trainer = PPOTrainer.from_config(config, policy, tokenizer, scorer)
    mlflow.set_tag("alignflow.packed_sequences", ", ".join(trainer.packed_models) or "none")
    directory = checkpoint_dir(config, run_id)
    if directory.exists():
        trainer.load_checkpoint(directory)
        flush_pending_metrics(config, run_id)
        get_run_logger().info("resumed from %s at iteration %d (%d episodes)", directory, trainer.iteration, trainer.episodes)
    return trainer


def max_epochs(config: RunConfig) -> int:
    iterations = -(-config.ppo.max_steps // config.ppo.batch_size)
    return -(-iterations // config.ppo.iterations_per_epoch)


def pending_metrics_file(config: RunConfig, run_id: str) -> Path:
    return _pending_beside(checkpoint_dir(config, run_id))


def _pending_beside(directory: Path) -> Path:
    return directory.with_name(f"{directory.name}.pending-metrics.json")


def keep_pending_metrics(directory: Path, history: list[dict[str, float]]) -> None:
    """Write an epoch's statistics beside its checkpoint (atomically) until they reach MLflow."""
    pending = _pending_beside(directory)
    pending.with_suffix(".tmp").write_text(json.dumps(history))
    pending.with_suffix(".tmp").replace(pending)


def flush_pending_metrics(config: RunConfig, run_id: str) -> None:
    """Log the statistics of a checkpointed epoch that have not reached MLflow yet, then forget them."""
    path = pending_metrics_file(config, run_id)
    if path.exists():
        for stats in json.loads(path.read_text()):
            tracking.log_stats(stats, step=int(stats["episodes"]))
        path.unlink()


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, task_run_name="ppo-epoch-{epoch}")
def ppo_epoch(trainer: PPOTrainer, epoch: int, prompts: list[str], config: RunConfig, run_id: str) -> str | None:
    """PPO iterations up to the end of this epoch, then a checkpoint; returns the stop reason, if any.

    Idempotent: a retry (or a rerun with --resume) reloads the last checkpoint and runs only the
    iterations this epoch still lacks. An epoch's statistics are written beside its checkpoint and
    reach MLflow after it, so no step is logged twice and none is lost while MLflow is down.
    """
    directory = checkpoint_dir(config, run_id)
    flush_pending_metrics(config, run_id)
    if task_run.run_count > 1 and directory.exists():
        trainer.load_checkpoint(directory)
        get_run_logger().warning("attempt %d of epoch %d: resumed from %s at iteration %d",
                                 task_run.run_count, epoch, directory, trainer.iteration)
    missing = (epoch + 1) * config.ppo.iterations_per_epoch - trainer.iteration
    history: list[dict[str, float]] = []

    def record(stats: dict[str, float]) -> None:
        history.append(stats)
        bar(stats)

    if missing > 0:
        if config.ppo.num_processes > 1:
            history = launch_ppo_iterations(trainer, prompts, config, directory, missing)
        else:
            with ProgressBar(config.ppo.max_steps, f"PPO epoch {epoch}", start_episodes=trainer.episodes) as bar:
                trainer.train(prompts, iterations=missing, callback=record)
            trainer.save_checkpoint(directory)
        keep_pending_metrics(directory, history)
        flush_pending_metrics(config, run_id)
        last = history[-1]
        get_run_logger().info("epoch %d: %d episodes, score %.3f, kl %.3f", epoch, trainer.episodes,
                              last["objective/scores"], last["objective/kl"])
    return trainer.stop_reason


def _with_model_references(config: RunConfig, rewrite: Callable[[str], str]) -> RunConfig:
    """The configuration with the policy's and the reward model's references passed through `rewrite`."""
    return config.model_copy(update={
        "policy": config.policy.model_copy(update={"model": rewrite(config.policy.model)}),
        "reward": config.reward.model_copy(update={"model": rewrite(config.reward.model)}),
    })


def resolved_models(config: RunConfig) -> RunConfig:
    """The configuration with the policy and reward model references as this machine loads them."""
    return _with_model_references(config, model_path)


def launch_ppo_iterations(
    trainer: PPOTrainer, prompts: list[str], config: RunConfig, directory: Path, iterations: int
) -> list[dict[str, float]]:
    """Run the iterations in `ppo.num_processes` data-parallel processes (`accelerate launch`, with
    `ppo.accelerate_config` if set), from and to the checkpoint; reload it here and return the statistics,
    which only this process logs.

    Over `ppo.num_machines` > 1 machines this one is machine 0 (its processes include the main one, which writes
    the checkpoint and the statistics); each other machine's share is a flow run of `ppo.node_deployment`,
    submitted before this machine launches (they meet at the rendezvous) and waited for after it. Any machine
    failing fails the epoch, naming it: a node run that fails stops the launch here rather than leaving it to
    wait out the rendezvous, and a launch failing here cancels the node runs."""
    if not directory.exists():
        trainer.save_checkpoint(directory)
    meet = launcher.rendezvous(config.ppo, PROJECT_ROOT)
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="alignflow-launch-") as tmp:
        work = Path(tmp)
        (work / "run.yaml").write_text(resolved_models(config).to_yaml())
        (work / "prompts.json").write_text(json.dumps(prompts))
        command = launcher.accelerate_command(config.ppo, meet, 0, config=work / "run.yaml", prompts=work / "prompts.json",
                                              checkpoint=directory, iterations=iterations, stats=work / "stats.json")
        nodes = start_other_machines(config, meet, prompts, directory, trainer.iteration, iterations)
        logger.info("launching %d PPO processes%s: %s", config.ppo.num_processes,
                    f" over {meet.num_machines} machines (this one is machine 0)" if nodes else "", " ".join(command))
        try:
            launcher.run(command, PROJECT_ROOT, should_stop=lambda: failed_node(nodes) if nodes else None,
                         poll_seconds=5.0)
        except BaseException:
            cancel_nodes(nodes)
            raise
        stats = json.loads((work / "stats.json").read_text())
        if stats["num_processes"] != config.ppo.num_processes:
            cancel_nodes(nodes)
            raise RuntimeError(f"accelerate launch ran {stats['num_processes']} process(es); ppo.num_processes is {config.ppo.num_processes}")
        history = stats["history"]
    if nodes:  # the iterations ran and are checkpointed: should a node run fail now, the retry logs their metrics
        keep_pending_metrics(directory, history)
        problems = wait_for_nodes(nodes)
        if problems:
            raise RuntimeError(f"{len(problems)} of the {len(nodes)} other machine(s) did not complete: " + "; ".join(problems))
    trainer.load_checkpoint(directory)
    return history


# --- the other machines of a multi-machine launch -----------------------------------------------


@dataclass
class NodeRun:
    """The flow run of `ppo.node_deployment` that runs machine `machine_rank`'s share."""

    machine_rank: int
    id: Any
    name: str

    def __str__(self) -> str:
        return f"machine {self.machine_rank} (flow run {self.name}, {self.id})"


def start_other_machines(config: RunConfig, meet: launcher.Rendezvous, prompts: list[str], directory: Path,
                         checkpoint_iteration: int, iterations: int) -> list[NodeRun]:
    """Submit one flow run of `ppo.node_deployment` per machine rank 1..num_machines-1 (none on one machine).

    They get the run configuration with registry aliases pinned to versions (each machine resolves its own
    copy of the models), the prompts, and the checkpoint's absolute path, which must be on shared storage."""
    if meet.num_machines == 1:
        return []
    from prefect.deployments import run_deployment

    pinned = _with_model_references(config, tracking.pin_model_reference)
    # Flow-run parameters are stored and shown by the Prefect server: the configuration goes without its secrets
    # (a node trains; each machine's worker has its own credentials).
    parameters = {"run_config": secrets.redacted_yaml(pinned), "prompts": list(prompts), "checkpoint": str(directory.resolve()),
                  "checkpoint_iteration": checkpoint_iteration, "iterations": iterations,
                  "main_process_ip": meet.main_process_ip, "main_process_port": meet.main_process_port}
    nodes: list[NodeRun] = []
    try:
        for rank in range(1, meet.num_machines):
            run = run_deployment(config.ppo.node_deployment, parameters={**parameters, "machine_rank": rank}, timeout=0,
                                 flow_run_name=f"{flow_run.name or 'ppo'}-machine-{rank}", tags=["alignflow-ppo-node"])
            nodes.append(NodeRun(rank, run.id, run.name))
            get_run_logger().info("submitted %s of %s", nodes[-1], config.ppo.node_deployment)
    except ObjectNotFound:
        cancel_nodes(nodes)
        raise ConfigError(f"ppo.node_deployment: the Prefect server has no deployment {config.ppo.node_deployment}; "
                          "deploy flows/node.py:ppo_node (prefect.yaml: alignflow-ppo-node/gpu) on the GPU work pool") from None
    except BaseException:
        cancel_nodes(nodes)
        raise
    return nodes


def _read_states(nodes: list[NodeRun]) -> list[tuple[NodeRun, Any]]:
    with get_client(sync_client=True) as client:
        return [(node, client.read_flow_run(node.id).state) for node in nodes]


def failed_node(nodes: list[NodeRun]) -> str | None:
    """A node run that ended without completing, described; None while every one is scheduled, running or done
    (and when the Prefect server does not answer: that alone is no reason to stop a training that runs)."""
    try:
        states = _read_states(nodes)
    except Exception as exc:  # noqa: BLE001 - asked again at the next poll
        get_run_logger().warning("could not read the node runs' states: %s", exc)
        return None
    for node, state in states:
        if state is not None and state.is_final() and not state.is_completed():
            return f"{node} ended {state.name}: {state.message or 'see its logs'}"
    return None


def wait_for_nodes(nodes: list[NodeRun], timeout_seconds: float = 300) -> list[str]:
    """Wait until every node run has ended (they end with the launch); what went wrong with each that did not complete.

    A node run still unfinished after `timeout_seconds` is cancelled and reported."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        states = _read_states(nodes)
        if all(state is not None and state.is_final() for _, state in states) or time.monotonic() > deadline:
            break
        time.sleep(2)
    problems = []
    for node, state in states:
        if state is None or not state.is_final():
            problems.append(f"{node} had not finished {timeout_seconds:.0f} s after this machine's launch ended "
                            f"({state.name if state else 'no state'}); cancelled")
            cancel_nodes([node])
        elif not state.is_completed():
            problems.append(f"{node} ended {state.name}: {state.message or 'see its logs'}")
    return problems


def cancel_nodes(nodes: list[NodeRun]) -> None:
    """Cancel the node runs that have not ended: a running one is asked to stop (its worker ends the process),
    one not started yet is cancelled outright. Best effort: the launch's own error is the one to report."""
    from prefect.states import Cancelled, Cancelling

    if not nodes:
        return
    try:
        with get_client(sync_client=True) as client:
            for node in nodes:
                state = client.read_flow_run(node.id).state
                if state is None or not state.is_final():
                    client.set_flow_run_state(node.id, Cancelling() if state is not None and state.is_running() else Cancelled(),
                                              force=True)
                    get_run_logger().warning("cancelled %s", node)
    except Exception as exc:  # noqa: BLE001 - reported, and the original failure raised by the caller
        get_run_logger().error("could not cancel every node run (%s): cancel them in Prefect", exc)


# --- gates, registry --------------------------------------------------------------------------


@task(cache_policy=NONE)
def gates(config: RunConfig, baseline: Evaluated, candidate: Evaluated, champion: tuple[str, Evaluated] | None) -> GateReport:
    comparison = compare(baseline.summary, candidate.summary, n_resamples=config.evaluation.bootstrap_samples,
                         seed=config.evaluation.seed)
    champion_score = champion[1].summary.mean_score if champion else None
    report = check_gates(comparison, candidate.kl if candidate.kl is not None else float("nan"), config.gates, champion_score)
    mlflow.log_metrics({**report.as_metrics(), "eval/reward_gain": comparison.reward_gain,
                        "eval/reward_gain_ci_low": comparison.reward_gain_ci[0], "eval/reward_gain_ci_high": comparison.reward_gain_ci[1],
                        "eval/win_rate": comparison.win_rate, "eval/length_ratio": comparison.length_ratio, "eval/kl": report.kl})
    mlflow.set_tags(report.as_tags())
    mlflow.log_text(report.to_markdown(), "gate_report.md")
    create_markdown_artifact(markdown=report.to_markdown(), key="gate-report", description="alignflow promotion gates")
    return report


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE)
def register(config: RunConfig, trainer: PPOTrainer, data_md5: str, report: GateReport, candidate: Evaluated, stop_reason: str | None) -> str:
    """Log the policy (with tokenizer) in MLflow's transformers flavour and register it as a new version."""
    with tempfile.TemporaryDirectory(prefix="alignflow-policy-") as tmp:
        policy_dir = trainer.export_policy(Path(tmp) / "policy", merge=config.policy.lora.save_mode == "merged")
        version = tracking.log_policy_model(
            policy_dir,
            config.tracking.registered_model,
            tags={
                "gates_passed": report.passed,
                "gates_failed": ",".join(report.failed_names),
                "data_md5": data_md5,
                "reward_model": config.reward.model,
                "base_policy": config.policy.model,
                "git_commit": git_commit(),
                "prefect_flow_run_id": flow_run.id or "",
                "mlflow_run_id": mlflow.active_run().info.run_id,
                "eval_mean_score": candidate.summary.mean_score,
                "eval_kl": candidate.kl,
                "stop_reason": stop_reason or "epochs",
            },
            model_config={"max_new_tokens": config.generation.max_new_tokens, "do_sample": True,
                          "temperature": config.generation.temperature},
        )
    mlflow.set_tag(tracking.MODEL_VERSION_TAG, version.version)
    return str(version.version)


PROMOTION_LOCK = "alignflow-promotion"


@contextmanager
def promotion_lock(timeout_seconds: float = 600) -> Iterator[None]:
    """One promotion at a time across every run on the server: a Prefect global concurrency limit of 1.

    A failed lease renewal is logged, not fatal (Prefect's default under strict=True is to cancel the
    holder mid-call, and a registry update cut in half is worse than a late one); the lease lasts
    300 s and promote_if_best still compares before it sets.
    """
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(PROMOTION_LOCK, 1)
    with concurrency(PROMOTION_LOCK, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                     raise_on_lease_renewal_failure=False):
        yield


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE)
def promote(config: RunConfig, version: str, report: GateReport, candidate: Evaluated, champion: tuple[str, Evaluated] | None) -> bool:
    """Only a version that passed every gate becomes champion; a failure leaves the champion alone.

    Promotions are serialised by a Prefect global concurrency limit of 1, and inside it the alias is
    compared-and-set: of candidates finishing together, the best passing evaluation wins.
    """
    logger = get_run_logger()
    if not report.passed:
        logger.warning("version %s not promoted: %s", version, report.summary())
        return False
    with promotion_lock():
        promoted, why = tracking.promote_if_best(
            config.tracking.registered_model, version, candidate.summary.mean_score, config.tracking.champion_alias,
            evaluated_against=champion[0] if champion else None,
            user=f"alignflow-pipeline ({getpass.getuser()})", reason=report.summary(),
        )
    (logger.info if promoted else logger.warning)("version %s: %s", version, why)
    return promoted


@task(cache_policy=NONE)
def finish(run_id: str, config: RunConfig, trainer: PPOTrainer, stop_reason: str | None, baseline: Evaluated,
           candidate: Evaluated, report: GateReport, version: str, promoted: bool,
           champion: tuple[str, Evaluated] | None) -> PipelineResult:
    """Artifacts people would rather see than read: curves, samples, the comparison table."""
    mlflow.set_tags({tracking.STOP_REASON_TAG: stop_reason or "epochs", tracking.GATES_PASSED_TAG: str(report.passed).lower(),
                     "alignflow.promoted": str(promoted).lower()})
    client = mlflow.MlflowClient()
    history: dict[int, dict[str, float]] = {}
    for key in ("objective/scores", "objective/kl"):
        for metric in client.get_metric_history(run_id, key):
            history.setdefault(metric.step, {"episode": metric.step})[key] = metric.value
    if history:
        tracking.log_training_curves([history[s] for s in sorted(history)], score_key="objective/scores")
    n = config.evaluation.num_samples_logged
    tracking.log_eval_samples([
        {"prompt": p, "baseline_completion": b, "candidate_completion": c, "baseline_score": bs, "candidate_score": cs}
        for p, b, c, bs, cs in list(zip(baseline.prompts, baseline.completions, candidate.completions, baseline.scores, candidate.scores))[:n]
    ])
    rows = comparison_rows(baseline, candidate)
    create_table_artifact(table=rows, key="baseline-vs-candidate", description="held-out evaluation")
    return PipelineResult(
        run_id=run_id, stop_reason=stop_reason or "epochs", episodes=trainer.episodes,
        baseline=baseline.summary.as_metrics("baseline"), candidate={**candidate.summary.as_metrics("candidate"), "candidate/kl": candidate.kl},
        gates_passed=report.passed, gate_summary=report.summary(), model_version=version, promoted=promoted,
        gate_rows=[{"gate": g.name, "value": g.value, "requirement": g.rule, "passed": g.passed} for g in report.gates],
        champion_version=champion[0] if champion else None,
    )


def comparison_rows(baseline: Evaluated, candidate: Evaluated) -> list[dict[str, Any]]:
    rows = []
    for key in ("mean_score", "mean_length", "distinct2", "gold_positive_share"):
        b, c = getattr(baseline.summary, key), getattr(candidate.summary, key)
        if b is not None:
            rows.append({"metric": key, "baseline": round(b, 4), "candidate": round(c, 4)})
    rows.append({"metric": "kl_from_reference", "baseline": 0.0, "candidate": round(candidate.kl or 0.0, 4)})
    return rows
