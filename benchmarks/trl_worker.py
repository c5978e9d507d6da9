"""The peer side of the benchmark: TRL 1.12.0's PPOTrainer (`trl.experimental.ppo`) on one workload.

Runs in the harness's own virtual environment (benchmarks/.venv-trl), never alignflow's:

    benchmarks/.venv-trl/bin/python benchmarks/trl_worker.py SPEC.json RESULT.json

SPEC is written by benchmarks/ppo_vs_trl.py (see `job_spec` there) or benchmarks/time_to_quality.py, which adds
"save_budgets" and "save_dir": the policy is saved at those episode counts with the training seconds so far.
TRL's `train()` runs all iterations in one call, so the phases are timed by wrapping the functions its training
loop calls through its module namespace (the code itself is not changed):
  generation  `batch_generation` (HF `generate` with output_scores: the old log-probs come from it)
  reference   `forward` under no_grad (the reference policy's log-probs)
  value       `get_reward(value_model, ...)` (old values from the separate value model)
  scoring     `get_reward(reward_model, ...)`
  update      from the first `forward` under autograd to the iteration's `on_step_end` callback
              (the PPO epochs: policy + value model forward, backward, optimizer step)
  other       the rest (log-softmax of the generation scores, truncation, GAE, logging, gc.collect)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Budgets, FlopCounter, PhaseClock, peak_rss, reset_peak_rss, rss_mb, write_json  # noqa: E402


def main(spec_path: str, result_path: str) -> None:
    reset_peak_rss()  # the peak from here on is this worker's own (measure.py)
    spec = json.load(open(spec_path))
    started = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as engine

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    # TRL's documented setup: the value model starts as a copy of the reward model.
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)

    # Prompts tokenized as alignflow does: special tokens added, over-long prompts keep their end.
    limit = spec["max_prompt_tokens"]
    ids = [row[-limit:] for row in tokenizer(spec["prompts"], add_special_tokens=True)["input_ids"]]
    train_dataset = Dataset.from_dict({"input_ids": ids})
    eval_dataset = Dataset.from_dict({"input_ids": ids[: spec["batch_size"]]})

    batch, mini = spec["batch_size"], spec["mini_batch_size"]
    output_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    args = PPOConfig(
        output_dir=output_dir,
        # one optimizer step per minibatch, as in alignflow: micro batch = minibatch, no accumulation
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini,
        num_ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        kl_coef=spec["kl_coef"],
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        stop_token="eos",
        local_rollout_forward_batch_size=batch,  # the whole batch in one generation call, as alignflow
        total_episodes=batch * spec["iterations"],
        num_sample_generations=0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )

    clock = PhaseClock()
    flops = FlopCounter(clock)
    parameters = {
        "policy_backbone": flops.watch_backbone("policy", policy.transformer),
        "policy_head": flops.watch_head("policy_head", policy.lm_head),
        "reference_backbone": flops.watch_backbone("reference", reference.transformer),
        "reference_head": flops.watch_head("reference_head", reference.lm_head),
        "value_backbone": flops.watch_backbone("value", value_model.transformer),
        "reward_backbone": flops.watch_backbone("reward", reward_model.transformer),
    }

    engine.batch_generation = clock.timed("generation", engine.batch_generation)
    original_forward = engine.forward

    def forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled():
            clock.switch("update")  # stays on until the iteration ends: backward and step are update too
            return original_forward(model, query_responses, pad_token_id)
        return clock.timed("reference", original_forward)(model, query_responses, pad_token_id)

    engine.forward = forward
    engine.get_reward = clock.timed(
        lambda model, *a, **k: "scoring" if model is reward_model else "value", engine.get_reward
    )

    iterations: list[dict] = []
    record: dict = {}  # the iteration's logged metrics
    budgets = Budgets(spec.get("save_budgets") or [], spec.get("save_dir"), lambda path: (
        trainer.policy_model.save_pretrained(path), tokenizer.save_pretrained(path)))

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.lap(), flops.lap()
            clock.switch("other")
            self.start = time.perf_counter()
            budgets.start()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "objective/scores" in logs:
                record.update(logs)

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            steps = flops.calls.get("policy@generation", 0)
            phases, phase_flops = clock.lap(), flops.lap()
            clock.switch("other")
            iterations.append({
                "seconds": now - self.start,
                "phases": phases,
                "flops": phase_flops,
                "score": record.get("objective/scores"),
                "kl": record.get("objective/kl"),
                "eos_tokens": record.get("val/num_eos_tokens"),
                "generation_steps": steps,
            })
            budgets.reached(batch * len(iterations))
            clock.lap(), clock.switch("other")  # a save's time belongs to no iteration
            self.start = time.perf_counter()

    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward_model,
        value_model=value_model, train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=[Timing()],
    )
    setup_seconds = time.perf_counter() - started
    rss_before = rss_mb()
    trainer.train()
    flops.close()
    result = {
        "side": "trl",
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
        "parameters": parameters,
        "setup_seconds": setup_seconds,
        "rss_before_train_mb": rss_before,
        **peak_rss(),
        "iterations": iterations,
        "saved": budgets.saved,
    }
    if spec.get("save_policy"):
        trainer.policy_model.save_pretrained(spec["save_policy"])
        tokenizer.save_pretrained(spec["save_policy"])
    write_json(result_path, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
