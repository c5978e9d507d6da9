"""Episodes/s of the PPO engine in 1 and 2 data-parallel processes (accelerate launch, gloo on CPU).

    .venv/bin/python -m benchmarks.data_parallel [--iterations 4] [--batch-size 32]

Runs the demo configuration's models through `components.rl.launch` with --num_processes 1 and 2, alternating
(1 2 2 1), and reports the median over runs of the median episodes/s over the iterations after the first (warm-up). Results go to
benchmarks/results/data_parallel.json. Process start-up and model loading are excluded: the time is the engine's own time/rollout + time/scoring + time/update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from components.config import DEMO_CONFIG, PROJECT_ROOT, apply_overrides, load_config, to_document
from components.rl.launcher import free_port


def run(processes: int, config_path: Path, prompts_path: Path, iterations: int, work: Path, threads: int) -> list[dict]:
    stats = work / f"stats-{processes}.json"
    checkpoint = work / f"checkpoint-{processes}"
    # As the flow launches them: torchrun (--multi_gpu) for several processes, a gloo group on the CPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--multi_gpu" if processes > 1 else "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "components.rl.launch",
               "--config", str(config_path), "--prompts", str(prompts_path), "--checkpoint", str(checkpoint),
               "--iterations", str(iterations), "--stats", str(stats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, cwd=PROJECT_ROOT, env=env, capture_output=True)
    subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    result = json.loads(stats.read_text())
    if result["num_processes"] != processes:
        raise RuntimeError(f"asked for {processes} processes, the launcher ran {result['num_processes']}")
    return result["history"]


def episodes_per_second(history: list[dict], batch_size: int) -> float:
    seconds = [s["time/rollout"] + s["time/scoring"] + s["time/update"] for s in history[1:]]
    return batch_size / statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per process (default: the cores shared out, the same cores either way)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    config = load_config(DEMO_CONFIG, [f"rl.rollout_batch_size={args.batch_size}", f"rl.mini_batch_size={args.batch_size // 2}",
                                       "rl.gradient_accumulation_steps=2"])
    config = config.model_copy(update={
        "policy": config.policy.model_copy(update={"model": str(PROJECT_ROOT / config.policy.model)}),
        "reward": config.reward.model_copy(update={"model": str(PROJECT_ROOT / config.reward.model)}),
    })
    from components.data.prompts import load_prompts, split_prompts

    prompts = split_prompts(load_prompts(config.data, PROJECT_ROOT).prompts, config.data.eval_size, config.seed)[0]
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="alignflow-dp-bench-") as tmp:
        work = Path(tmp)
        for processes in (1, 2):  # each launch reads the validated configuration of its own process count
            document = to_document(apply_overrides(config, [f"launch.num_processes={processes}"]))
            (work / f"run-{processes}.json").write_text(document)
        (work / "prompts.json").write_text(json.dumps(prompts))
        for processes in (1, 2, 2, 1):
            threads = args.threads or max(1, cores // processes)
            history = run(processes, work / f"run-{processes}.json", work / "prompts.json", args.iterations, work, threads)
            results[processes].append(episodes_per_second(history, args.batch_size))
    one, two = (statistics.median(results[n]) for n in (1, 2))
    print(f"data-parallel PPO on {cores} CPU cores, demo models, batch {args.batch_size}: "
          f"1 process {one:.1f} episodes/s, 2 processes {two:.1f} episodes/s (x{two / one:.2f})")
    record = {"cores": cores, "threads": args.threads, "load_average": os.getloadavg(), "batch_size": args.batch_size,
              "iterations": args.iterations, "episodes_per_second": {"1": results[1], "2": results[2]},
              "median_episodes_per_second": {"1": one, "2": two}}
    out = PROJECT_ROOT / "benchmarks" / "results" / "data_parallel.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
