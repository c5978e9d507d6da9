"""How well PPO learns the demo task with each critic (and engine setting), over many seeds.

    python -m benchmarks.critic_study separate frozen-mlp trl --seeds 12
    python -m benchmarks.critic_study separate --seeds 12 --set reward.append_eos=false --set rl.max_grad_norm=1.0

Each (variant, seed) trains in a fresh process, two at a time with one thread each: the demo config's PPO
(`--set` overrides it) for 20 iterations of 64 episodes on the benchmark's training prompts, then 4 sampled
completions for each of the 128 held-out prompts, scored by the reward model (reading the text as written, as
it was trained) and the gold scorer. Printed: mean ± standard error over seeds; every run is appended to
benchmarks/results/critic_study.jsonl.

Variants (alignflow's critic):
  separate       the demo config's critic: a copy of the reward model, trained whole (as TRL's)
  shared         a linear value head on the policy's last hidden state (`critic.type: shared`)
  frozen-linear  the reward model's backbone frozen, its scoring head trained (at 10x the learning rate)
  frozen-mlp     the same with a residual MLP head: V = score head(h) + MLP(h), the MLP's output starting at 0
  frozen-mlp2    the same with two hidden layers
  trl            TRL 1.12.0's PPOTrainer with the same settings (benchmarks/trl_worker.py, its own venv)
The frozen critics cost one reward-model forward per rollout and no critic backward: what a critic would
need to cost for 2x TRL's speed on the larger GPT-2 (README, Performance).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "critic_study.jsonl"
VARIANTS = ("separate", "shared", "frozen-linear", "frozen-mlp", "frozen-mlp2", "trl")
ITERATIONS, EVAL_SAMPLES, EVAL_SEED = 20, 4, 1234


class ResidualMLPHead(nn.Module):
    """V = linear(h) + MLP(h): the reward model's scoring head plus an MLP (`depth` hidden layers of width 4d)
    whose output starts at 0, so V starts as the reward model's score of the text so far."""

    def __init__(self, linear: nn.Linear, depth: int):
        super().__init__()
        width = 4 * linear.in_features
        layers: list[nn.Module] = [nn.Linear(linear.in_features, width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, 1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.linear, self.mlp = linear, nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden) + self.mlp(hidden).squeeze(-1)


def frozen_critic(trainer, depth: int, head_lr_factor: float = 10.0) -> None:
    """Freeze the separate critic's backbone; train a value head on its hidden states (depth 0: the reward model's
    linear scoring head, else `ResidualMLPHead`) at `head_lr_factor` times the policy's learning rate."""
    critic = trainer.critic
    critic.backbone.requires_grad_(False)
    if depth:
        critic.value_head = ResidualMLPHead(critic.value_head, depth)
    policy = [p for p in trainer.policy.parameters() if p.requires_grad]
    lr = trainer.rl.learning_rate
    trainer.optimizer = torch.optim.AdamW(
        [{"params": policy, "lr": lr}, {"params": list(critic.value_head.parameters()), "lr": lr * head_lr_factor}],
        weight_decay=0.0, fused=True,
    )
    trainer.learner.optimizer = trainer.optimizer
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: 1.0)


