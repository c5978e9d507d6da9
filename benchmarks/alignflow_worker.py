"""alignflow's side of the benchmark: its engine (components.rl) on one workload, in a fresh process.

    python benchmarks/alignflow_worker.py SPEC.json RESULT.json [ENGINE_ROOT]

With an "evaluate" list in SPEC it instead evaluates saved policies (both engines') on held-out prompts; with a
"probe" list of algorithm names it reports which of them the engine has (benchmarks/algorithms.py).
SPEC["algorithm"] (default "ppo") picks the algorithm; with "save_budgets" (episode counts) and "save_dir" the
policy is saved at each budget with the training wall-clock seconds so far (saving excluded), as the TRL workers do.
ENGINE_ROOT (default: this checkout) is the directory whose `components/` is benchmarked, e.g. a
`git archive` of a commit of today's engine layout (components/rl, since the engine's split into experience,
advantages and learning). Phases are timed by wrapping, from outside, what `Trainer.run_iteration` calls:
  generation  `sample` (our KV-cache loop; old log-probs and shared-head values come from it)
  reference   `response_logprobs` (the reference policy's log-probs)
  value       a separate critic's forward in the rollout (none with a shared value head)
  scoring     `decode` + the reward function (re-tokenization and the reward model)
  update      `learn` (the update epochs)
  other       the rest (rewards, GAE, whitening, statistics)
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(spec_path: str, result_path: str, engine_root: str) -> None:
    sys.path.insert(0, engine_root)
    sys.path.insert(0, HERE)
    from measure import reset_peak_rss, write_json

    reset_peak_rss()  # the peak from here on is this worker's own (measure.py)

    spec = json.load(open(spec_path))
    if "probe" in spec:
        write_json(result_path, {"algorithms": probe(spec["probe"], spec.get("k", 4))})
    else:
        write_json(result_path, evaluate(spec) if "evaluate" in spec else train(spec))


def probe(algorithms: list[str], k: int) -> dict:
    """{algorithm: {"available": bool, "reason": str}}: whether this engine's RLConfig accepts the algorithm's
    settings (algorithms.py). An engine without them refuses the unknown keys; nothing is run."""
    from algorithms import alignflow_settings

    from components.config import RLConfig

    out = {}
    for name in algorithms:
        settings = alignflow_settings(name, k)["rl"]
        try:
            RLConfig(**settings)
            out[name] = {"available": True, "reason": ""}
        except Exception as error:  # pydantic's ValidationError, or the engine's ConfigError
            out[name] = {"available": False, "reason": f"this engine's RLConfig does not accept "
                         f"{', '.join(sorted(settings))} ({type(error).__name__})"}
    return out


def evaluate(spec: dict) -> dict:
    """Each policy in spec["evaluate"] on the held-out prompts, with the same code and seeds for all:
    spec["samples"] sampled completions per prompt (seeds spec["seed"], +1, ...), their reward-model scores and the
    gold scorer's verdicts (as tests/model does). The reward model reads the text as written, as it was trained."""
    import torch

    import components
    from components.config import GenerationConfig, RewardConfig
    from components.demo.gold import is_gold_positive
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.rl import generate
    from components.rl.reward import RewardScorer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    generation = GenerationConfig(
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], max_prompt_tokens=spec["max_prompt_tokens"]
    )
    scorer = RewardScorer.from_config(RewardConfig(model=spec["reward"], max_length=spec["reward_max_length"]))
    prompts = spec["prompts"]
    out = {"engine": os.path.dirname(os.path.abspath(components.__file__)), "policies": {}}
    for path in spec["evaluate"]:
        policy, tokenizer = load_causal_lm(path), load_tokenizer(path)
        scores, gold, lengths, ended, examples = [], [], [], [], []
        for seed in range(spec["seed"], spec["seed"] + spec.get("samples", 1)):
            samples = generate(policy, tokenizer, prompts, generation, seed=seed)
            scores += scorer(prompts, samples.completions).tolist()
            gold += [is_gold_positive(p + c) for p, c in zip(prompts, samples.completions)]
            lengths += samples.lengths
            ended += samples.ended_with_eos
            examples = examples or [p + c for p, c in zip(prompts[:3], samples.completions[:3])]
        out["policies"][path] = {
            "score": sum(scores) / len(scores),
            "gold_positive_share": sum(gold) / len(gold),
            "length_mean": sum(lengths) / len(lengths),
            "eos_fraction": sum(ended) / len(ended),
            "samples": len(scores),
            "examples": examples,
        }
    return out


