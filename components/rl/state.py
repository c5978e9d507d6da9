"""A trainer's state on disk: checkpoints that resume exactly, and the policy exported for registration.

A checkpoint holds the trainable weights (the policy's, or its LoRA adapter's; the value head's or the critic's),
the optimizer and scheduler, the KL controller, the score statistics, every RNG, the counters and every iteration's
statistics, written atomically (checkpoint.write_atomically). Its content does not depend on the process count or on
sharding: under FSDP every rank takes part in gathering the full state, and the main process writes it.
"""

from __future__ import annotations

import copy
import json
import random
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from components.config import ConfigError
from components.rl import distributed
from components.checkpoint import resolve_checkpoint, write_atomically

if TYPE_CHECKING:
    from components.rl.trainer import Trainer


def save_checkpoint(trainer: "Trainer", directory: str | Path) -> Path:
    """Write the trainer's state atomically; under N processes only the main one writes (the state is the same on
    every rank), after all have taken part in gathering sharded weights, and all return once it is written."""
    weights = _full_weights(trainer)
    if distributed.is_main_process():
        path = write_atomically(directory, lambda tmp: _write(trainer, tmp, *weights))
    else:
        path = None
    distributed.barrier()
    return path if path is not None else Path(directory)


def _head(trainer: "Trainer") -> torch.nn.Module | None:
    return trainer.value_head if trainer.value_head is not None else trainer.critic


def _head_name(trainer: "Trainer") -> str:
    return "value_head" if trainer.value_head is not None else "critic"


def _full_weights(trainer: "Trainer") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict,
                                                dict | None]:
    """(policy's trainable weights, value head's or critic's weights, optimizer state, loss scaler state) as one
    process holds them. Unsharded, the head's weights are None: `save_model` writes the module itself (it drops tied
    duplicates). Sharded, a collective whose result only the main process gets."""
    model_state, optimizer_state, scaler_state = trainer.learner.state()
    if model_state is None:
        return trainable_state(trainer.policy), None, optimizer_state, scaler_state
    if not model_state:
        return {}, {}, {}, None
    prefix = f"{_head_name(trainer)}."
    policy = {name: model_state[f"policy.{name}"].contiguous() for name in trainable_names(trainer.policy)}
    head = {name[len(prefix):]: value.contiguous() for name, value in model_state.items() if name.startswith(prefix)}
    return policy, head, optimizer_state, scaler_state


def _write(trainer: "Trainer", path: Path, policy: dict, head: dict | None, optimizer: dict,
           grad_scaler: dict | None) -> None:
    save_file(policy, str(path / "policy.safetensors"))
    if _head(trainer) is not None:
        if head is None:
            save_model(_head(trainer), str(path / "value.safetensors"))
        else:
            save_file(head, str(path / "value.safetensors"))
    np_state = np.random.get_state()
    torch.save(
        {
            "optimizer": optimizer,
            "scheduler": trainer.scheduler.state_dict(),
            # fp16_mixed's loss scale and its growth tracker: a resumed run scales its losses as the uninterrupted one
            "grad_scaler": grad_scaler,
            "rng": {
                "python": random.getstate(),
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "torch": torch.get_rng_state(),
                "sample": trainer.sample_generator.get_state(),
                "shuffle": trainer.shuffle_generator.get_state(),
                "prompt": trainer.prompt_generator.get_state(),
            },
        },
        path / "trainer_state.pt",
    )
    state = {
        "iteration": trainer.iteration,
        "episodes": trainer.episodes,
        "recent_scores": list(trainer.recent_scores),
        "kl_controller": trainer.kl_ctl.state_dict(),
        "score_moments": trainer.experience_maker.score_moments.state_dict(),
        "prompt_order": trainer.prompt_order,
        "prompt_cursor": trainer.prompt_cursor,
        "history": trainer.history,
        "critic": trainer.critic_type,
        "rl": trainer.rl.model_dump(mode="json"),
        "generation": trainer.generation.model_dump(mode="json"),
        "reward": trainer.reward.model_dump(mode="json"),
        "memory": trainer.memory.model_dump(mode="json"),
    }
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(trainer: "Trainer", directory: str | Path) -> None:
    """Load a checkpoint into a trainer built around the STARTING policy (so the reference is the starting policy)."""
    path = resolve_checkpoint(directory)
    state = json.loads((path / "trainer_state.json").read_text())
    saved_critic = state.get("critic", {"shared": "shared", "separate": "separate"}.get(state.get("value_head"), "shared"))
    if saved_critic != trainer.critic_type:
        raise ConfigError(f"checkpoint {path} has critic.type {saved_critic}, this run {trainer.critic_type}: resume with "
                          f"the configuration the run started with")
    policy = load_file(str(path / "policy.safetensors"), device=str(trainer.device))
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    head = _head(trainer)
    weights = None
    if trainer.learner.sharded:
        check_trainable_state(trainer.policy, policy, path)
        weights = {f"policy.{name}": value for name, value in policy.items()}
        if head is not None:
            head_state = load_file(str(path / "value.safetensors"), device=str(trainer.device))
            if set(head_state) != set(head.state_dict()):
                raise ConfigError(f"checkpoint {path} does not hold this trainer's {_head_name(trainer)} weights: "
                                  f"{sorted(head_state)[:3]}...")
            weights.update({f"{_head_name(trainer)}.{name}": value for name, value in head_state.items()})
    else:
        load_trainable_state(trainer.policy, policy, path)
        if head is not None:
            load_model(head, str(path / "value.safetensors"), device=str(trainer.device))
    trainer.learner.load_state(weights, blob["optimizer"], blob.get("grad_scaler"))
    trainer.scheduler.load_state_dict(blob["scheduler"])
    rng = blob["rng"]
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    trainer.sample_generator.set_state(rng["sample"])
    trainer.shuffle_generator.set_state(rng["shuffle"])
    trainer.prompt_generator.set_state(rng["prompt"])
    trainer.iteration, trainer.episodes = int(state["iteration"]), int(state["episodes"])
    trainer.recent_scores = deque(state["recent_scores"], maxlen=trainer.rl.target_window)
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.experience_maker.score_moments.load_state_dict(state["score_moments"])
    trainer.prompt_order, trainer.prompt_cursor = list(state["prompt_order"]), int(state["prompt_cursor"])
    trainer.history = list(state.get("history", []))


def export_policy(policy: torch.nn.Module, tokenizer, directory: str | Path, merge: bool = True) -> Path:
    """The policy LM (without value head) and tokenizer, via save_pretrained, for registration. A LoRA policy is
    saved merged into its base weights (`merge=True`, a plain model), or as the adapter alone (`merge=False`,
    `policy.lora.save_mode: adapter`), which needs its base model to load."""

    def write(path: Path) -> None:
        model = policy
        if merge and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    return write_atomically(directory, write)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that training changes: every parameter of a full fine-tune, the adapter of a LoRA policy."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def check_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = set(trainable_names(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(
            f"checkpoint {source} does not hold this policy's trainable weights (LoRA or full fine-tune, same model?): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    check_trainable_state(model, state, source)
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, tensor in state.items():
            parameters[name].copy_(tensor)
