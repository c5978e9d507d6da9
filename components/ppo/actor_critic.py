"""The actor (policy LM) and the critic (a value head), split so one backbone pass serves both.

A causal LM is a backbone (token ids -> last hidden states) plus an LM head (hidden -> logits).
Calling them separately lets the engine
  * read logits AND values from the same hidden states (the shared value head), and
  * apply the LM head only at the positions whose next token matters (the response), which
    skips the vocabulary projection over the prompt.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel


class ValueHead(nn.Linear):
    """V(s_t) = w . h_t + b, read from the last hidden state. Zero-initialised: V starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1)


def hidden_size(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT (LoRA) wrapper, with its adapter layers injected; else the model."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def backbone_of(model: PreTrainedModel) -> nn.Module:
    """The transformer body of a causal LM (e.g. GPT2LMHeadModel.transformer, LlamaForCausalLM.model)."""
    model = unwrap(model)
    body = model.base_model
    if body is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model_prefix is not set)")
    return body


def lm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to hidden states, with the final-logit transforms some families use."""
    model = unwrap(model)
    logits = model.get_output_embeddings()(hidden)
    scale = getattr(model.config, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _cache_kwarg(backbone: nn.Module) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_backbone(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Last hidden states (B, T, H). With `cache`, the cache is extended in place."""
    kwargs = {_cache_kwarg(backbone): cache, "use_cache": cache is not None}
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out.last_hidden_state


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the reference policy."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class Critic(nn.Module):
    """A separate critic: a backbone (AutoModel) plus a value head."""

    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = ValueHead(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.value_head(run_backbone(self.backbone, input_ids, attention_mask, position_ids))