def train(spec: dict) -> dict:
    from algorithms import alignflow_settings
    from measure import Budgets, FlopCounter, PhaseClock, peak_rss, rss_mb

    started = time.perf_counter()
    import torch
    import transformers

    import components
    import components.rl.experience as experience
    from components.config import CriticConfig, GenerationConfig, LoraConfig, RewardConfig, RLConfig
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.rl.reward import RewardScorer
    from components.rl import build_trainer
    from components.rl.roles import backbone_of

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])

    batch = spec["batch_size"]  # episodes (completions) per iteration, for every algorithm
    algorithm = spec.get("algorithm", "ppo")
    settings = alignflow_settings(algorithm, spec.get("k", 4))
    rl = RLConfig(
        learning_rate=spec["learning_rate"],
        rollout_batch_size=batch // settings["rl"].get("samples_per_prompt", 1),
        mini_batch_size=spec["mini_batch_size"],
        update_epochs=spec["ppo_epochs"],
        kl_coef=spec["kl_coef"],
        total_episodes=batch * spec["iterations"],
        max_grad_norm=spec.get("max_grad_norm"),
        **settings["rl"],
    )
    generation = GenerationConfig(
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_k=0, top_p=1.0,
        max_prompt_tokens=spec["max_prompt_tokens"],
    )
    reward = RewardConfig(model=spec["reward"], max_length=spec["reward_max_length"], score_batch_size=batch)
    # the separate critic starts as the reward model (build_trainer loads it when it shares the policy's vocabulary)
    critic = CriticConfig(type=spec.get("value_head", "shared") if settings["critic"] else "none")

    tokenizer = load_tokenizer(spec["policy"])
    policy = load_causal_lm(spec["policy"])
    scorer = RewardScorer.from_config(reward)
    trainer = build_trainer(policy, tokenizer, scorer, rl=rl, generation=generation, reward=reward, critic=critic,
                            lora=LoraConfig(), seed=spec["seed"])

    clock = PhaseClock()
    flops = FlopCounter(clock)
    parameters = {
        "policy_backbone": flops.watch_backbone("policy", backbone_of(trainer.policy)),
        "policy_head": flops.watch_head("policy_head", policy.get_output_embeddings()),
        "reference_backbone": flops.watch_backbone("reference", backbone_of(trainer.reference)),
        "reference_head": flops.watch_head("reference_head", trainer.reference.get_output_embeddings()),
        "reward_backbone": flops.watch_backbone("reward", scorer.model.base_model),
    }
    if trainer.critic is not None:
        parameters["value_backbone"] = flops.watch_backbone("value", trainer.critic.backbone)
    experience.sample = clock.timed("generation", experience.sample)
    experience.response_logprobs = clock.timed("reference", experience.response_logprobs)
    # the critic's forward: "value" in the rollout, part of "update" inside the update epochs
    experience.response_hidden = clock.timed(lambda *a, **k: "update" if clock.current == "update" else "value",
                                             experience.response_hidden)
    experience.decode = clock.timed("scoring", experience.decode)
    trainer.experience_maker.reward_fn = clock.timed("scoring", trainer.experience_maker.reward_fn)
    trainer.learner.learn = clock.timed("update", trainer.learner.learn)

    setup_seconds = time.perf_counter() - started
    rss_before = rss_mb()
    iterations = []
    prompts = spec["prompts"]
    budgets = Budgets(spec.get("save_budgets") or [], spec.get("save_dir"), lambda path: (
        trainer.policy.save_pretrained(path), tokenizer.save_pretrained(path)))
    for _ in range(spec["iterations"]):
        clock.lap(), flops.lap()
        clock.switch("other")
        start = time.perf_counter()
        stats = trainer.run_iteration(trainer.next_prompts(prompts))
        seconds = time.perf_counter() - start
        steps = flops.calls.get("policy@generation", 0)
        iterations.append({
            "seconds": seconds,
            "phases": clock.lap(),
            "flops": flops.lap(),
            "score": stats["objective/scores"],
            "kl": stats["objective/kl"],
            "response_length": stats["response/length_mean"],
            "generation_steps": steps,
        })
        budgets.reached(batch * len(iterations))
    flops.close()
    result = {
        "side": "alignflow",
        "engine": os.path.dirname(os.path.abspath(components.__file__)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "algorithm": algorithm,
        "engine_settings": settings,
        "value_head": getattr(trainer, "value_head_type", None),
        "parameters": parameters,
        "setup_seconds": setup_seconds,
        "rss_before_train_mb": rss_before,
        **peak_rss(),
        "iterations": iterations,
        "saved": budgets.saved,
    }
    if spec.get("save_policy"):
        trainer.policy.save_pretrained(spec["save_policy"])
        tokenizer.save_pretrained(spec["save_policy"])
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(HERE))
