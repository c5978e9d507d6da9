"""The RL engine: actor, critic, reference and reward model; experience making apart from learning.

    experience.py   prompts -> samples, log-probs, reference log-probs, values, scores, per-token rewards
    core.py         the math on tensors, and the advantage (`estimate_advantages`, dispatched on the estimator's entry
                    in components/config/estimators.py)
    learner.py      the clipped policy loss (+ value loss), the optimizer steps
    trainer.py      one iteration = experience -> advantages -> learning -> KL control; `build_trainer`
    state.py        checkpoints and the exported policy
    tokenization.py prompts rendered and tokenized, the EOS and pad ids, samples decoded to text
    sampler.py      our KV-cache sampling loop: token ids -> `Samples` (responses, their log-probs and values)
    forward.py      whole-sequence forwards: hidden states, logits and log-probs of the response positions
    generation.py   completions as text (`generate`) and `sequence_kl`, for the evaluation and the demo kit
    roles.py        the value head, the separate critic, the reference of a LoRA policy, backbone helpers
    build.py        a run built from its configuration: models located and checked, loaded, the trainer built
    packing.py, precision.py, distributed.py, kl_controller.py, progress.py, launch.py, launcher.py

The atomic writes under its checkpoints are components/checkpoint.py, which the reward-model stage uses too.

No Prefect, no MLflow: `Trainer.train(..., callback=...)` hands each iteration's statistics to the caller.
"""

from components.errors import TrainingError
from components.rl.experience import Experience
from components.rl.generation import Completions, generate, sequence_kl
from components.rl.kl_controller import AdaptiveKLController, FixedKLController
from components.rl.sampler import Samples
from components.rl.tokenization import PromptError
from components.rl.trainer import Trainer, TrainResult, build_trainer

__all__ = [
    "AdaptiveKLController",
    "Completions",
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
