"""TRL 1.16.0's group trainers (`RLOOTrainer`, `GRPOTrainer`) on one workload, in a fresh process.

Runs in its own virtual environment (benchmarks/.venv-trl116: torch==2.13.0 trl==1.16.0), never alignflow's:

    benchmarks/.venv-trl116/bin/python benchmarks/trl_group_worker.py SPEC.json RESULT.json

SPEC is written by benchmarks/time_to_quality.py (`job_spec` there): the workload's settings plus "algorithm"
(rloo, grpo, dr_grpo: the trainer and its settings come from benchmarks/algorithms.py), "k", "seed",
"iterations", and optionally "save_budgets" + "save_dir" (the policy is saved at those episode counts, with the
training wall-clock seconds so far, saving excluded).

How the workload maps onto TRL's counts (an "iteration" here is one generation batch and its updates, as in PPO):
  episodes per iteration  batch_size completions = batch_size / k prompts x k (`num_generations`)
  generation batch        `steps_per_generation` = batch_size / mini_batch_size optimizer steps of
                          `per_device_train_batch_size` = mini_batch_size completions, no gradient accumulation
  epochs over it          `num_iterations` = ppo_epochs (TRL's mu)
  optimizer steps         `max_steps` = iterations x steps_per_generation x num_iterations (HF Trainer's global steps)
The group workloads default to one optimizer step per generation batch (mini_batch_size = batch_size, 1 epoch),
TRL's own default for these trainers.

Phases are timed by wrapping, from outside, the trainer's own methods (the code itself is not changed):
  generation  `_generate` (HF `generate` and decoding), and the policy's no-grad forward for the old log-probs
              (TRL recomputes them after sampling; alignflow takes them from its sampling loop)
  reference   `_get_per_token_logps_and_entropies` on the reference model
  scoring     `_calculate_rewards` (the reward model reading prompt + completion text with its own tokenizer)
  update      from the first forward under autograd to the end of the optimizer step
  other       the rest (advantages, padding, logging, the Trainer's loop)
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
from measure import Budgets, FlopCounter, PhaseClock, peak_rss, reset_peak_rss, rss_mb, write_json  # noqa: E402


def trl_config(spec: dict, output_dir: str):
    """The RLOOConfig or GRPOConfig for SPEC (algorithms.py names the trainer and its algorithm settings)."""
    from algorithms import trl_peer
    from trl import GRPOConfig, RLOOConfig

    _, trainer, settings = trl_peer(spec["algorithm"])
    batch, mini, k = spec["batch_size"], spec["mini_batch_size"], spec["k"]
    if batch % mini or mini % k:
        raise ValueError(f"batch {batch} must be a multiple of the minibatch {mini}, and that of k={k}")
    config = RLOOConfig if trainer == "RLOOTrainer" else GRPOConfig
    steps_per_generation = batch // mini
    return trainer, config(
        output_dir=output_dir,
        **settings,
        num_generations=k,
        per_device_train_batch_size=mini,
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation,
        num_iterations=spec["ppo_epochs"],
        max_steps=spec["iterations"] * steps_per_generation * spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,  # alignflow's AdamW has none (TrainingArguments' default is 0 too; stated here)
        max_grad_norm=spec.get("max_grad_norm") or 0.0,  # TrainingArguments clips at 1.0 by default; 0 = none
        beta=spec["kl_coef"],
        epsilon=0.2,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_k=0,
        top_p=1.0,
        disable_dropout=True,  # alignflow keeps its models in eval mode: no dropout on either side
        gradient_checkpointing=False,  # TRL's configs turn it on by default; alignflow does not recompute
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_completions=False,
        shuffle_dataset=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
    )


def keep_special_tokens(tokenizer):
    """`tokenizer`, encoding text with its own special tokens even when TRL asks for none. TRL 1.16 tokenizes the
    reward model's text with add_special_tokens=False (chat-templated text carries them already); plain text then
    loses what the tokenizer's template adds, e.g. the demo reward tokenizer's <bos>, which its reward model was
    trained with and reads in alignflow's scorer and TRL 1.12's token ids alike. SPEC["reward_special_tokens"]=false
    leaves TRL's behaviour as it is."""

    class KeepSpecialTokens(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            kwargs["add_special_tokens"] = True
            return super().__call__(*args, **kwargs)

    tokenizer.__class__ = KeepSpecialTokens
    return tokenizer


def main(spec_path: str, result_path: str) -> None:
    reset_peak_rss()  # the peak from here on is this worker's own (measure.py)
    spec = json.load(open(spec_path))
    started = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer, RLOOTrainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])

    output_dir = tempfile.mkdtemp(prefix=f"trl-{spec['algorithm']}-")
    trainer_name, args = trl_config(spec, output_dir)
    batch = spec["batch_size"]

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    # The reward model reads prompt + completion as text, with its own tokenizer (`reward_processing_classes`).
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["reward"])
    if spec.get("reward_special_tokens", True):
        reward_tokenizer = keep_special_tokens(reward_tokenizer)

    # Prompts as text, over-long ones keeping their end as alignflow's tokenizer does (max_prompt_tokens); TRL 1.16
    # has no max_prompt_length of its own. Prompts are the demo's plain text, not chat messages.
    limit = spec["max_prompt_tokens"]
    texts = [
        tokenizer.decode(ids[-limit:], skip_special_tokens=False) if len(ids) > limit else text
        for text, ids in zip(spec["prompts"], tokenizer(spec["prompts"], add_special_tokens=False)["input_ids"])
    ]
    train_dataset = Dataset.from_dict({"prompt": texts})

    clock = PhaseClock()
    flops = FlopCounter(clock)
    trainer_class = RLOOTrainer if trainer_name == "RLOOTrainer" else GRPOTrainer
    trainer = trainer_class(
        model=policy, reward_funcs=reward_model, args=args, train_dataset=train_dataset,
        processing_class=tokenizer, reward_processing_classes=reward_tokenizer,
    )
    reference = trainer.ref_model
    parameters = {
        "policy_backbone": flops.watch_backbone("policy", policy.base_model),
        "policy_head": flops.watch_head("policy_head", policy.get_output_embeddings()),
        "reward_backbone": flops.watch_backbone("reward", reward_model.base_model),
    }
    if reference is not None:
        parameters["reference_backbone"] = flops.watch_backbone("reference", reference.base_model)
    head_parameters = parameters["policy_head"]

    # The log-prob forwards go through TRL's fused LM head, which multiplies by lm_head.weight directly (no module
    # call for the head hook to see); on the CPU it scores every position of the (B, T) input, so that is charged.
    logps = trainer._get_per_token_logps_and_entropies

    def per_token_logps(model, input_ids, *a, **k):
        if torch.is_grad_enabled():
            clock.switch("update")  # stays on until the step ends: backward and the optimizer step are update too
            phase, result = "update", logps(model, input_ids, *a, **k)
        else:
            phase = "reference" if model is reference else "generation"
            decode_steps = flops.calls.get("policy@generation", 0)
            result = clock.timed(phase, logps)(model, input_ids, *a, **k)
            if phase == "generation":  # forwards in chunks, not decode steps: "decode steps" count `generate`'s alone
                flops.calls["policy@generation"] = decode_steps
        positions = input_ids.shape[0] * (input_ids.shape[1] - 1)
        multiplier = 6 if phase == "update" else 2
        flops.flops[phase] = flops.flops.get(phase, 0.0) + multiplier * head_parameters * positions
        return result

    trainer._get_per_token_logps_and_entropies = per_token_logps
    trainer._generate = clock.timed("generation", trainer._generate)
    trainer._calculate_rewards = clock.timed("scoring", trainer._calculate_rewards)

    steps_per_iteration = args.steps_per_generation * args.num_iterations
    iterations: list[dict] = []
    record: dict = {}  # the latest logged metrics
    budgets = Budgets(spec.get("save_budgets") or [], spec.get("save_dir"), lambda path: (
        trainer.model.save_pretrained(path), tokenizer.save_pretrained(path)))

    class Timing(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.lap(), flops.lap()
            clock.switch("other")
            self.start = time.perf_counter()
            budgets.start()

        def on_log(self, args, state, control, logs=None, **k):
            if logs:
                record.update(logs)

        def on_step_end(self, args, state, control, **k):
            clock.switch("other")
            if state.global_step % steps_per_iteration:
                return  # the generation batch still has optimizer steps to go
            now = time.perf_counter()
            steps = flops.calls.get("policy@generation", 0)
            phases, phase_flops = clock.lap(), flops.lap()
            clock.switch("other")
            iterations.append({
                "seconds": now - self.start,
                "phases": phases,
                "flops": phase_flops,
                "score": None,  # filled from the logs below, once the Trainer has logged this step
                "generation_steps": steps,
                "global_step": state.global_step,
            })
            budgets.reached(batch * len(iterations))
            clock.lap(), clock.switch("other")  # a save's time belongs to no iteration
            self.start = time.perf_counter()

    class Scores(TrainerCallback):
        # The Trainer logs after on_step_end: an iteration's reward and KL (logged at its generation) are in the
        # logs up to its last step, which `Timing.on_log` has merged into `record` just before this runs.
        def on_log(self, args, state, control, logs=None, **k):
            if iterations and iterations[-1]["global_step"] == state.global_step:
                iterations[-1].update(score=record.get("reward"), kl=record.get("kl"),
                                      response_length=record.get("completions/mean_length"))

    trainer.add_callback(Timing())
    trainer.add_callback(Scores())
    setup_seconds = time.perf_counter() - started
    rss_before = rss_mb()
    trainer.train()
    flops.close()
    result = {
        "side": "trl",
        "trainer": trainer_name,
        "algorithm": spec["algorithm"],
        "trl_settings": {key: getattr(args, key) for key in (
            "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_iterations", "max_steps", "learning_rate", "beta", "epsilon", "epsilon_high",
            "max_completion_length", "temperature", "top_k", "top_p", "max_grad_norm", "disable_dropout",
            "gradient_checkpointing", "loss_type", "scale_rewards", "normalize_advantages", "use_bias_correction_kl",
            "importance_sampling_level", "mask_truncated_completions",
        ) if hasattr(args, key)},
        "reward_special_tokens": spec.get("reward_special_tokens", True),
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "setup_seconds": setup_seconds,
        "rss_before_train_mb": rss_before,
        **peak_rss(),
        "iterations": iterations,
        "saved": budgets.saved,
    }
    if spec.get("save_policy"):
        trainer.model.save_pretrained(spec["save_policy"])
        tokenizer.save_pretrained(spec["save_policy"])
    shutil.rmtree(output_dir, ignore_errors=True)  # the Trainer's output_dir: nothing is saved there (save_strategy "no")
    write_json(result_path, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
