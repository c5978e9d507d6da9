"""The memory model (`alignflow plan`, components/models/memory_plan.py) against measured peak memory. Run by hand:

    .venv/bin/python -m benchmarks.memory_model                       # every row (~30 min here), JSON + README table
    .venv/bin/python -m benchmarks.memory_model --sizes 10M 50M --families gpt2

Each row is one fresh worker process: randomly initialised GPT-2- or Llama-shaped models of about 10M, 50M, 100M and
200M parameters (policy, and a reward model of the same shape), saved to disk and loaded through alignflow's own
loaders in the row's precisions, then two PPO iterations (shared critic) on 32-token prompts with 32-token responses.
Before loading anything the worker asks the memory plan for its prediction, so prediction and measurement come from
the same configuration. Measured, per worker (VmRSS / VmHWM in /proc/self/status; glibc's allocator is told to
return freed blocks at once, MALLOC_MMAP_THRESHOLD_=65536, so resident memory follows what is live):
  * peak: the worker's own high-water mark over the whole run (the plan's peak);
  * frozen: the resident growth from loading the reward model plus building the reference (the frozen models);
  * update: the second update's high-water mark above the resident size before it (gradients, activations, logits);
  * saved: what a micro-batch's forward leaves resident for its backward (the activations autograd keeps and the
    response logits), the largest over the second update's micro-batches: the activation memory checkpointing cuts.
The targets (issue 18): the plan within 15% of the peak on every row; frozen models in bf16 at most 55% of their
fp32 memory; activation checkpointing at least halves the update's activation memory ("saved") at 200M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "memory_model.json"
SNIPPET = ROOT / "benchmarks" / "results" / "README-snippet-memory-model.md"

# name -> (family, config keyword arguments); about 10M, 50M, 100M and 200M parameters.
SHAPES = {
    "gpt2-10M": ("gpt2", dict(n_embd=160, n_layer=6, n_head=4)),
    "gpt2-50M": ("gpt2", dict(n_embd=512, n_layer=8, n_head=8)),
    "gpt2-100M": ("gpt2", dict(n_embd=768, n_layer=10, n_head=12)),
    "gpt2-200M": ("gpt2", dict(n_embd=1024, n_layer=12, n_head=16)),
    "llama-10M": ("llama", dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)),
    "llama-50M": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)),
    "llama-100M": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4)),
    "llama-200M": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8)),
}
VOCAB = {"gpt2": 50257, "llama": 32000}
# name -> run-configuration overrides
VARIANTS = {
    "fp32": [],
    "frozen-bf16": ["memory.frozen_dtype=bfloat16"],
    "bf16-mixed": ["memory.frozen_dtype=bfloat16", "memory.trained_precision=bf16_mixed"],
    "bf16": ["memory.frozen_dtype=bfloat16", "memory.trained_precision=bfloat16"],
    "fp32-ckpt": ["memory.activation_checkpointing=true"],
    "bf16-mixed-ckpt": ["memory.frozen_dtype=bfloat16", "memory.trained_precision=bf16_mixed", "memory.activation_checkpointing=true"],
    "lora": ["policy.lora.enabled=true", "policy.lora.r=16", "policy.lora.alpha=32"],
    "lora-bf16": ["policy.lora.enabled=true", "policy.lora.r=16", "policy.lora.alpha=32", "memory.frozen_dtype=bfloat16"],
}
PROMPT_TOKENS, RESPONSE_TOKENS = 32, 32


def tokenizer_for(vocab: int):
    """A word-level tokenizer of `vocab` entries (w0, w1, ...): the vocabulary size of the real family, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    entries = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)])}
    core = Tokenizer(models.WordLevel(vocab=entries, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def save_shape(name: str, directory: Path) -> tuple[Path, Path]:
    """The policy (causal LM) and reward model (one-output classifier) of shape `name`, randomly initialised."""
    import torch
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, LlamaForSequenceClassification)

    family, kwargs = SHAPES[name]
    tokenizer = tokenizer_for(VOCAB[family])
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        config, lm, classifier = GPT2Config(vocab_size=VOCAB[family], n_positions=128, **kwargs, **ids), GPT2LMHeadModel, GPT2ForSequenceClassification
    else:
        config, lm, classifier = LlamaConfig(vocab_size=VOCAB[family], max_position_embeddings=128, **kwargs, **ids), LlamaForCausalLM, LlamaForSequenceClassification
    paths = []
    for role, cls in (("policy", lm), ("reward", classifier)):
        path = directory / name / role
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            if role == "reward":
                config.num_labels = 1
            cls(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def row_config(shape: str, variant: str, models: Path):
    """The run configuration of a row: the demo's, on the row's models, batch and precisions."""
    from components.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", [
        f"policy.model={models / shape / 'policy'}", f"reward.model={models / shape / 'reward'}", "critic.type=shared",
        "reward.max_length=64", "rl.rollout_batch_size=16", "rl.mini_batch_size=16", "rl.update_epochs=1",
        f"generation.max_prompt_tokens={PROMPT_TOKENS}", f"generation.max_new_tokens={RESPONSE_TOKENS}",
        *VARIANTS[variant]])


