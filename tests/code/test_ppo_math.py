"""PPO's math against hand-computed values and brute force."""

import math

import numpy as np
import pytest
import torch

from components.rl.core import (
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    logprobs_of,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)
from components.rl.kl_controller import AdaptiveKLController, FixedKLController, kl_controller
from components.rl.sampler import filter_logits


def mask_from_lengths(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_gae_matches_brute_force_double_loop():
    torch.manual_seed(0)
    lengths, width, gamma, lam = [1, 4, 7, 3, 6], 7, 0.9, 0.8
    mask = mask_from_lengths(lengths, width)
    rewards, values = torch.randn(5, width), torch.randn(5, width)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)

    expected = torch.zeros(5, width)
    for b, n in enumerate(lengths):
        v = lambda t: values[b, t].item() if t < n else 0.0  # noqa: E731  V = 0 past the last real token
        for t in range(n):
            expected[b, t] = sum(
                (gamma * lam) ** k * (rewards[b, t + k].item() + gamma * v(t + k + 1) - v(t + k)) for k in range(n - t)
            )
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-5)
    assert (advantages[mask == 0] == 0).all()


def test_kl_penalty_on_every_response_token_and_score_on_the_last_real_token_only():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-3.0, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, kl = compute_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0, 0.0]]))


def test_response_mask_keeps_the_first_eos_and_masks_everything_after_it():
    eos = torch.tensor([2])
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 2, 2, 6]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]).float()
    torch.testing.assert_close(response_mask(responses, eos), expected)
    # several EOS ids (e.g. Llama 3's <|eot_id|> and <|end_of_text|>)
    torch.testing.assert_close(response_mask(torch.tensor([[5, 9, 2]]), torch.tensor([2, 9])), torch.tensor([[1.0, 1.0, 0.0]]))


def test_clipped_surrogate_uses_the_pessimistic_term():
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1 with clip_range 0.2:
    #   -A r        = -1.5,  1.5, -0.5,  0.5
    #   -A clip(r)  = -1.2,  1.2, -0.8,  0.8
    #   max         = -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 7.0]])
    old = torch.full_like(ratio, -1.0)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, stats = policy_loss(old + ratio.log(), old, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.5)
    logratios = ratio.log()[0, :4]
    assert stats["policy/approxkl"].item() == pytest.approx(0.5 * (logratios**2).mean().item())


def test_clipped_surrogate_equals_plain_surrogate_inside_the_trust_region():
    ratio = torch.tensor([[1.1, 0.9, 1.0]])
    advantages = torch.tensor([[2.0, -3.0, 0.7]])
    mask = torch.ones_like(ratio)
    loss, stats = policy_loss(ratio.log(), torch.zeros_like(ratio), advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(1.1 * 2.0 - 0.9 * 3.0 + 0.7) / 3, abs=1e-6)
    assert stats["policy/clipfrac"].item() == 0.0


def test_clipped_value_loss():
    # V_old = 0, clip 0.2: V=0.5,R=1 -> max(0.25, (0.2-1)^2=0.64); V=0.1,R=1 -> 0.81 both; V=-0.5,R=-1 -> max(0.25, 0.64)
    values = torch.tensor([[0.5, 0.1, -0.5, 3.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, torch.zeros_like(values), returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.64) / 3)
    assert stats["val/clipfrac"].item() == pytest.approx(2 / 3)


def test_masked_whitening_uses_real_entries_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, -1e6, -1e6, -1e6]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    whitened = masked_whiten(values, mask)
    real = whitened[mask.bool()]
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (expected - expected.mean()) / expected.std()
    torch.testing.assert_close(real, expected, atol=1e-6, rtol=0)
    assert real.mean().abs() < 1e-6 and real.std().item() == pytest.approx(1.0, abs=1e-6)
    assert (whitened[~mask.bool()] == 0).all()
    assert masked_mean(values, mask).item() == pytest.approx(2.5)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    # error = clip(KL / target - 1, -0.2, 0.2); kl_coef *= 1 + error * n_steps / horizon
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(9.0, n_steps=64)  # error 0.5 -> clipped to 0.2
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000), abs=1e-15)
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(6.6, n_steps=64)  # error 0.1
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000), abs=1e-15)
    ctl.update(0.0, n_steps=100)  # error -1 -> clipped to -0.2
    assert ctl.kl_coef == pytest.approx(0.1 * 1.00064 * (1 - 0.2 * 100 / 10000), abs=1e-15)
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.kl_coef == ctl.kl_coef


def test_fixed_kl_controller_never_changes():
    ctl = kl_controller(0.05, adaptive=False, target_kl=6.0, horizon=10000)
    assert isinstance(ctl, FixedKLController) and not isinstance(ctl, AdaptiveKLController)
    ctl.update(100.0, 64)
    assert ctl.kl_coef == 0.05


def test_running_moments_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 64, 3)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(torch.tensor(batch, dtype=torch.float32))
    everything = np.concatenate(batches).astype(np.float32).astype(np.float64)
    assert moments.count == 75
    assert moments.mean == pytest.approx(everything.mean(), abs=1e-9)
    assert moments.std == pytest.approx(everything.std(), abs=1e-9)
    copy = RunningMoments()
    copy.load_state_dict(moments.state_dict())
    torch.testing.assert_close(copy.normalize(torch.tensor([3.0])), moments.normalize(torch.tensor([3.0])))


def test_logprobs_and_entropy_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    tokens = torch.randint(0, 11, (2, 3))
    log_softmax = logits.log_softmax(-1)
    torch.testing.assert_close(logprobs_of(logits, tokens), log_softmax.gather(-1, tokens[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy_from_logits(logits), -(log_softmax.exp() * log_softmax).sum(-1))


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 < 0.7 so the 0.25 token is needed too; 0.75 >= 0.7 so the rest go
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.4)).tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_k=0, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert not torch.isinf(filter_logits(logits, top_k=0, top_p=1.0)).any()
    assert math.isclose(torch.softmax(filter_logits(logits, 0, 0.7), -1)[0, 0].item(), 0.5 / 0.75, rel_tol=1e-6)
