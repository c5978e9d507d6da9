"""The critic-free estimators, the KL estimators, the loss aggregations and the asymmetric clip, against numbers
worked out by hand (each comment shows the sum)."""

import math
from types import SimpleNamespace

import pytest
import torch

from components.config import ConfigError, RLConfig, RunConfig, load_config
from components.rl.core import (
    aggregate,
    compute_rewards,
    estimate_advantages,
    group_advantages,
    group_stats,
    kl_estimate,
    policy_loss,
    returns_to_go,
)

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0])  # one group of k = 4


def test_rloo_subtracts_the_mean_of_the_other_completions():
    # 1 - (2+3+6)/3 = -8/3;  2 - (1+3+6)/3 = -4/3;  3 - (1+2+6)/3 = 0;  6 - (1+2+3)/3 = 4
    torch.testing.assert_close(group_advantages(SCORES, 4, "rloo"), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))


def test_grpo_divides_the_centred_scores_by_the_group_std():
    # groups [1, 3] and [5, 5]: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2); the second is all equal
    advantages = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, "grpo")
    root2 = math.sqrt(2) + 1e-4
    torch.testing.assert_close(advantages, torch.tensor([-1 / root2, 1 / root2, 0.0, 0.0]))


@pytest.mark.parametrize("estimator", ["dr_grpo", "reinforce_pp_baseline"])
def test_dr_grpo_and_reinforce_pp_baseline_only_centre_on_the_group_mean(estimator):
    # mean (1+2+3+6)/4 = 3
    torch.testing.assert_close(group_advantages(SCORES, 4, estimator), torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_reinforce_pp_takes_the_scores_as_they_are_before_whitening():
    torch.testing.assert_close(group_advantages(SCORES, 1, "reinforce_pp"), SCORES)


def test_returns_to_go_discount_the_later_rewards_and_stop_at_padding():
    # gamma 0.5 over [1, 2, 3]: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75; padding stays 0
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(returns_to_go(rewards, mask, 0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]]))


def test_kl_estimators_k1_k2_k3():
    # pi = 0.5, pi_ref = 0.25: log pi/pi_ref = log 2; r = pi_ref/pi = 0.5
    #   k1 = log 2 = 0.6931;  k2 = (log 2)^2 / 2 = 0.2402;  k3 = (0.5 - 1) - log 0.5 = 0.1931
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logprobs, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logprobs, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    # k3 never goes negative and is 0 only where pi = pi_ref; k2 and k3 agree to second order near it
    near = torch.tensor([-1.01, -0.99, -1.0])
    assert (kl_estimate(near, torch.full_like(near, -1.0), "k3") >= 0).all()
    assert kl_estimate(near, torch.full_like(near, -1.0), "k3")[2] == 0
    torch.testing.assert_close(kl_estimate(near, torch.full_like(near, -1.0), "k3"),
                               kl_estimate(near, torch.full_like(near, -1.0), "k2"), atol=2e-6, rtol=0)


def test_the_kl_penalty_in_the_reward_uses_the_chosen_estimator():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2)
    rewards, kl = compute_rewards(torch.tensor([1.0]), logprobs, ref, mask, kl_coef=0.1, kl_estimator="k3")
    # token 0: -0.1 * 0.1931; token 1: KL 0, + the score 1
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * (math.log(2) - 0.5), 1.0]]))
    torch.testing.assert_close(kl, torch.tensor([[math.log(2), 0.0]]))  # the metric's KL is k1 whatever the penalty


def test_loss_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)  # (mean 2, mean 4) -> 3
    assert aggregate(values, mask, "constant", max_tokens=4).item() == pytest.approx(10 / (2 * 4))  # 1.25
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(values, mask, "constant")


def test_clip_higher_widens_only_the_upper_bound():
    # ratios 1.5 and 0.5, advantages +1 and -1, clip low 0.2, high 0.28:
    #   +A: max(-1.5, -1.28) = -1.28 (clipped at 1 + 0.28);  -A: max(0.5, 0.8) = 0.8 (clipped at 1 - 0.2)
    ratio = torch.tensor([[1.5, 0.5]])
    loss, stats = policy_loss(ratio.log(), torch.zeros_like(ratio), torch.tensor([[1.0, -1.0]]), torch.ones_like(ratio),
                              clip_range=0.2, clip_range_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)
    assert stats["policy/clipfrac"].item() == 1.0


def _experience(scores, rewards, mask):
    return SimpleNamespace(shaped_scores=torch.tensor(scores), rewards=torch.tensor(rewards), mask=torch.tensor(mask),
                           values=None, advantages=None, returns=None)