def predictions(plan) -> dict:
    """The plan's figures a row compares with its measurements."""
    from components.models.memory_plan import GIB

    by_role = {line.role: line.bytes for line in plan.lines}
    return {
        "predicted_peak_gib": plan.peak_bytes / GIB,
        "predicted_frozen_gib": (by_role["reference"] + by_role["reward model"]) / GIB,
        "predicted_update_gib": max(plan.total("backward"), plan.total("step")) / GIB,
        "predicted_activations_gib": plan.total("backward") / GIB,
        "plan": plan.as_dict(),
    }


def replan(path: Path, models: Path) -> dict:
    """The rows of an earlier run with the plan's predictions recomputed by today's memory model (the measurements
    stand; the models are read from `models` again, config files only)."""
    from components.models.memory_plan import plan_run

    result = json.loads(path.read_text())
    for row in result["rows"]:
        if "failed" not in row:
            row.update(predictions(plan_run(row_config(row["shape"], row["variant"], models))))
            row["error"] = row["predicted_peak_gib"] / row["measured_peak_gib"] - 1
    result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result["rows"])]
    return result


def touch(model) -> None:
    """Read every weight once: transformers maps a safetensors file's float32 weights without copying them, and
    their pages become resident (and count) only once read, as the run's first forward reads them."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()


def worker(shape: str, variant: str, models: Path) -> dict:
    """One row, in this (fresh) process."""
    import torch

    torch.set_num_threads(2)
    import flows.pipeline  # noqa: F401  what a pipeline process has imported before it loads a model
    from components.models.memory_plan import GIB, plan_run
    from components.models.loading import load_policy, load_tokenizer
    from components.rl.reward import RewardScorer
    from components.rl import build_trainer

    runtime = _status("VmRSS")
    policy_dir = models / shape / "policy"
    config = row_config(shape, variant, models)
    plan = plan_run(config)
    _reset_peak()
    before = _status("VmRSS")
    scorer = RewardScorer.from_config(config.reward, dtype=config.memory.frozen_torch_dtype)
    touch(scorer.model)  # weights loaded without a copy are mapped from the file, and resident once read
    frozen = _status("VmRSS") - before
    policy = load_policy(str(policy_dir), dtype=config.policy_dtype)
    touch(policy)
    tokenizer = load_tokenizer(str(policy_dir))
    before = _status("VmRSS")
    trainer = build_trainer(policy, tokenizer, scorer, **config.trainer_sections())
    frozen += _status("VmRSS") - before  # the reference (a LoRA run has none), and a value head
    words = [f"w{i}" for i in range(4, 4 + 5000)]
    generator = torch.Generator().manual_seed(0)
    prompts = [" ".join(words[j] for j in torch.randint(0, len(words), (PROMPT_TOKENS,), generator=generator).tolist())
               for _ in range(16)]
    updates = []
    learn = trainer.learner.learn

    def measured_learn(*args, **kwargs):
        start_rss = _status("VmRSS")
        _reset_peak()
        stats = learn(*args, **kwargs)
        updates.append(_status("VmHWM") - start_rss)
        return stats

    trainer.learner.learn = measured_learn
    saved = []  # per micro-batch: what its forward left resident for its backward (activations, saved logits)
    loss = trainer.learner.loss

    def measured_loss(*args, **kwargs):
        start_rss = _status("VmRSS")
        result = loss(*args, **kwargs)
        saved.append(_status("VmRSS") - start_rss)
        return result

    trainer.learner.loss = measured_loss
    peak = _status("VmHWM")
    start = time.perf_counter()
    for _ in range(2):
        saved.clear()  # the second iteration's
        trainer.run_iteration(prompts)
        peak = max(peak, _status("VmHWM"))
    gradients = sum(p.numel() * p.element_size() for p in trainer._trainable_parameters())
    return {
        "shape": shape, "variant": variant, "overrides": VARIANTS[variant],
        "parameters": sum(p.numel() for p in trainer.policy.parameters()),
        "measured_peak_gib": peak / GIB, "error": plan.peak_bytes / peak - 1,
        "measured_runtime_gib": runtime / GIB,
        "measured_frozen_gib": frozen / GIB,
        "measured_update_gib": updates[-1] / GIB,
        "measured_activations_gib": (updates[-1] - gradients) / GIB,
        "measured_saved_gib": max(saved) / GIB,
        "measured_gradients_gib": gradients / GIB,
        "seconds": time.perf_counter() - start,
        **predictions(plan),
    }


def run_row(shape: str, variant: str, models: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "PYTHONPATH": str(ROOT),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_model", "--worker", shape, variant, str(models)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"shape": shape, "variant": variant, "failed": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | params | variant | measured peak GiB | plan GiB | plan error | frozen GiB (plan) | update GiB (plan) | saved for the backward GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['shape']} | | {r['variant']} | failed | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {r['variant']} | {r['measured_peak_gib']:.2f} | "
                     f"{r['predicted_peak_gib']:.2f} | {r['error']:+.0%} | {r['measured_frozen_gib']:.2f} ({r['predicted_frozen_gib']:.2f}) | "
                     f"{r['measured_update_gib']:.2f} ({r['predicted_update_gib']:.2f}) | "
                     + (f"{r['measured_saved_gib']:.2f} |" if "measured_saved_gib" in r else "- |"))
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[tuple[str, str, bool]]:
    good = [r for r in rows if "failed" not in r]
    worst = max(good, key=lambda r: abs(r["error"]))
    out = [("the plan within 15% of the measured peak on every row",
            f"worst {worst['error']:+.1%} ({worst['shape']} {worst['variant']}); {sum(abs(r['error']) <= 0.15 for r in good)}/{len(good)} rows within",
            all(abs(r["error"]) <= 0.15 for r in good))]
    ratios = []
    for r in good:
        if r["variant"] == "frozen-bf16":
            base = next((b for b in good if b["shape"] == r["shape"] and b["variant"] == "fp32"), None)
            if base:
                ratios.append((r["shape"], r["measured_frozen_gib"] / base["measured_frozen_gib"]))
    if ratios:
        out.append(("frozen models in bf16 take at most 55% of their fp32 memory",
                    ", ".join(f"{s} {x:.0%}" for s, x in ratios), all(x <= 0.55 for _, x in ratios)))
    cuts = []
    for r in good:
        if r["variant"] == "fp32-ckpt" and r["shape"].endswith("200M") and "measured_saved_gib" in r:
            base = next((b for b in good if b["shape"] == r["shape"] and b["variant"] == "fp32" and "measured_saved_gib" in b), None)
            if base:
                cuts.append((r["shape"], r["measured_saved_gib"] / base["measured_saved_gib"]))
    if cuts:
        out.append(("activation checkpointing at least halves the update's activation memory at 200M",
                    ", ".join(f"{s}: {x:.0%} of it without checkpointing" for s, x in cuts), all(x <= 0.5 for _, x in cuts)))
    return out


# Extrapolation (predictions only): Llama shapes of 1B (Llama 3.2 1B), 7B (Llama 2 7B) and 70B (Llama 2 70B), a reward
# model of the same shape (or of 7B where the setup says so), PPO with the shared value head, 64 prompts of 512 tokens
# and 512-token responses per iteration, micro-batches of 4 per device, generation micro-batches of 16 with the
# memory options on one GPU (on 8, each process samples its 8 rows at once).
LARGE = {
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
SETUPS = {
    "full, fp32": [],
    "full, bf16 mixed + bf16 frozen + checkpointing": ["memory.trained_precision=bf16_mixed", "memory.frozen_dtype=bfloat16",
                                                       "memory.activation_checkpointing=true", "generation.generation_batch_size=16"],
    "full, pure bf16 + checkpointing": ["memory.trained_precision=bfloat16", "memory.frozen_dtype=bfloat16",
                                        "memory.activation_checkpointing=true", "generation.generation_batch_size=16"],
    "LoRA r16, bf16 base + checkpointing": ["policy.lora.enabled=true", "policy.lora.r=16", "memory.frozen_dtype=bfloat16",
                                            "memory.activation_checkpointing=true", "generation.generation_batch_size=16"],
    "LoRA r16, bf16 base + checkpointing, a 7B reward model": [
        "policy.lora.enabled=true", "policy.lora.r=16", "memory.frozen_dtype=bfloat16", "memory.activation_checkpointing=true",
        "generation.generation_batch_size=16"],
}


def extrapolate(device_gib: float = 80.0) -> list[dict]:
    """The memory plan for 1B, 7B and 70B on 1 GPU and on 8 (FSDP, and FSDP with parameter offload)."""
    from transformers import LlamaConfig

    from components.config import RunConfig, apply_overrides
    from components.models.memory_plan import GIB, plan_for_shapes, shape_of_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, offload in (("fsdp", "false"), ("fsdp-offload", "true")):
            files[name] = Path(tmp) / f"{name}.yaml"
            files[name].write_text(f"distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: {offload}\n")
        for size, kwargs in LARGE.items():
            for setup, overrides in SETUPS.items():
                if "7B reward" in setup and size != "70B":
                    continue
                for devices, accelerate in ((1, None), (8, "fsdp"), (8, "fsdp-offload")):
                    base = ["critic.type=shared", "rl.rollout_batch_size=64", f"rl.mini_batch_size={4 * devices}",
                            f"rl.gradient_accumulation_steps={devices}", "generation.max_prompt_tokens=512",
                            "generation.max_new_tokens=512", f"launch.num_processes={devices}"]
                    if accelerate:
                        base.append(f"launch.accelerate_config={files[accelerate]}")
                    if devices > 1:  # generation micro-batches are for one process: each of 8 samples its 8 rows
                        overrides = [o for o in overrides if not o.startswith("generation.generation_batch_size")]
                    config = apply_overrides(RunConfig(), base + overrides)
                    policy = shape_of_config(LlamaConfig(**kwargs), "lm", config.policy.lora)
                    reward = shape_of_config(LlamaConfig(**(LARGE["7B"] if "7B reward" in setup else kwargs)), "classifier")
                    plan = plan_for_shapes(config, policy, reward, device="cuda", device_bytes=int(device_gib * GIB))
                    rows.append({"model": size, "parameters": policy.params, "setup": setup, "devices": devices,
                                 "sharding": accelerate or "none", "per_device_gib": plan.peak_bytes / GIB,
                                 "fits": bool(plan.fits),
                                 "largest": [(line.role, round(line.bytes / GIB, 1)) for line in
                                             sorted(plan.lines, key=lambda line: -line.bytes)[:3]]})
    return rows


def extrapolation_table(rows: list[dict], device_gib: float = 80.0) -> str:
    lines = ["| model | setup | 1 GPU | 8 GPUs, FSDP | 8 GPUs, FSDP + offload | largest (1 GPU) |", "|---|---|---|---|---|---|"]
    for model in LARGE:
        for setup in SETUPS:
            cells = {r["sharding"]: r for r in rows if r["model"] == model and r["setup"] == setup}
            if not cells:
                continue
            show = lambda r: f"{r['per_device_gib']:.0f} GiB {'fits' if r['fits'] else '**no**'}"  # noqa: E731
            largest = ", ".join(f"{role} {gib:.0f}" for role, gib in cells["none"]["largest"])
            lines.append(f"| {model} ({cells['none']['parameters'] / 1e9:.2f}B) | {setup} | {show(cells['none'])} | "
                         f"{show(cells['fsdp'])} | {show(cells['fsdp-offload'])} | {largest} |")
    return "\n".join(lines) + f"\n\n(per device; 'fits' is against {device_gib:.0f} GB of GPU memory; predictions of the memory plan, not measurements)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "VARIANT", "MODELS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["10M", "50M", "100M", "200M"])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "alignflow-memory-models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replan", type=Path, nargs="+", help="recompute the predictions of earlier results (merged) and rewrite --out")
    parser.add_argument("--extrapolate", action="store_true", help="only the plan's predictions for 1B, 7B and 70B on 80 GB GPUs")
    args = parser.parse_args(argv)
    if args.extrapolate:
        rows = extrapolate()
        (ROOT / "benchmarks" / "results" / "memory_extrapolation.json").write_text(json.dumps(rows, indent=1))
        table_text = extrapolation_table(rows)
        (ROOT / "benchmarks" / "results" / "README-snippet-memory-extrapolation.md").write_text(table_text + "\n")
        print(table_text)
        return
    if args.worker:
        shape, variant, models = args.worker
        print(json.dumps(worker(shape, variant, Path(models))))
        return
    if args.replan:
        parts = [replan(path, args.models) for path in args.replan]
        merged: dict[tuple[str, str], dict] = {}  # a later file's row replaces an earlier one of the same shape and variant
        for part in parts:
            merged.update({(row["shape"], row["variant"]): row for row in part["rows"]})
        result = {**parts[0], "rows": list(merged.values()),
                  "command": " + ".join(part["command"] for part in parts),
                  "minutes": sum(part["minutes"] for part in parts), "replanned": time.strftime("%Y-%m-%d")}
        result["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(result["rows"])]
        write(result, args.out)
        return
    started, rows = time.time(), []
    shapes = [f"{family}-{size}" for family in args.families for size in args.sizes]
    for shape in shapes:
        save_shape(shape, args.models)
        for variant in args.variants:
            row = run_row(shape, variant, args.models)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    result = {"command": "python -m benchmarks.memory_model " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - started) / 60,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows,
              "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(rows)]}
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    """The JSON, and the README's table beside it (README-snippet-memory-model.md for the default --out)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    snippet = table(result["rows"]) + "\n\n| target | measured | met |\n|---|---|---|\n" + "\n".join(
        f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in result["targets"])
    (SNIPPET if out == RESULTS else out.with_suffix(".md")).write_text(snippet + "\n")
    print(snippet)


if __name__ == "__main__":
    main()
