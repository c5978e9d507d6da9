"""PPO's math on plain tensors. Shapes: B episodes x T response tokens; `mask` is 1 on real tokens.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 and
Stiennon et al. 2020 (the per-token KL penalty with the score on the last token).
"""

from __future__ import annotations

import math

import torch


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


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef (log pi(a_t) - log pi_ref(a_t)) on every real token, + score on the last real one.

    Returns (rewards, kl) with kl the per-token log-ratio (0 on padding).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
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


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
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


# --- the advantage estimator, chosen in this one place ------------------------------------------


def estimate_advantages(experience, rl) -> None:
    """Set `experience.advantages` (and `.returns`, the critic's targets) with `rl.advantage_estimator`:
    gae: GAE over the per-token rewards and the critic's values (PPO, Schulman et al. 2016);
    then, with `rl.whiten_advantages`, normalised over the batch's real tokens."""
    mask = experience.mask
    if rl.advantage_estimator == "gae":
        experience.advantages, experience.returns = compute_gae(experience.rewards, experience.values, mask, rl.gamma,
                                                                rl.gae_lambda)
    else:
        raise ValueError(f"rl.advantage_estimator={rl.advantage_estimator!r} is not one this engine has")
    if rl.whiten_advantages:
        experience.advantages = masked_whiten(experience.advantages, mask)
