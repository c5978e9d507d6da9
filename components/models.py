"""Loading the models a run needs: local paths or hub ids via `from_pretrained`, in float32.

MLflow `models:/` URIs are resolved to local paths by the caller, not here.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def _check_local_ref(name_or_path: str) -> None:
    if str(name_or_path).startswith("models:"):
        raise ValueError(f"{name_or_path!r} is a registry URI; resolve it to a local path before loading")


def load_tokenizer(
    name_or_path: str, revision: str | None = None, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (falls back to EOS) and the given padding side (left for causal LMs)."""
    _check_local_ref(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name_or_path: str, revision: str | None = None) -> PreTrainedModel:
    """A causal LM in float32 and eval mode (dropout off: rollout and update log-probs must agree)."""
    _check_local_ref(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), revision=revision, dtype=torch.float32)
    return model.eval()


def load_reward_model(name_or_path: str, revision: str | None = None) -> PreTrainedModel:
    """A sequence classifier in float32, eval mode, frozen. Its pad_token_id is set (from EOS if needed)
    so decoder reward models can find each row's last real token."""
    _check_local_ref(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), revision=revision, dtype=torch.float32)
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.requires_grad_(False)
    return model.eval()
