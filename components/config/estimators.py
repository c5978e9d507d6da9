"""The advantage estimators: one entry per algorithm, and everything alignflow knows of it is its entry.

    the configuration   rl.advantage_estimator's choices, the critic it needs (critic.type), the fewest samples per
                        prompt, the defaults of rl.kl_placement, rl.kl_estimator and rl.loss_aggregation, the algorithm's
                        name in tags and listings (components/config/training.py, policy.py)
    the engine          the advantage itself (components/rl/core.py, `estimate_advantages`, dispatches on the entry)
    the README          the algorithm table ("Critic-free RL") is `markdown_table()`; tests/code/test_estimators.py
                        compares them

An algorithm is added by adding an entry. A group estimator's `baseline` takes the scores of the batch's groups, a
(prompts x k) tensor whose row holds the k completions of one prompt, and gives each completion its sequence-level
advantage; it uses tensor methods only, so the configuration can import this module without torch. `baseline` None is
GAE over the critic's values (PPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Estimator:
    name: str  # rl.advantage_estimator's value
    algorithm: str  # its algorithm's name: the tag alignflow.algorithm, `alignflow runs`, `alignflow models`
    summary: str  # a few words, for rl.advantage_estimator's description
    advantage: str  # the advantage of completion i of a group with scores s, in words (the README's table)
    paper: str
    needs_critic: bool
    min_samples_per_prompt: int  # the fewest rl.samples_per_prompt (k): a group estimator compares k >= 2 completions
    kl_estimator: str  # the defaults of rl.kl_estimator, rl.kl_placement and rl.loss_aggregation: as published
    kl_placement: str
    loss_aggregation: str
    baseline: Callable[[Any], Any] | None = None  # (prompts, k) scores -> (prompts, k) advantages; None: GAE
    whitens: bool = False  # its advantages are then whitened over the batch's real tokens (the REINFORCE++ ones)

    def critic_problem(self, critic_type: str) -> str | None:
        """Why `critic.type` cannot go with this estimator, naming both keys; None when it can."""
        if self.needs_critic and critic_type == "none":
            return (f"rl.advantage_estimator={self.name} needs a critic, but critic.type is none: set critic.type to "
                    "shared or separate")
        if not self.needs_critic and critic_type != "none":
            with_critic = " or ".join(e.name for e in ESTIMATORS.values() if e.needs_critic)
            return (f"rl.advantage_estimator={self.name} uses no critic, but critic.type is {critic_type}: set "
                    f"critic.type to none (or leave it unset), or use rl.advantage_estimator={with_critic}")
        return None


def _leave_one_out(groups):  # A_i = s_i - 1/(k-1) sum_{j != i} s_j (Ahmadian et al. 2024, eq. 9)
    return groups - (groups.sum(1, keepdim=True) - groups) / (groups.shape[1] - 1)


def _mean_and_std(groups):  # A_i = (s_i - mean(s)) / (std(s) + 1e-4) (Shao et al. 2024, sec. 4.1.2; TRL's epsilon)
    return (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)


def _mean(groups):  # A_i = s_i - mean(s) (Liu et al. 2025, eq. 3; Hu et al. 2025)
    return groups - groups.mean(1, keepdim=True)


def _score(groups):  # A_i = s_i: no baseline; the batch whitening centres it (Hu et al. 2025)
    return groups


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", "ppo", "PPO with a critic", "GAE over the per-token rewards and the critic's values",
              "Schulman et al. 2016", needs_critic=True, min_samples_per_prompt=1,
              kl_estimator="k1", kl_placement="reward", loss_aggregation="token_mean"),
    Estimator("rloo", "rloo", "leave-one-out group baseline", "s_i minus the mean of the other k - 1 scores",
              "Ahmadian et al. 2024", needs_critic=False, min_samples_per_prompt=2,
              kl_estimator="k1", kl_placement="reward", loss_aggregation="token_mean", baseline=_leave_one_out),
    Estimator("grpo", "grpo", "group mean and std", "(s_i - mean(s)) / (std(s) + 1e-4)",
              "Shao et al. 2024", needs_critic=False, min_samples_per_prompt=2,
              kl_estimator="k3", kl_placement="loss", loss_aggregation="sequence_mean", baseline=_mean_and_std),
    Estimator("dr_grpo", "dr_grpo", "group mean, constant loss normalisation", "s_i - mean(s), no std division",
              "Liu et al. 2025", needs_critic=False, min_samples_per_prompt=2,
              kl_estimator="k3", kl_placement="loss", loss_aggregation="constant", baseline=_mean),
    Estimator("reinforce_pp", "reinforce_pp", "batch-whitened returns", "s_i, then whitened over the batch",
              "Hu et al. 2025", needs_critic=False, min_samples_per_prompt=1,
              kl_estimator="k1", kl_placement="reward", loss_aggregation="token_mean", baseline=_score, whitens=True),
    Estimator("reinforce_pp_baseline", "reinforce_pp_baseline", "group mean, then batch-whitened",
              "s_i - mean(s), then whitened over the batch", "Hu et al. 2025", needs_critic=False,
              min_samples_per_prompt=2, kl_estimator="k2", kl_placement="loss", loss_aggregation="token_mean",
              baseline=_mean, whitens=True),
)}


def description() -> str:
    """rl.advantage_estimator's one-line description."""
    with_critic = [e.name for e in ESTIMATORS.values() if e.needs_critic]
    return ("; ".join(f"{e.name}: {e.summary}" for e in ESTIMATORS.values())
            + f". Only {', '.join(with_critic)} needs a critic (components/config/estimators.py).")


def markdown_table() -> str:
    """The README's algorithm table, row for row."""
    rows = ["| `rl.advantage_estimator` | the advantage of completion i of a group with scores s "
            "(`components/config/estimators.py`) | KL (estimator, placement) | loss aggregation | k |", "|---|---|---|---|---|"]
    for e in ESTIMATORS.values():
        name = f"`{e.name}`" + (f" ({e.algorithm.upper()})" if e.algorithm != e.name else "")
        rows.append(f"| {name} | {e.advantage} ({e.paper}) | {e.kl_estimator}, {e.kl_placement} | "
                    f"{e.loss_aggregation.replace('_', ' ')} | >= {e.min_samples_per_prompt} |")
    return "\n".join(rows)
