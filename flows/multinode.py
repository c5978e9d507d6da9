"""A training segment's iterations in several processes and on several machines, launched from the pipeline's
training task.

`launch_iterations` runs the iterations in `launch.num_processes` data-parallel processes (`accelerate launch`, with
`launch.accelerate_config` if set), from and to the run's checkpoint. Over `launch.num_machines` > 1 machines this machine
is machine 0 (its processes include the main one, which writes the checkpoint); each other machine's share is a
flow run of `launch.node_deployment` (flows/node.py), submitted before this machine launches (they meet at the
rendezvous) and waited for after it. Any machine failing fails the launch, naming it: a node run that fails stops
the launch here rather than leaving it to wait out the rendezvous, and a launch failing here cancels the node runs.

The iterations' statistics travel in the checkpoint (the trainer's history), so the caller logs them from there.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from components.models import uris

from components.config import PROJECT_ROOT, ConfigError, RunConfig, to_document
from components.models.loading import with_models
from components.rl import Trainer, launcher
from components.rl.build import locate_models
from components.rl.distributed import accelerate_precision


def launch_iterations(trainer: Trainer, prompts: list[str], config: RunConfig, directory: Path, iterations: int) -> None:
    """Run `iterations` more iterations in `launch.num_processes` processes (over `launch.num_machines` machines), from and
    to the checkpoint in `directory`, then reload it into `trainer`."""
    if not directory.exists():
        trainer.save_checkpoint(directory)
    meet = launcher.rendezvous(config.launch, PROJECT_ROOT)
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="alignflow-launch-") as tmp:
        work = Path(tmp)
        # the validated configuration, its models as this machine loads them, as the one document the processes read
        (work / "run.json").write_text(to_document(locate_models(config)))
        (work / "prompts.json").write_text(json.dumps(prompts))
        command = launcher.accelerate_command(config.launch, meet, 0, config=work / "run.json", prompts=work / "prompts.json",
                                              checkpoint=directory, iterations=iterations, stats=work / "stats.json",
                                              mixed_precision=accelerate_precision(config.memory.trained_precision))
        nodes = start_other_machines(config, meet, prompts, directory, trainer.iteration, iterations)
        logger.info("launching %d training processes%s: %s", config.launch.num_processes,
                    f" over {meet.num_machines} machines (this one is machine 0)" if nodes else "", " ".join(command))
        try:
            launcher.run(command, PROJECT_ROOT, should_stop=lambda: failed_node(nodes) if nodes else None,
                         poll_seconds=5.0)
        except BaseException:
            cancel_nodes(nodes)
            raise
    if nodes:  # the iterations ran and are checkpointed: a node run failing now fails the task, whose retry logs them
        problems = wait_for_nodes(nodes)
        if problems:
            trainer.load_checkpoint(directory)
            raise RuntimeError(f"{len(problems)} of the {len(nodes)} other machine(s) did not complete: " + "; ".join(problems))
    trainer.load_checkpoint(directory)


# --- the other machines of a multi-machine launch -----------------------------------------------

@dataclass
class NodeRun:
    """The flow run of `launch.node_deployment` that runs machine `machine_rank`'s share."""

    machine_rank: int
    id: Any
    name: str

    def __str__(self) -> str:
        return f"machine {self.machine_rank} (flow run {self.name}, {self.id})"


def start_other_machines(config: RunConfig, meet: launcher.Rendezvous, prompts: list[str], directory: Path,
                         checkpoint_iteration: int, iterations: int) -> list[NodeRun]:
    """Submit one flow run of `launch.node_deployment` per machine rank 1..num_machines-1 (none on one machine).

    They get the run's validated configuration as one document (components.config.to_document) with registry aliases
    pinned to versions (each machine locates its own copy of the models), the prompts, and the checkpoint's absolute path, which must be on shared storage."""
    if meet.num_machines == 1:
        return []
    from prefect.deployments import run_deployment

    pinned = with_models(config, lambda key, ref: uris.pin_model_uri(ref))
    # Flow-run parameters are stored and shown by the Prefect server: the configuration goes as its validated document,
    # without its secrets (a node trains; each machine's worker has its own credentials).
    parameters = {"run_config": to_document(pinned), "prompts": list(prompts), "checkpoint": str(directory.resolve()),
                  "checkpoint_iteration": checkpoint_iteration, "iterations": iterations,
                  "main_process_ip": meet.main_process_ip, "main_process_port": meet.main_process_port}
    nodes: list[NodeRun] = []
    try:
        for rank in range(1, meet.num_machines):
            run = run_deployment(config.launch.node_deployment, parameters={**parameters, "machine_rank": rank}, timeout=0,
                                 flow_run_name=f"{flow_run.name or 'train'}-machine-{rank}", tags=["alignflow-train-node"])
            nodes.append(NodeRun(rank, run.id, run.name))
            get_run_logger().info("submitted %s of %s", nodes[-1], config.launch.node_deployment)
    except ObjectNotFound:
        cancel_nodes(nodes)
        raise ConfigError(f"launch.node_deployment: the Prefect server has no deployment {config.launch.node_deployment}; "
                          "deploy flows/node.py:train_node (prefect.yaml: alignflow-train-node/gpu) on the GPU work pool") from None
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


