"""PPO on the demo kit's own models: a short run beats the instruct model on reward AND on the gold truth.

The demo kit is built (or reused) by the session fixture `demo_kit`, as `make demo` would.
"""

import json
import random
import time

import pytest
from support import one_thread  # noqa: F401

from components.config import load_config
from components.demo.gold import is_gold_positive
from components.models.loading import load_causal_lm, load_tokenizer
from components.rl import build_trainer, generate
from components.rl.reward import RewardScorer


def evaluate(policy, tokenizer, scorer, prompts, generation):
    samples = generate(policy, tokenizer, prompts, generation, seed=1234)
    scores = scorer(prompts, samples.completions)
    gold = [is_gold_positive(p + c) for p, c in zip(prompts, samples.completions)]
    return scores.mean().item(), sum(gold) / len(gold)


@pytest.mark.slow
def test_short_ppo_run_raises_reward_and_gold_positive_share(demo_kit):
    # The demo config as it is, for 12 of its 80 iterations.
    cfg = load_config(overrides=[f"policy.model={demo_kit.instruct}", f"reward.model={demo_kit.reward}"])
    prompts = [json.loads(line)["prompt"] for line in (demo_kit.data_dir / "prompts.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(prompts)
    eval_prompts, train_prompts = prompts[:128], prompts[128:]
    policy, tokenizer = load_causal_lm(cfg.policy.model), load_tokenizer(cfg.policy.model)
    scorer = RewardScorer.from_config(cfg.reward)

    score_before, gold_before = evaluate(policy, tokenizer, scorer, eval_prompts, cfg.generation)
    trainer = build_trainer(policy, tokenizer, scorer, **cfg.trainer_sections())
    start = time.perf_counter()
    result = trainer.train(train_prompts, iterations=12)
    elapsed = time.perf_counter() - start
    score_after, gold_after = evaluate(trainer.policy, tokenizer, scorer, eval_prompts, cfg.generation)
    print(
        f"reward {score_before:+.3f} -> {score_after:+.3f}, gold positive {gold_before:.3f} -> {gold_after:.3f}, "
        f"KL {result.last['objective/kl']:.2f}, {result.iterations} iterations in {elapsed:.1f}s"
    )
    assert score_after > score_before + 0.5
    assert gold_after > gold_before + 0.1
    assert result.last["objective/kl"] < cfg.gates.max_kl
