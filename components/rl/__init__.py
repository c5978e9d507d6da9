"""The RL engine: actor, critic, reference and reward model; experience making apart from learning.

    experience.py   prompts -> samples, log-probs, reference log-probs, values, scores, per-token rewards
    core.py         the math on tensors, and the advantage estimator (one switch, `estimate_advantages`)
    learner.py      the clipped policy loss (+ value loss), the optimizer steps
    trainer.py      one iteration = experience -> advantages -> learning -> KL control; `build_trainer`
    state.py        checkpoints and the exported policy
    rollout.py      our KV-cache sampling loop, prompt rendering; generate / sequence_kl for the evaluation
    roles.py        the value head, the separate critic, the reference of a LoRA policy, backbone helpers
    packing.py, distributed.py, kl_controller.py, progress.py, launch.py, launcher.py

The atomic writes under its checkpoints are components/checkpoint.py, which the reward-model stage uses too.

No Prefect, no MLflow: `Trainer.train(..., callback=...)` hands each iteration's statistics to the caller.
"""

from components.errors import TrainingError
from components.rl.experience import Experience
from components.rl.kl_controller import AdaptiveKLController, FixedKLController
from components.rl.rollout import PromptError, Samples, generate, sequence_kl
from components.rl.trainer import Trainer, TrainResult, build_trainer

__all__ = [
    "AdaptiveKLController",
    "Experience",
    "FixedKLController",
    "PromptError",
    "Samples",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_trainer",
    "generate",
    "sequence_kl",
]
