"""PPO on the demo kit's own models: a short run beats the instruct model on reward AND on the gold truth.

Skips only while the demo kit's artifacts (artifacts/demo/{instruct,reward}) have not been built
(`alignflow demo bootstrap`). ALIGNFLOW_DEMO_ARTIFACTS points the test at another build.
"""

import json
import os
import random
import time
from pathlib import Path

import pytest
from ppo_helpers import one_thread  # noqa: F401

from components.config import PROJECT_ROOT, load_config
from components.models import load_causal_lm, load_tokenizer
from components.ppo import PPOTrainer, generate
from components.reward import RewardScorer

ARTIFACTS = Path(os.environ.get("ALIGNFLOW_DEMO_ARTIFACTS", PROJECT_ROOT / "artifacts" / "demo"))
PROMPTS_FILE = Path(os.environ.get("ALIGNFLOW_DEMO_PROMPTS", PROJECT_ROOT / "data" / "demo" / "prompts.jsonl"))

pytestmark = pytest.mark.skipif(
    not all((ARTIFACTS / name / "config.json").is_file() for name in ("instruct", "reward")),
    reason=f"demo artifacts not built yet at {ARTIFACTS} (run `alignflow demo bootstrap`)",
)


def demo_prompts(tmp_path: Path) -> list[str]:
    path = PROMPTS_FILE
    if not path.is_file():
        from components.demo.domain import generate_demo_data

        path = generate_demo_data(tmp_path)["prompts"]
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def evaluate(policy, tokenizer, scorer, prompts, generation):
    from components.demo.gold import is_gold_positive

    samples = generate(policy, tokenizer, prompts, generation, seed=1234)
    scores = scorer(prompts, samples.completions)
    gold = [is_gold_positive(p + c) for p, c in zip(prompts, samples.completions)]
    return scores.mean().item(), sum(gold) / len(gold)


@pytest.mark.slow
def test_short_ppo_run_raises_reward_and_gold_positive_share(tmp_path):
    # the demo config as it is (lr 3e-4, batch 64, minibatch 16, 4 epochs, kl_coef 0.05). Keep the run short:
    # past ~8 iterations the learned reward model starts being gamed ("never awful.") and the gold share falls.
    cfg = load_config(overrides=[f"policy.model={ARTIFACTS / 'instruct'}", f"reward.model={ARTIFACTS / 'reward'}"])
    prompts = demo_prompts(tmp_path)
    random.Random(0).shuffle(prompts)
    eval_prompts, train_prompts = prompts[:128], prompts[128:]
    policy, tokenizer = load_causal_lm(cfg.policy.model), load_tokenizer(cfg.policy.model)
    scorer = RewardScorer.from_config(cfg.reward)

    score_before, gold_before = evaluate(policy, tokenizer, scorer, eval_prompts, cfg.generation)
    trainer = PPOTrainer.from_config(cfg, policy, tokenizer, scorer)
    start = time.perf_counter()
    result = trainer.train(train_prompts, iterations=int(os.environ.get("ALIGNFLOW_DEMO_ITERATIONS", 6)))
    elapsed = time.perf_counter() - start
    score_after, gold_after = evaluate(trainer.policy, tokenizer, scorer, eval_prompts, cfg.generation)
    print(
        f"reward {score_before:+.3f} -> {score_after:+.3f}, gold positive {gold_before:.3f} -> {gold_after:.3f}, "
        f"KL {result.last['objective/kl']:.2f}, {result.iterations} iterations in {elapsed:.1f}s"
    )
    assert score_after > score_before + 0.5
    assert gold_after > gold_before + 0.1
    assert result.last["objective/kl"] < cfg.gates.max_kl
