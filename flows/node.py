"""One machine's share of a multi-machine training segment, as a Prefect flow.

The pipeline's training task runs machine 0 itself and starts one run of this flow per other machine from
the deployment `launch.node_deployment` (prefect.yaml: `alignflow-train-node/gpu`), so a worker of the work pool
with the hardware runs it there. The flow launches `accelerate launch --machine_rank R` for the same run
configuration, prompts, checkpoint and rendezvous; the processes meet the main machine's and train as one
run. Nothing is logged here: the main machine logs the segment once.

The checkpoint is read from storage every machine sees at the same path (`checkpoint.dir`); the run
configuration and prompts arrive as parameters, so they need no shared storage.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from components.config import PROJECT_ROOT, RunConfig, from_document, to_document
from components.rl import launcher
from components.rl.build import locate_models
from components.rl.distributed import accelerate_precision

NODE_FLOW = "alignflow-train-node"


@task(cache_policy=NONE)
def check_machine(config: RunConfig, checkpoint: str, checkpoint_iteration: int) -> None:
    """Fail before joining the rendezvous (where the main machine would wait for this one until it times out)
    when this machine cannot take part: the main machine's checkpoint not visible, or an Accelerate config missing."""
    launcher.check_shared_checkpoint(Path(checkpoint), checkpoint_iteration)
    launcher.accelerate_file_settings(config.launch, PROJECT_ROOT)


@task(cache_policy=NONE)
def launch_machine(config: RunConfig, prompts: list[str], checkpoint: str, iterations: int, machine_rank: int,
                   main_process_ip: str, main_process_port: int) -> None:
    """This machine's `accelerate launch`: num_processes / num_machines processes of the run."""
    meet = launcher.Rendezvous(config.launch.num_machines, main_process_ip, main_process_port)
    with tempfile.TemporaryDirectory(prefix="alignflow-node-") as tmp:
        work = Path(tmp)
        (work / "run.json").write_text(to_document(config))
        (work / "prompts.json").write_text(json.dumps(prompts))
        command = launcher.accelerate_command(config.launch, meet, machine_rank, config=work / "run.json",
                                              prompts=work / "prompts.json", checkpoint=Path(checkpoint),
                                              iterations=iterations, stats=work / "stats.json",
                                              mixed_precision=accelerate_precision(config.memory.trained_precision))
        get_run_logger().info("machine %d of %d: launching %d training processes: %s", machine_rank, meet.num_machines,
                              config.launch.num_processes // meet.num_machines, " ".join(command))
        launcher.run(command, PROJECT_ROOT)


@flow(name=NODE_FLOW, log_prints=True)
def train_node(run_config: str, prompts: list[str], checkpoint: str, checkpoint_iteration: int, iterations: int,
               machine_rank: int, main_process_ip: str, main_process_port: int) -> None:
    """Run machine `machine_rank`'s processes of a training segment whose main machine is at
    main_process_ip:main_process_port.

    `run_config` is the run's validated configuration as the main machine handed it on, one JSON document
    (components.config.to_document; validated here by the schema alone, its model URIs located on this machine);
    `checkpoint` the main machine's checkpoint directory, which must hold iteration `checkpoint_iteration`."""
    config = locate_models(from_document(run_config))
    check_machine(config, checkpoint, checkpoint_iteration)
    launch_machine(config, prompts, checkpoint, iterations, machine_rank, main_process_ip, main_process_port)
