"""The RL maths on plain tensors. Shapes: B episodes x T response tokens; `mask` is 1 on real tokens. With k samples
per prompt the B episodes are B / k groups of k consecutive rows, one group per prompt.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 and Stiennon et al. 2020
(the per-token KL penalty with the score on the last token), Schulman 2020 (the KL estimators k1, k2, k3),
Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO), Liu et al. 2025 (Dr. GRPO), Hu et al. 2025 (REINFORCE++),
Yu et al. 2025 (DAPO's clip-higher).
"""

from __future__ import annotations

import math

import torch

from components.config.estimators import ESTIMATORS


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return masked_sum((values - mean) ** 2, mask) / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries only; padding is set to 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def response_mask(responses: torch.Tensor, eos_token_ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (a row without EOS is all real)."""
    is_eos = torch.isin(responses, eos_token_ids)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before t
    return (~after_eos).to(torch.float32)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], without materialising the full log-softmax."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, with log r = log pi_ref - log pi
    (Schulman 2020, "Approximating KL divergence"): k1 = -log r; k2 = (log r)^2 / 2; k3 = (r - 1) - log r.
    k1 is unbiased, k2 and k3 low-variance (k3 unbiased too, and never negative)."""
    log_ratio = logprobs - ref_logprobs  # -log r
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_r = (-log_ratio).clamp(max=20.0)  # r = pi_ref / pi; clamped so a vanishing pi cannot overflow exp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: k1, k2, k3")


def on_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) values placed on each row's last real token of a (B, T) tensor of zeros."""
    placed = torch.zeros_like(mask, dtype=values.dtype)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    placed[torch.arange(len(values)), last] = values
    return placed


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef k(t) on every real token (k the KL estimator), + the score on the last real one.

    Returns (rewards, kl) with kl the per-token log-ratio log pi - log pi_ref (k1; 0 on padding), which the KL
    metrics and the adaptive controller read whatever the estimator.
    """
    kl = (logprobs - ref_logprobs) * mask
    penalty = kl if kl_estimator == "k1" else kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * penalty + on_last_token(scores, mask)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  V = A = 0 past the last real token.
    Returns (advantages, returns) with returns = advantages + values.
    """
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """A per-token loss over a batch: token_mean, the mean over every real token (PPO, DAPO); sequence_mean, the mean
    over sequences of each one's token mean (GRPO); constant, the token sum over B x max_tokens (Dr. GRPO: no
    length normalisation)."""
    if how == "token_mean":
        return masked_mean(values, mask)
    if how == "sequence_mean":
        return masked_mean(values, mask, dim=1).mean()
    if how == "constant":
        if not max_tokens:
            raise ValueError("loss aggregation 'constant' needs max_tokens (generation.max_new_tokens)")
        return masked_sum(values, mask) / (values.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; allowed: token_mean, sequence_mean, constant")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) per token, r = pi / pi_old, aggregated
    over the real tokens (`aggregate`); eps_high = eps_low unless given (DAPO's clip-higher)."""
    high = clip_range if clip_range_high is None else clip_range_high
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    with torch.no_grad():
        stats = {
            "policy/approxkl": 0.5 * masked_mean(logratio**2, mask),
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 mean max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) over real tokens."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens (1 is perfect, 0 is no better than a constant)."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


class RunningMoments:
    """Running mean and (population) std of a stream of batches: Chan et al.'s parallel update."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / (self.std + 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


# --- the critic-free estimators: a baseline from the prompt's group, returns to go, no value function ---------


def group_advantages(scores: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """Each episode's sequence-level advantage from the scores of its group (the k completions of its prompt): the
    estimator's `baseline` (components/config/estimators.py)."""
    baseline = ESTIMATORS[estimator].baseline if estimator in ESTIMATORS else None
    if baseline is None:
        raise ValueError(f"{estimator!r} is not a critic-free advantage estimator")
    return baseline(scores.view(-1, k)).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{t' >= t} gamma^(t' - t) r_t' over each row's real tokens (REINFORCE's return)."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def group_stats(scores: torch.Tensor, k: int) -> dict[str, float]:
    """What a group method learns from: the share of groups whose scores are all equal (their advantages are 0: they
    teach nothing; TRL's frac_reward_zero_std) and the mean within-group std of the scores (TRL's reward_std)."""
    std = scores.view(-1, k).std(1)
    return {"group/frac_score_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item(),
            "group/score_std": std.mean().item()}


# --- the advantage estimator, dispatched on its registry entry ----------------------------------


def estimate_advantages(experience, rl) -> None:
    """Set `experience.advantages` (and `.returns`, the critic's targets, with a critic) as `rl.advantage_estimator`'s
    entry in components/config/estimators.py says:
    no group baseline (gae): GAE over the per-token rewards and the critic's values (PPO, Schulman et al. 2016), then,
      with `rl.whiten_advantages`, normalised over the batch's real tokens;
    a group baseline: the score's group advantage (`group_advantages`) on the last token plus the per-token KL rewards
      (with `rl.kl_placement: reward`), returned to go; then whitened over the batch's real tokens where the entry
      `whitens` (the REINFORCE++ ones, Hu et al. 2025)."""
    mask, estimator = experience.mask, rl.estimator
    if estimator.baseline is None:
        advantages, experience.returns = compute_gae(experience.rewards, experience.values, mask, rl.gamma, rl.gae_lambda)
        whiten = rl.whiten_advantages
    else:
        scores = experience.shaped_scores
        kl_rewards = experience.rewards - on_last_token(scores, mask)  # 0 with the KL in the loss
        baselined = group_advantages(scores, rl.samples_per_prompt, estimator.name)
        advantages = returns_to_go(kl_rewards + on_last_token(baselined, mask), mask, rl.gamma)
        experience.returns, whiten = None, estimator.whitens
    experience.advantages = masked_whiten(advantages, mask) if whiten else advantages
