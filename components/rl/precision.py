"""Precision per role and activation checkpointing (`memory.*` in the run configuration).

* The frozen models (reference, reward model, judge, a LoRA policy's base) are stored in `memory.frozen_dtype`.
* The trained models (policy, critic) are stored in float32 and run their forwards under autocast
  (`bf16_mixed`, `fp16_mixed`: float32 master weights and AdamW state; fp16 with a dynamic loss scale), or are
  stored in bfloat16 (`bfloat16`: weights and AdamW state alike).
* Whatever the weights' precision, the logits are cast to float32 before the log-softmax, and log-probabilities,
  KL, advantages and losses are computed in float32 (core.py): in bf16 a log-probability near -10 is only known
  to 0.06, which biases the ratio and the KL (`test_precision.py` shows it).
* Under mixed or bf16 precision the rollout's log-probabilities are recomputed with the update's own forward
  (the whole sequence at once, not token by token through the KV cache), so the ratio starts at exactly 1.

Activation checkpointing keeps each transformer layer's input only and recomputes the layer in the backward,
through transformers' own `GradientCheckpointingLayer`; the layers are switched on for the update only, so dropout
stays off everywhere and sampling runs as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from components.config import ConfigError, MemoryConfig


def check_precision(memory: MemoryConfig, device: torch.device | str) -> None:
    """Refuse a precision the device cannot run, naming the key: fp16 on a CPU (no fast fp16 kernels, and no
    loss scaler for it), bf16 on a GPU without it (before Ampere)."""
    device = torch.device(device)
    wants = {"memory.frozen_dtype": memory.frozen_dtype, "memory.trained_precision": memory.trained_precision}
    for key, value in wants.items():
        half = value in ("float16", "fp16_mixed")
        brain = value in ("bfloat16", "bf16_mixed")
        if half and device.type == "cpu":
            raise ConfigError(f"{key}={value}: float16 does not run on the CPU (no fp16 kernels or loss scaling "
                              "there); use bfloat16 or bf16_mixed, or float32")
        if brain and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{key}={value}: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; "
                              "use float16 / fp16_mixed, or float32")


def autocast(device: torch.device, memory: MemoryConfig | None) -> contextlib.AbstractContextManager:
    """The trained models' forwards: under autocast in the mixed precisions, else as stored."""
    dtype = memory.autocast_dtype if memory is not None else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, memory: MemoryConfig | None) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scale (fp16 gradients underflow without it); None otherwise."""
    if memory is None or memory.trained_precision != "fp16_mixed":
        return None
    return torch.amp.GradScaler(device.type)


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers that transformers can checkpoint (`GradientCheckpointingLayer`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model: torch.nn.Module, key: str) -> int:
    """Arm transformers' checkpointing of `model`'s layers (non-reentrant torch.utils.checkpoint); it acts only inside
    `checkpointing`. Returns the number of layers; a model without any is refused, naming `key`."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    layers = checkpointed_layers(model)
    if not layers:
        raise ConfigError(f"memory.activation_checkpointing: {key} ({type(model).__name__}) has no layers transformers "
                          "can checkpoint; set memory.activation_checkpointing to false")
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    return len(layers)


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, armed layers checkpoint their forwards under autograd. transformers checks the layer's own
    `training` flag, so only the layers' flags are set (their dropout modules keep theirs: off), and restored after."""
    layers = [m for m in checkpointed_layers(model) if m.gradient_checkpointing]
    before = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.training = flag