def test_rloo_advantages_are_the_group_advantage_plus_the_kl_rewards_to_go():
    # two prompts x k = 2; scores 1, 3 | 0, 0; per-token KL rewards -0.1 on every real token (gamma 1)
    #   group advantages: 1 - 3 = -2, 3 - 1 = 2 | 0, 0
    #   row 0 (3 tokens): [-2 - 0.3, -2 - 0.2, -2 - 0.1];  row 1 (2 tokens): [2 - 0.2, 2 - 0.1, 0]
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    kl_rewards = [[-0.1 * m for m in row] for row in mask]
    scores = [1.0, 3.0, 0.0, 0.0]
    rewards = [row[:] for row in kl_rewards]
    for row, score, m in zip(rewards, scores, mask):
        row[int(sum(m)) - 1] += score
    experience = _experience(scores, rewards, mask)
    estimate_advantages(experience, RLConfig(advantage_estimator="rloo", samples_per_prompt=2, rollout_batch_size=2,
                                             mini_batch_size=4))
    expected = torch.tensor([[-2.3, -2.2, -2.1], [1.8, 1.9, 0.0], [-0.1, 0.0, 0.0], [-0.3, -0.2, -0.1]])
    torch.testing.assert_close(experience.advantages, expected)
    assert experience.returns is None


def test_reinforce_pp_whitens_the_returns_over_the_batch_tokens():
    # scores 1 and 3 on one-token responses, no KL: returns 1, 3 -> mean 2, unbiased std sqrt(2) -> -0.7071, 0.7071
    experience = _experience([1.0, 3.0], [[1.0], [3.0]], [[1.0], [1.0]])
    estimate_advantages(experience, RLConfig(advantage_estimator="reinforce_pp", rollout_batch_size=2, mini_batch_size=2))
    torch.testing.assert_close(experience.advantages, torch.tensor([[-1 / math.sqrt(2)], [1 / math.sqrt(2)]]), atol=1e-4, rtol=0)


def test_group_statistics_count_all_equal_groups():
    stats = group_stats(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    assert stats["group/frac_score_zero_std"] == 0.5
    assert stats["group/score_std"] == pytest.approx(math.sqrt(2) / 2)


# --- the configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, placement, kl, aggregation", [
    ("gae", "reward", "k1", "token_mean"), ("rloo", "reward", "k1", "token_mean"), ("grpo", "loss", "k3", "sequence_mean"),
    ("dr_grpo", "loss", "k3", "constant"), ("reinforce_pp", "reward", "k1", "token_mean"),
    ("reinforce_pp_baseline", "loss", "k2", "token_mean"),
])
def test_each_estimator_defaults_to_its_published_kl_and_loss(estimator, placement, kl, aggregation):
    k = 1 if estimator in ("gae", "reinforce_pp") else 4
    config = load_config(overrides=[f"rl.advantage_estimator={estimator}", f"rl.samples_per_prompt={k}",
                                    "rl.rollout_batch_size=16", *([] if estimator == "gae" else ["critic.type=none"])])
    assert (config.rl.kl_placement, config.rl.kl_estimator, config.rl.loss_aggregation) == (placement, kl, aggregation)
    assert config.rl.algorithm == ("ppo" if estimator == "gae" else estimator)
    assert config.critic.type == ("separate" if estimator == "gae" else "none")
    # an explicit choice wins, and the logged configuration says what ran
    config = load_config(overrides=[f"rl.advantage_estimator={estimator}", f"rl.samples_per_prompt={k}",
                                    "rl.rollout_batch_size=16", "rl.kl_placement=reward", "rl.kl_estimator=k2",
                                    *([] if estimator == "gae" else ["critic.type=none"])])
    assert config.flat()["rl.kl_estimator"] == "k2" and config.flat()["rl.kl_placement"] == "reward"


def test_critic_and_group_size_mismatches_are_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"rl.advantage_estimator=grpo uses no critic, but critic.type is separate"):
        load_config(overrides=["rl.advantage_estimator=grpo", "rl.samples_per_prompt=4", "rl.rollout_batch_size=16"])
    with pytest.raises(ConfigError, match=r"rl.advantage_estimator=gae needs a critic, but critic.type is none"):
        load_config(overrides=["critic.type=none"])
    with pytest.raises(ConfigError, match=r"rl.advantage_estimator=rloo .* needs rl.samples_per_prompt >= 2 \(got 1\)"):
        load_config(overrides=["rl.advantage_estimator=rloo", "critic.type=none"])
    # without a critic.type, a critic-free estimator gets none
    assert RunConfig(rl={"advantage_estimator": "rloo", "samples_per_prompt": 2}).critic.type == "none"
    # REINFORCE++ needs no group
    assert RunConfig(rl={"advantage_estimator": "reinforce_pp"}).rl.samples_per_prompt == 1
