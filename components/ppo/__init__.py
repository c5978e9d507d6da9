"""The PPO engine: actor/critic, reference and reward model; experience making separate from learning.

No Prefect, no MLflow: `PPOTrainer.train(..., callback=...)` hands each iteration's statistics to the caller.
"""

from components.ppo.kl_controller import AdaptiveKLController, FixedKLController
from components.ppo.rollout import PromptError, Samples, generate, sequence_kl
from components.ppo.trainer import Experience, PPOError, PPOTrainer, TrainResult

__all__ = [
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "PPOError",
    "PPOTrainer",
    "PromptError",
    "Samples",
    "TrainResult",
    "generate",
    "sequence_kl",
]
