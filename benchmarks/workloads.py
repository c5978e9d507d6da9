"""What the benchmark runs: workloads (models + PPO settings), the prompt split, the random models.

Every workload is run by both sides with the same settings; the demo PPO settings (configs/demo.yaml)
are the base, and the grid varies batch size and response length around it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from components.config import PROJECT_ROOT, load_config

CACHE = PROJECT_ROOT / "benchmarks" / ".cache"
DEMO_DIR = PROJECT_ROOT / "artifacts" / "demo"
PROMPTS = PROJECT_ROOT / "data" / "demo" / "prompts.jsonl"
EVAL_SIZE = 128  # held-out prompts for the learning comparison, split as tests/model does


@dataclass(frozen=True)
class Workload:
    name: str
    policy: str
    reward: str
    batch_size: int
    mini_batch_size: int
    ppo_epochs: int
    learning_rate: float
    kl_coef: float
    max_new_tokens: int
    max_prompt_tokens: int
    temperature: float = 1.0
    value_head: str = "shared"  # alignflow's critic ("separate": a critic from the reward model, as TRL's)
    max_grad_norm: float | None = None  # alignflow's gradient clipping (TRL's PPOTrainer clips none)
    reward_max_length: int = 128
    samples_per_prompt: int = 1  # k completions of each prompt (group methods); batch_size counts completions
    iterations: int = 5  # per run, warm-up included
    warmup: int = 1

    def settings(self) -> dict:
        return asdict(self)


def demo_workload(iterations: int, warmup: int, value_head: str | None = None) -> Workload:
    """The demo kit's models with the demo run's PPO settings (and its critic, unless `value_head` is given)."""
    cfg = load_config()
    return Workload(
        name="demo",
        policy=str(DEMO_DIR / "instruct"),
        reward=str(DEMO_DIR / "reward"),
        batch_size=cfg.rl.rollout_batch_size,
        mini_batch_size=cfg.rl.mini_batch_size,
        ppo_epochs=cfg.rl.update_epochs,
        learning_rate=cfg.rl.learning_rate,
        kl_coef=cfg.rl.kl_coef,
        max_new_tokens=cfg.generation.max_new_tokens,
        max_prompt_tokens=cfg.generation.max_prompt_tokens,
        temperature=cfg.generation.temperature,
        value_head=value_head or cfg.critic.type,
        max_grad_norm=cfg.rl.max_grad_norm,
        iterations=iterations,
        warmup=warmup,
    )


def throughput_workloads(quick: bool, value_head: str | None = None) -> list[Workload]:
    """The demo models at the demo settings and on a batch-size x response-length cross, then the
    larger random GPT-2 at the demo settings."""
    demo = demo_workload(iterations=4 if quick else 6, warmup=1, value_head=value_head)
    grid = [(128, 24)] if quick else [(32, 24), (128, 24), (64, 12), (64, 48)]
    workloads = [demo]
    for batch, length in grid:
        workloads.append(replace(demo, name=f"demo b{batch} r{length}", batch_size=batch, max_new_tokens=length))
    policy, reward = larger_models()
    larger = replace(demo, name="gpt2 6x512", policy=str(policy), reward=str(reward), iterations=3, warmup=1)
    if quick:  # one minibatch of 16 episodes: ~10x cheaper than the full run's batch of 64
        larger = replace(larger, name="gpt2 6x512 b16", batch_size=16, iterations=2)
    workloads.append(larger)
    return workloads


def group_workload(workload: Workload, k: int, mini_batch_size: int | None = None, epochs: int = 1) -> Workload:
    """`workload` for a group method: the same episodes (completions) per iteration, batch_size / k prompts x k.
    By default one optimizer step per generation batch (minibatch = batch, 1 epoch), TRL's default for its
    RLOO and GRPO trainers; every other setting (lr, KL coefficient, lengths, temperature) unchanged."""
    if workload.batch_size % k:
        raise ValueError(f"{workload.name}: batch {workload.batch_size} is not a multiple of k={k}")
    return replace(workload, samples_per_prompt=k, mini_batch_size=mini_batch_size or workload.batch_size, ppo_epochs=epochs)


def split_prompts() -> tuple[list[str], list[str]]:
    """(train, eval): the demo prompts split by the pipeline's own split (components.data.prompts.split_prompts) with seed 0,
    EVAL_SIZE held out."""
    from components.data import prompts as data

    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    return data.split_prompts(prompts, EVAL_SIZE, seed=0)


def larger_models(n_layer: int = 6, n_embd: int = 512, n_head: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A randomly initialised GPT-2 policy and a reward model of the same shape, with the demo tokenizer,
    saved once under benchmarks/.cache so both sides load the same weights."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = CACHE / f"gpt2-{n_layer}x{n_embd}-seed{seed}"
    policy_dir, reward_dir = root / "policy", root / "reward"
    if (policy_dir / "config.json").is_file() and (reward_dir / "config.json").is_file():
        return policy_dir, reward_dir
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR / "instruct")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(policy_dir)
    GPT2ForSequenceClassification(config).save_pretrained(reward_dir)
    for directory in (policy_dir, reward_dir):
        tokenizer.save_pretrained(directory)
    return policy_dir, reward_dir
