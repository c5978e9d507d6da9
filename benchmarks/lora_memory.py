"""Peak memory of a LoRA PPO run against the full fine-tune of the same model. Run by hand:

    .venv/bin/python -m benchmarks.lora_memory            # both variants, prints and writes JSON
    .venv/bin/python -m benchmarks.lora_memory --iterations 5

Each variant runs in a fresh subprocess and reports its own peak RSS (VmHWM, reset at its start:
benchmarks/measure.py; ru_maxrss would include this parent's size at fork): a randomly initialised GPT-2 (~25M parameters), a few PPO iterations with
a word-share reward (no reward model, so only the policy side is measured). The full fine-tune holds
the policy, a frozen reference copy, gradients and AdamW's two moments for every weight; LoRA holds
the weights once (its reference is the same model with the adapter off) and trains only the adapter.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import peak_rss_mb, reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lora_memory.json"
PROMPTS = ["the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but", "the music", "this movie"]


def run_variant(variant: str, iterations: int, seed: int) -> dict:
    """One PPO run in this process; returns its measurements."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from components.config import RunConfig
    from components.rl import build_trainer
    from support import word_share, word_tokenizer

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=512, n_layer=8, n_head=8,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy = GPT2LMHeadModel(config).eval()
    loaded_mb = peak_rss_mb()
    cfg = RunConfig.model_validate({
        "seed": seed,
        "policy": {"lora": {"enabled": variant == "lora", "r": 16, "alpha": 32}},
        "rl": {"rollout_batch_size": 16, "mini_batch_size": 8, "update_epochs": 2, "learning_rate": 1e-4},
        "generation": {"max_new_tokens": 16, "max_prompt_tokens": 8},
    })
    trainer = build_trainer(policy, tokenizer, word_share("good"), **cfg.trainer_sections())
    start = time.perf_counter()
    history = trainer.train(PROMPTS, iterations=iterations).history
    return {
        "variant": variant,
        "parameters": sum(p.numel() for p in trainer.policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad),
        "iterations": len(history),
        "rss_after_model_mb": round(loaded_mb, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds": round(time.perf_counter() - start, 1),
        "final_kl": history[-1]["objective/kl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        reset_peak_rss()
        print(json.dumps(run_variant(args.variant, args.iterations, args.seed)))
        return

    rows = []
    for variant in ("full", "lora"):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.lora_memory", "--variant", variant, "--iterations", str(args.iterations),
             "--seed", str(args.seed)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    full, lora = rows
    report = {
        "benchmark": "lora_memory",
        "model": "GPT-2, n_embd 512, 8 layers, randomly initialised, float32, CPU",
        "python": platform.python_version(),
        "variants": rows,
        "lora_over_full_peak": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "lora_peak_below_full": lora["peak_rss_mb"] < full["peak_rss_mb"],
    }
    for row in rows:
        print(f"{row['variant']:>4}: peak RSS {row['peak_rss_mb']:8.1f} MB (after model {row['rss_after_model_mb']:7.1f} MB), "
              f"{row['trainable_parameters']:>10,} of {row['parameters']:,} parameters trained, {row['seconds']} s")
    print(f"LoRA peak / full peak = {report['lora_over_full_peak']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
