"""The algorithms the time-to-quality benchmark runs, and what each side sets for them: ONE table.

Standard library only: the TRL workers load this file by path from their own virtual environments.

`ALGORITHMS[name]` says, for one algorithm:
  samples_per_prompt  "k" (a group method: k completions of each prompt, the harness's --k) or 1
  critic              whether the algorithm trains a value model
  alignflow           the engine's rl.* settings for it, on top of the workload's (lr, batch, KL coefficient ...).
                      PPO needs none: it runs the engine as it is today. The critic-free estimators use the keys the
                      engine redesign is adding (names may still change: change them HERE and nowhere else):
                        advantage_estimator  gae|rloo|grpo|dr_grpo|reinforce_pp|reinforce_pp_baseline
                        samples_per_prompt   k
                        kl_estimator         k1|k2|k3
                        kl_placement         reward (a penalty in the reward) | loss (a term of the loss)
                        loss_aggregation     token_mean|sequence_mean|constant
                        clip_range, clip_range_high  the ratio's clip range (low, high)
                      An engine whose config refuses these keys does not have the algorithm: the alignflow worker
                      reports it unavailable and the harness skips it, saying so (`alignflow_worker.probe`).
  trl                 (venv, trainer, settings) of TRL's peer, or None where TRL has no such trainer.
  differs             where the two sides differ by design (written into the results).

Settings chosen to do what TRL's trainer does, so that equal episodes compare implementations, not algorithms:
  rloo     TRL 1.16 RLOOTrainer: leave-one-out baseline of the k rewards, the KL penalty k1 summed over the
           completion and taken off the reward (beta), PPO clip on the SEQUENCE's probability ratio, loss the mean
           over sequences. No advantage normalisation (RLOOConfig.normalize_advantages=False).
  grpo     TRL 1.16 GRPOTrainer with loss_type="grpo" (the paper's: token losses averaged per sequence, then over
           sequences) and scale_rewards="group" (advantage = (r - group mean) / group std); KL k3 in the loss with
           coefficient beta. TRL's default loss_type is "dapo" (token mean over the batch); "grpo" is GRPO as
           published, which is what the name promises.
  dr_grpo  GRPOTrainer with loss_type="dr_grpo" (token losses summed, divided by batch x max_completion_length)
           and scale_rewards="none" (Dr. GRPO: no std scaling, no length normalisation).
  reinforce_pp, reinforce_pp_baseline: REINFORCE++ (Hu et al. 2025) as OpenRLHF runs it: batch-normalised
           advantages, KL k1 in the reward; the baseline variant subtracts the group mean and puts k2 in the loss.
           TRL has no such trainer: alignflow only.
"""

from __future__ import annotations

TRL_PPO_VENV = "trl-1.12.0"  # benchmarks/.venv-trl
TRL_GROUP_VENV = "trl-1.16.0"  # benchmarks/.venv-trl116

CLIP = {"clip_range": 0.2, "clip_range_high": 0.2}  # TRL's epsilon=0.2, epsilon_high unset (= epsilon)

ALGORITHMS: dict[str, dict] = {
    "ppo": {
        "samples_per_prompt": 1,
        "critic": True,
        "alignflow": {},
        "trl": (TRL_PPO_VENV, "PPOTrainer", {}),
        "differs": "TRL scores token ids, alignflow re-tokenizes the text (benchmarks/ppo_vs_trl.py says more)",
    },
    "rloo": {
        "samples_per_prompt": "k",
        "critic": False,
        "alignflow": {"advantage_estimator": "rloo", "kl_estimator": "k1", "kl_placement": "reward",
                      "loss_aggregation": "sequence_mean", **CLIP},
        "trl": (TRL_GROUP_VENV, "RLOOTrainer", {}),
        "differs": "TRL clips the sequence's probability ratio (exp of the summed token log-ratios) and weights a "
        "sequence by its summed log-probability; alignflow's loss is per token, aggregated per sequence",
    },
    "grpo": {
        "samples_per_prompt": "k",
        "critic": False,
        "alignflow": {"advantage_estimator": "grpo", "kl_estimator": "k3", "kl_placement": "loss",
                      "loss_aggregation": "sequence_mean", **CLIP},
        "trl": (TRL_GROUP_VENV, "GRPOTrainer", {"loss_type": "grpo", "scale_rewards": "group"}),
        "differs": "TRL multiplies the k3 KL term by the probability ratio (use_bias_correction_kl=True, its default)",
    },
    "dr_grpo": {
        "samples_per_prompt": "k",
        "critic": False,
        "alignflow": {"advantage_estimator": "dr_grpo", "kl_estimator": "k3", "kl_placement": "loss",
                      "loss_aggregation": "constant", **CLIP},
        "trl": (TRL_GROUP_VENV, "GRPOTrainer", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
        "differs": "as grpo",
    },
    "reinforce_pp": {
        "samples_per_prompt": 1,
        "critic": False,
        "alignflow": {"advantage_estimator": "reinforce_pp", "kl_estimator": "k1", "kl_placement": "reward",
                      "loss_aggregation": "token_mean", **CLIP},
        "trl": None,
        "differs": "no TRL trainer",
    },
    "reinforce_pp_baseline": {
        "samples_per_prompt": "k",
        "critic": False,
        "alignflow": {"advantage_estimator": "reinforce_pp_baseline", "kl_estimator": "k2", "kl_placement": "loss",
                      "loss_aggregation": "token_mean", **CLIP},
        "trl": None,
        "differs": "no TRL trainer",
    },
}


def samples_per_prompt(algorithm: str, k: int) -> int:
    value = ALGORITHMS[algorithm]["samples_per_prompt"]
    return k if value == "k" else int(value)


def alignflow_settings(algorithm: str, k: int) -> dict:
    """{"rl": the engine's RLConfig keys beyond the workload's, "critic": trains a value model}.
    The workload's batch_size is the episodes (completions) per iteration, for every algorithm: k completions of
    batch_size / k prompts for a group method (the engine's rl.rollout_batch_size counts prompts)."""
    entry = ALGORITHMS[algorithm]
    rl = dict(entry["alignflow"])
    if rl:  # a critic-free estimator: the number of completions per prompt is part of it
        rl["samples_per_prompt"] = samples_per_prompt(algorithm, k)
    return {"rl": rl, "critic": entry["critic"]}


def trl_peer(algorithm: str) -> tuple[str, str, dict] | None:
    """(venv, trainer class, settings) of TRL's peer of `algorithm`, or None."""
    return ALGORITHMS[algorithm]["trl"]
