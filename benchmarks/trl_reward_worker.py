"""TRL 1.16.0's `RewardTrainer` on the demo preference pairs, in a fresh process.

Runs in its own virtual environment (benchmarks/.venv-trl116: torch==2.13.0 trl==1.16.0), never alignflow's:

    benchmarks/.venv-trl116/bin/python benchmarks/trl_reward_worker.py SPEC.json RESULT.json

SPEC is written by benchmarks/reward_vs_trl.py (`trl_spec` there): the base model, the JSONL files of training and
held-out pairs (prompt, chosen, rejected: the same pairs alignflow trains on), the seed, the thread count and the
training settings taken from alignflow's configs/reward.yaml, mapped onto RewardConfig as `trl_settings` says.

The pairs are handed over as TRL's explicit-prompt preference dataset (prompt, chosen, rejected text), so TRL
tokenizes them as it does for any user: its own EOS appended to each answer, prompt + answer through the tokenizer
with its special tokens (the demo tokenizer's <bos>), pairs over `max_length` left out. The held-out pairs go in as
`eval_dataset` (no evaluation is run: eval_strategy "no") only so that the token ids TRL would score them with are
written to RESULT; the harness scores the saved model on them.

Measured: the wall-clock time at the end of every optimizer step (a TrainerCallback's on_step_end; the harness turns
it into pairs/s after the same warm-up steps for both engines), the learning rate each step ran at, and the process's
own peak resident memory (measure.py: VmHWM, reset at the start).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from measure import peak_rss, reset_peak_rss, rss_mb, write_json  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_settings(spec: dict) -> dict:
    """RewardConfig's arguments for SPEC: alignflow's settings where RewardConfig has them; the rest TRL's defaults,
    except what would make the two do different work (gradient checkpointing, mixed precision) or write to disk."""
    training = spec["training"]
    return {
        "max_steps": spec["steps"],
        "per_device_train_batch_size": training["batch_size"],  # pairs per optimizer step (chosen + rejected: 2x texts)
        "gradient_accumulation_steps": 1,
        "learning_rate": training["learning_rate"],
        "lr_scheduler_type": "cosine_with_min_lr",  # alignflow's cosine decays to min_lr_ratio of the peak, not to 0
        "lr_scheduler_kwargs": {"min_lr_rate": training["min_lr_ratio"]},
        "warmup_steps": spec["warmup_steps"],  # an int: round(steps x warmup_ratio), as alignflow counts them
        "weight_decay": training["weight_decay"],  # alignflow's AdamW default is 0.01 (TrainingArguments': 0.0)
        "max_grad_norm": training["max_grad_norm"] or 0.0,
        "center_rewards_coefficient": training["center_rewards_coef"],
        "max_length": spec["max_length"],
        "disable_dropout": True,  # RewardConfig's default; the demo model has no dropout anyway (all p = 0)
        "gradient_checkpointing": False,  # TRL's configs default to True; alignflow does not recompute activations
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "seed": spec["seed"],
        "data_seed": spec["seed"],
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,  # no progress bar (alignflow's trainer draws none)
    }


def main(spec_path: str, result_path: str) -> None:
    reset_peak_rss()  # the peak from here on is this worker's own (measure.py)
    spec = json.load(open(spec_path))
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    # The new scoring head is drawn from torch's global generator: seeded as alignflow's load_base seeds it, so that
    # both engines start from the same head for the same seed (the harness compares the fingerprints).
    torch.manual_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["base"], num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    head = model.score.weight.detach()
    fingerprint = {"sum": float(head.sum()), "norm": float(head.norm())}

    fields = ("prompt", "chosen", "rejected")
    train = Dataset.from_list([{k: row[k] for k in fields} for row in read_jsonl(spec["train"])])
    held_out = Dataset.from_list([{k: row[k] for k in fields} for row in read_jsonl(spec["held_out"])])
    output_dir = tempfile.mkdtemp(prefix="trl-reward-")
    settings = trl_settings(spec)
    args = RewardConfig(output_dir=output_dir, **settings)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer)

    step_ends: list[float] = []
    step_lrs: list[float] = []

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            step_lrs.append(float(optimizer.param_groups[0]["lr"]))

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    trainer.add_callback(Timing())
    setup_seconds = time.perf_counter() - started
    rss_before = rss_mb()
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    peak = peak_rss()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    trainer.save_model(spec["save_dir"])  # the model (and tokenizer) the harness scores
    eval_ids = trainer.eval_dataset
    result = {
        "engine": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "trl_settings": settings,
        "optimizer": f"{type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, 'optimizer') else trainer.optimizer).__name__}"
                     f" (optim={args.optim})",
        "scheduler": args.lr_scheduler_type if isinstance(args.lr_scheduler_type, str) else args.lr_scheduler_type.value,
        "eos_token": tokenizer.eos_token,
        "pad_token_id": tokenizer.pad_token_id,
        "train_pairs": len(trainer.train_dataset),  # after TRL's max_length filter
        "head_fingerprint": fingerprint,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "step_ends": [t - train_start for t in step_ends],
        "step_lrs": step_lrs,
        "final_logs": logs[-1] if logs else None,
        "held_out_ids": {"chosen": [list(ids) for ids in eval_ids["chosen_ids"]],
                         "rejected": [list(ids) for ids in eval_ids["rejected_ids"]]},
        "rss_before_train_mb": rss_before,
        **peak,
    }
    shutil.rmtree(output_dir, ignore_errors=True)  # nothing is saved there (save_strategy "no")
    write_json(result_path, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