def run_one(variant: str, seed: int, overrides: list[str]) -> dict:
    """Train one seed of one variant in this process and evaluate it (the worker side)."""
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from benchmarks.workloads import DEMO_DIR, split_prompts
    from components.config import DEMO_CONFIG, load_config
    from components.demo.gold import is_gold_positive
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.rl import build_trainer, generate
    from components.rl.reward import RewardScorer

    train_prompts, eval_prompts = split_prompts()
    value_head = "shared" if variant in ("shared", "trl") else "separate"
    cfg = load_config(DEMO_CONFIG, [f"seed={seed}", f"rl.total_episodes={64 * ITERATIONS}", f"critic.type={value_head}",
                                    f"policy.model={DEMO_DIR / 'instruct'}", f"reward.model={DEMO_DIR / 'reward'}", *overrides])
    tokenizer = load_tokenizer(cfg.policy.model)
    scorer = RewardScorer.from_config(cfg.reward)
    start = time.perf_counter()
    if variant == "trl":
        policy_dir, train_seconds = train_trl(seed, train_prompts)
        policy = load_causal_lm(policy_dir)
    else:
        torch.manual_seed(seed)
        trainer = build_trainer(load_causal_lm(cfg.policy.model), tokenizer, scorer, **cfg.trainer_sections())
        if variant.startswith("frozen"):
            frozen_critic(trainer, depth={"frozen-linear": 0, "frozen-mlp": 1, "frozen-mlp2": 2}[variant])
        history = trainer.train(train_prompts, iterations=ITERATIONS).history
        policy, train_seconds = trainer.policy, time.perf_counter() - start
    scores, gold, lengths = [], [], []
    for sample_seed in range(EVAL_SEED, EVAL_SEED + EVAL_SAMPLES):
        samples = generate(policy, tokenizer, eval_prompts, cfg.generation, seed=sample_seed)
        scores += scorer(eval_prompts, samples.completions).tolist()
        gold += [is_gold_positive(p + c) for p, c in zip(eval_prompts, samples.completions)]
        lengths += samples.lengths
    row = {"variant": variant, "overrides": overrides, "seed": seed, "score": statistics.mean(scores),
           "gold_positive_share": statistics.mean(gold), "length_mean": statistics.mean(lengths), "train_seconds": train_seconds}
    if variant == "trl":
        shutil.rmtree(policy_dir)
    else:
        row["explained_variance_last5"] = statistics.mean(h["val/explained_variance"] for h in history[-5:])
    return row


def train_trl(seed: int, prompts: list[str]) -> tuple[str, float]:
    """TRL 1.12.0 on the same settings through the harness's own worker and venv; returns (policy dir, seconds)."""
    from benchmarks.ppo_vs_trl import WORKER_ENV, job_spec, trl_python
    from benchmarks.workloads import CACHE, demo_workload

    workload = demo_workload(iterations=ITERATIONS, warmup=1)
    CACHE.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix="trl-policy-", dir=CACHE)
    spec = {**job_spec(workload, prompts, seed=seed, iterations=ITERATIONS, save_policy=out), "threads": 1}
    Path(out, "spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    subprocess.run([str(trl_python()), str(HERE / "trl_worker.py"), f"{out}/spec.json", f"{out}/result.json"],
                   env={**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    return out, time.perf_counter() - start


def summary(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], " ".join(row["overrides"])), []).append(row)
    lines = []
    for (variant, overrides), group in groups.items():
        def stat(key: str) -> str:
            values = [r[key] for r in group]
            se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {se:.3f}"
        ev = f" EV {statistics.mean(r['explained_variance_last5'] for r in group):.2f}" if "explained_variance_last5" in group[0] else ""
        lines.append(f"{variant:14s} {overrides:40s} seeds {len(group):2d}  gold {stat('gold_positive_share')}  "
                     f"score {stat('score')}  length {statistics.mean(r['length_mean'] for r in group):.1f}{ev}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.critic_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"any of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="demo config override for alignflow's runs, e.g. reward.append_eos=false")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args.overrides)))
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"variants must be some of {', '.join(VARIANTS)}; got {' '.join(args.variants) or 'none'}")

    from benchmarks.ppo_vs_trl import ensure_demo_models

    ensure_demo_models()
    jobs = [(v, s) for v in args.variants for s in range(args.first_seed, args.first_seed + args.seeds)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def launch(job: tuple[str, int]) -> dict:
        command = [sys.executable, "-m", "benchmarks.critic_study", "--worker", job[0], str(job[1])]
        command += [f"--set={o}" for o in args.overrides]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        with RESULTS.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"  {row['variant']} seed {row['seed']}: gold {row['gold_positive_share']:.3f} score {row['score']:+.3f}", flush=True)
        return row

    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(launch, jobs))
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
