"""One training segment (the iterations up to the next checkpoint) in each of N data-parallel processes,
started by Accelerate's launcher:

    accelerate launch --num_processes 2 --multi_gpu -m components.rl.launch \\
        --config run.json --prompts prompts.json --checkpoint DIR --iterations 10 --stats stats.json

`--config` is the run configuration as the caller validated it, one JSON document (components.config.to_document:
its model URIs located on this machine, its secrets redacted), validated here by the schema alone. Every process
checks it is one of the `launch.num_processes` the configuration asks for, builds its run the one way the pipeline
does (components/rl/build.py), resumes from `--checkpoint` when it exists, and runs the iterations; the
main process writes the checkpoint and the iterations' statistics (`{"stop_reason", "num_processes", "sharded",
"history"}`) as JSON. With an Accelerate config asking for FSDP (`--config_file infra/accelerate/fsdp.yaml`) the
processes shard the policy and value head (FSDP2) instead of replicating them. Without CUDA the processes form
a gloo group on the CPU (`--multi_gpu` is Accelerate's torchrun path; its `--cpu` flag would start one process).
Metrics go nowhere else: the caller logs them, once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch

from components.checkpoint import resolve_checkpoint
from components.config import ConfigError, from_document
from components.rl import distributed
from components.rl.build import build_run


def run_segment(config_path: Path, prompts_path: Path, checkpoint: Path, iterations: int, stats_path: Path) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # joins the launcher's process group (gloo on CPU)
    if state.device.type == "cpu" and state.num_processes > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    config = from_document(config_path.read_text())
    if state.num_processes != config.launch.num_processes:  # what rl.gradient_accumulation_steps was validated against
        raise ConfigError(f"accelerate launch started {state.num_processes} process(es) but launch.num_processes is "
                          f"{config.launch.num_processes}: launch as many as the configuration says")
    prompts = json.loads(prompts_path.read_text())
    trainer = build_run(config).trainer
    try:
        resumed_from = resolve_checkpoint(checkpoint)
    except FileNotFoundError:
        resumed_from = None  # a fresh start
    if resumed_from is not None:
        trainer.load_checkpoint(resumed_from)
    result = trainer.train(prompts, iterations=iterations)
    trainer.save_checkpoint(checkpoint)
    if distributed.is_main_process():
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stop_reason": result.stop_reason, "num_processes": distributed.world_size(),
                                  "sharded": distributed.is_sharded(trainer.learner.module), "history": result.history}))
        tmp.replace(stats_path)
    state.wait_for_everyone()
    # The DDP wrapper's reducer holds the process group: free it first. Destroying the group under a live
    # reducer left the reducer's destructor joining a gloo thread forever (a finished rank that never exited).
    if trainer.accelerator is not None:
        trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    state.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True,
                        help="the validated run configuration, as JSON (components.config.to_document)")
    parser.add_argument("--prompts", type=Path, required=True, help="training prompts (JSON list of strings)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory: resumed from, then written")
    parser.add_argument("--iterations", type=int, required=True, help="iterations to run (any rl.advantage_estimator)")
    parser.add_argument("--stats", type=Path, required=True, help="where the main process writes the statistics")
    args = parser.parse_args(argv)
    run_segment(args.config, args.prompts, args.checkpoint, args.iterations, args.stats)


if __name__ == "__main__":
    main()
