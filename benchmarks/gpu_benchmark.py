"""Throughput and memory on a GPU, one JSON line per figure (benchmarks/gpu_check.sh runs it):

    python -m benchmarks.gpu_benchmark --device cuda                  # the demo, and a ~0.5B model in bf16
    python -m benchmarks.gpu_benchmark --device cpu --workloads small --iterations 1   # the same code, on the CPU

Workloads: `demo` (the demo kit's instruct model and reward model, artifacts/demo, PPO as configs/demo.yaml), `0.5B`
(a randomly initialised Llama of Qwen2.5-0.5B's shape, 494M parameters with its 151,936-token vocabulary, policy and a
reward model of the same shape, bf16 frozen models and bf16 autocast), and `small` (the same at ~10M, for a CPU check).
Figures per workload: episodes per second over the timed iterations (after one warm-up iteration), the peak memory
(torch.cuda.max_memory_allocated, or VmHWM on the CPU), the memory plan's prediction of it, and the seconds of one
rollout with each KV cache (generation.kv_cache: dynamic, static).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama-shaped: hidden, intermediate, layers, heads, kv heads, vocabulary
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=32000),
}


def emit(workload: str, figure: str, value, **extra) -> None:
    print(json.dumps({"workload": workload, "figure": figure, "value": value, **extra}), flush=True)


def random_models(name: str, directory: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from benchmarks.memory_model import tokenizer_for

    shape = SHAPES[name]
    tokenizer = tokenizer_for(shape["vocab_size"])
    config = LlamaConfig(max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    paths = []
    for role, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        torch.manual_seed(0)
        config.num_labels = 1
        path = directory / name / role
        cls(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run(workload: str, device: str, iterations: int, directory: Path) -> None:
    import torch

    from components.config import load_config
    from components.models.memory_plan import GIB, plan_run
    from components.models.loading import load_policy, load_tokenizer
    from components.rl.reward import RewardScorer
    from components.rl import build_trainer

    if workload == "demo":
        overrides = ["memory.frozen_dtype=bfloat16", "memory.trained_precision=bf16_mixed"] if device == "cuda" else []
        config = load_config(ROOT / "configs" / "demo.yaml", overrides)
        prompts = [json.loads(line)["prompt"] for line in (ROOT / "data" / "demo" / "prompts.jsonl").read_text().splitlines()[:512]]
    else:
        policy_dir, reward_dir = random_models(workload, directory)
        config = load_config(ROOT / "configs" / "demo.yaml", [
            f"policy.model={policy_dir}", f"reward.model={reward_dir}", "critic.type=shared", "reward.max_length=128",
            "rl.rollout_batch_size=32", "rl.mini_batch_size=8", "rl.update_epochs=1", "generation.max_prompt_tokens=64",
            "generation.max_new_tokens=64", "memory.frozen_dtype=bfloat16", "memory.trained_precision=bf16_mixed",
            "memory.activation_checkpointing=true"])
        words = [f"w{i}" for i in range(4, 2000)]
        prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(48)) for i in range(256)]
    plan = plan_run(config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    scorer = RewardScorer.from_config(config.reward, dtype=config.memory.frozen_torch_dtype)
    scorer.model.to(device)
    policy = load_policy(config.policy.model, dtype=config.policy_dtype).to(device)
    trainer = build_trainer(policy, load_tokenizer(config.policy.model), scorer, **config.trainer_sections())
    trainer.train(prompts, iterations=1)  # warm-up: kernels, allocator, AdamW's state
    start = time.perf_counter()
    episodes = trainer.episodes
    trainer.train(prompts, iterations=iterations)
    seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        predicted = plan.peak_bytes - next(line.bytes for line in plan.lines if line.role == "runtime")
        method = "torch.cuda.max_memory_allocated (the plan without its runtime line)"
    else:
        from benchmarks.measure import peak_rss_mb

        peak, predicted, method = peak_rss_mb() * 2**20, plan.peak_bytes, "VmHWM"
    settings = {"precision": config.memory.trained_precision, "frozen": config.memory.frozen_dtype,
                "checkpointing": config.memory.activation_checkpointing, "device": device}
    emit(workload, "episodes_per_second", (trainer.episodes - episodes) / seconds, iterations=iterations, **settings)
    emit(workload, "peak_memory_gib", peak / GIB, method=method, **settings)
    emit(workload, "plan_peak_gib", predicted / GIB, error=predicted / peak - 1, **settings)
    emit(workload, "rollout_seconds_by_kv_cache", rollout_seconds(trainer, prompts[: config.rl.rollout_batch_size], device),
         **settings)


def rollout_seconds(trainer, prompts: list[str], device: str) -> dict[str, float]:
    """Seconds of one rollout of `prompts` with each KV cache (generation.kv_cache), best of 3, alternating."""
    import torch

    from components.rl import sampler, tokenization

    tokenizer, policy, generation = trainer.tokenizer, trainer.policy, trainer.generation
    eos, pad = tokenization.eos_token_ids(tokenizer, policy).to(device), tokenization.pad_id(tokenizer)
    best = {"dynamic": float("inf"), "static": float("inf")}
    for _ in range(3):
        for kind in best:
            settings = generation.model_copy(update={"kv_cache": kind})
            queries, mask = tokenization.tokenize_prompts(tokenizer, prompts, settings)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sampler.sample(policy, queries.to(device), mask.to(device), settings, eos, pad, torch.Generator(device).manual_seed(0))
            if device == "cuda":
                torch.cuda.synchronize()
            best[kind] = min(best[kind], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--workloads", nargs="+", default=["demo", "0.5B"], choices=["demo", "0.5B", "small"])
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alignflow-gpu-") as tmp:
        for workload in args.workloads:
            run(workload, args.device, args.iterations, Path(tmp))


if __name__ == "__main__":
    main()
