"""Loading the models a run needs: local paths or hub ids via `from_pretrained`, in float32.

MLflow `models:/` URIs are resolved to local paths by the caller, not here. Weights load from safetensors and no
model's own code runs (components/model_safety.py): `allow_pickle` (the config's `policy.allow_pickle` /
`reward.allow_pickle`) admits a pickle-only checkpoint; `key` names the model's config key in refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from components.model_safety import check_model_files, loading


def _check_local_ref(name_or_path: str) -> None:
    if str(name_or_path).startswith("models:"):
        raise ValueError(f"{name_or_path!r} is a registry URI; resolve it to a local path before loading")


def load_tokenizer(
    name_or_path: str, revision: str | None = None, padding_side: str = "left"
) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (falls back to EOS) and the given padding side (left for causal LMs)."""
    _check_local_ref(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name_or_path: str, revision: str | None = None, *, allow_pickle: bool = False,
                   key: str = "policy.model") -> PreTrainedModel:
    """A causal LM in float32 and eval mode (dropout off: rollout and update log-probs must agree)."""
    _check_local_ref(name_or_path)
    model = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForCausalLM.from_pretrained(
        str(name_or_path), revision=revision, dtype=torch.float32, **safe))
    return model.eval()


def load_seq2seq_lm(name_or_path: str, revision: str | None = None, *, allow_pickle: bool = False,
                    key: str = "policy.model") -> PreTrainedModel:
    """An encoder-decoder LM (T5, FLAN-T5, BART...) in float32 and eval mode."""
    _check_local_ref(name_or_path)
    model = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForSeq2SeqLM.from_pretrained(
        str(name_or_path), revision=revision, dtype=torch.float32, **safe))
    return model.eval()


def adapter_base(path: str | Path) -> str | None:
    """The base model of a saved LoRA adapter (a folder with adapter_config.json and no config.json), else None."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return None


def load_policy(name_or_path: str, revision: str | None = None, *, allow_pickle: bool = False,
                key: str = "policy.model") -> PreTrainedModel:
    """The policy LM: an encoder-decoder when its config says so (`is_encoder_decoder`), else a causal LM.
    A saved LoRA adapter (`lora.save_mode: adapter`) is loaded onto its base model and merged into it."""
    _check_local_ref(name_or_path)
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        base_model = load_policy(base, allow_pickle=allow_pickle, key=key)
        return loading(name_or_path, key, allow_pickle, lambda **safe: PeftModel.from_pretrained(
            base_model, str(name_or_path))).merge_and_unload().eval()
    check_model_files(name_or_path, key, allow_pickle)  # before the config is read: no remote code, no pickle-only weights
    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    if getattr(config, "is_encoder_decoder", False):
        return load_seq2seq_lm(name_or_path, revision, allow_pickle=allow_pickle, key=key)
    return load_causal_lm(name_or_path, revision, allow_pickle=allow_pickle, key=key)


def load_reward_model(name_or_path: str, revision: str | None = None, *, allow_pickle: bool = False,
                      key: str = "reward.model") -> PreTrainedModel:
    """A sequence classifier in float32, eval mode, frozen. Its pad_token_id is set (from EOS if needed)
    so decoder reward models can find each row's last real token."""
    _check_local_ref(name_or_path)
    model = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), revision=revision, dtype=torch.float32, **safe))
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.requires_grad_(False)
    return model.eval()


def fuse_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' `gelu_new` modules (GPT-2's tanh-approximate GELU, written as six tensor ops) for
    the same function as one PyTorch kernel (`gelu_pytorch_tanh`); equal to float rounding, several times
    faster on the CPU. Returns how many were swapped. The model's config, and so what it saves, is unchanged."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)
