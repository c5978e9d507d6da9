"""The rollout's KV cache, dynamic (grown token by token) against static (transformers' StaticCache, allocated once):
seconds per rollout of the same prompts, alternating, median of `--repeats`. Run by hand on a quiet machine:

    .venv/bin/python -m benchmarks.kv_cache

Workloads: the demo (its instruct model, 64 prompts, 24 new tokens) and a randomly initialised GPT-2 of 6 layers of
width 512 (as benchmarks/ppo_vs_trl.py's GPT-2 workload; 64 prompts of 64 tokens, 64 new tokens). Both caches sample
the same tokens (checked here, and by tests/model/test_model_families.py for every family).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kv_cache.json"


def workloads():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from components.config import load_config
    from components.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(ROOT / "artifacts" / "demo" / "instruct")), load_tokenizer(str(ROOT / "artifacts" / "demo" / "instruct"))
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "data" / "demo" / "prompts.jsonl").read_text().splitlines()[:64]]
    yield "demo", model, tokenizer, prompts, load_config(None).generation
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=512, n_layer=6, n_head=8,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    long_prompts = [" ".join([p] * 8) for p in prompts]
    yield "gpt2-6x512", gpt2, tokenizer, long_prompts, load_config(None, ["generation.max_new_tokens=64", "generation.max_prompt_tokens=64"]).generation


def main(argv: list[str] | None = None) -> None:
    import torch

    from components.rl import sampler, tokenization

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name, model, tokenizer, prompts, generation in workloads():
        eos, pad = tokenization.eos_token_ids(tokenizer, model), tokenization.pad_id(tokenizer)
        seconds: dict[str, list[float]] = {"dynamic": [], "static": []}
        outputs = {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for kind in seconds:
                settings = generation.model_copy(update={"kv_cache": kind})
                queries, mask = tokenization.tokenize_prompts(tokenizer, prompts, settings)
                start = time.perf_counter()
                outputs[kind] = sampler.sample(model, queries, mask, settings, eos, pad, torch.Generator().manual_seed(repeat))
                if repeat:
                    seconds[kind].append(time.perf_counter() - start)
        same = torch.equal(outputs["dynamic"].responses, outputs["static"].responses)
        row = {"workload": name, "rows": len(prompts), "new_tokens": generation.max_new_tokens, "same_tokens": same,
               **{f"{kind}_s": statistics.median(values) for kind, values in seconds.items()}}
        row["static_speedup"] = row["dynamic_s"] / row["static_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
