"""The actor (policy LM) and the critic (a value head), split so one backbone pass serves both.

A causal LM is a backbone (token ids -> last hidden states) plus an LM head (hidden -> logits).
Calling them separately lets the engine
  * read logits AND values from the same hidden states (the shared value head), and
  * apply the LM head only at the positions whose next token matters (the response), which
    skips the vocabulary projection over the prompt.

An encoder-decoder (T5, BART; `config.is_encoder_decoder`) reads the prompt with its encoder and
writes the response with its decoder: every decoder position is a response position, so the model's
own forward gives the logits (with each family's output transforms) and the decoder's last hidden
state feeds the value head. `response_forward` is the one place the two kinds differ in training;
`decoding_steps` (sampler.py) is the one place they differ in sampling.

A LoRA policy's reference is the same model with its adapter switched off (`AdapterDisabled`), so the
base weights are held once.
"""

from __future__ import annotations

import copy
import copy as copy_module
import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from components.models.loading import hidden_size


class ValueHead(nn.Linear):
    """V(s_t) = w . h_t + b, read from the last hidden state. Zero-initialised: V starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # in the head's own dtype: a LoRA policy's base may run in bf16 while the head trains in float32
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1)


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The one-output linear head a sequence classifier applies to the last hidden state at the last token
    (`score` in GPT-2, Llama, Qwen, Mistral, GPT-NeoX...), or None."""
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear) and head.out_features == 1 and head.in_features == hidden_size(model):
        return head
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT (LoRA) wrapper, with its adapter layers injected; else the model."""
    if isinstance(model, AdapterDisabled):
        model = model.policy
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def is_encoder_decoder(model: nn.Module) -> bool:
    """From the model's config, not its name: T5, FLAN-T5, BART... are encoder-decoders."""
    return bool(getattr(unwrap(model).config, "is_encoder_decoder", False))


def decoder_start_token_id(model: nn.Module) -> int:
    """The token an encoder-decoder's decoder starts from (T5: pad, BART: eos)."""
    model = unwrap(model)
    for source in (model.config, getattr(model, "generation_config", None)):
        start = getattr(source, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError(f"{type(model).__name__} is an encoder-decoder without decoder_start_token_id in its config")


class AdapterDisabled:
    """The reference policy of a LoRA policy: the policy itself, run with its adapter switched off
    (`with policy.disable_adapter():`). Holds no weights of its own; attributes are the policy's.
    The engine's forward functions enter the switch through `running`."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def __getattr__(self, name: str):
        return getattr(self.policy, name)


@contextmanager
def running(model: nn.Module) -> Iterator[nn.Module]:
    """The model to call: for an `AdapterDisabled` reference, the policy with its adapter off for the block."""
    if isinstance(model, AdapterDisabled):
        with model.policy.disable_adapter():
            yield model.policy
    else:
        yield model


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
    """A deep copy in eval mode with gradients off: the reference policy of a full fine-tune."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def reference_of(policy: nn.Module) -> nn.Module | AdapterDisabled:
    """The reference policy: the LoRA policy with its adapter off (no copy), else a frozen copy."""
    if callable(getattr(policy, "disable_adapter", None)) and callable(getattr(policy, "get_base_model", None)):
        return AdapterDisabled(policy)
    return frozen_copy(policy)


def seq2seq_forward(
    model: nn.Module,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    encoder_outputs=None,
    cache=None,
):
    """An encoder-decoder's forward: (logits (B, T, V), decoder last hidden (B, T, H), cache).
    Give `input_ids` to run the encoder, or its `encoder_outputs` to reuse them."""
    model = unwrap(model)
    kwargs = {_cache_kwarg(model): cache, "use_cache": cache is not None}
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, encoder_outputs=encoder_outputs,
        decoder_input_ids=decoder_input_ids, output_hidden_states=True, **kwargs,
    )
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.logits, out.decoder_hidden_states[-1], new_cache


class Critic(nn.Module):
    """A separate critic: a backbone (AutoModel) plus a value head."""

    def __init__(self, backbone: nn.Module, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = ValueHead(hidden)

    @classmethod
    def of(cls, module: nn.Module, copy: bool = False) -> "Critic":
        """A critic from a model: a reward model (its scoring head starts the value head), an LM or classifier (its
        backbone), or a backbone itself. `copy`: of a copy (a critic from the policy's own backbone)."""
        if copy:
            module = copy_module.deepcopy(module)
        if isinstance(module, Critic):
            return module
        if classifier_head(module) is not None:
            return cls.from_classifier(module)
        if isinstance(module, PreTrainedModel) and module.base_model is not module:
            module = module.base_model
        return cls(module, hidden_size(module))

    @classmethod
    def from_classifier(cls, model: PreTrainedModel) -> "Critic":
        """A critic from a one-output sequence classifier (a reward model), keeping its scoring head: V(s_t) starts
        as the reward model's score of the text up to t, so the critic predicts the final score from the first
        iteration (TRL and OpenRLHF initialise their critic from the reward model too). A classifier whose head
        is not one linear map of the last hidden state (a pooler, a dense layer first) keeps only its backbone."""
        critic = cls(model.base_model, hidden_size(model))
        head = classifier_head(model)
        if head is not None:
            with torch.no_grad():
                critic.value_head.weight.copy_(head.weight)
                if head.bias is not None:
                    critic.value_head.bias.copy_(head.bias)
        return critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.value_head(run_backbone(self.backbone, input_ids, attention_mask, position_ids))
