"""Loading the models a run needs: local paths or hub ids via `from_pretrained`, in float32 unless the run's
`memory` section asks for bfloat16 or float16 (`dtype`).

`locate(key, ref)` turns a configured reference into what `from_pretrained` takes, or fails at once naming the key:
a local directory (relative paths are relative to the project root), a registry URI (`models:/NAME@ALIAS`, resolved
to a local copy), or a hub id found in the local hub cache or answering on the hub. A model whose weights do not
cover it (a head that `from_pretrained` would initialise at random, e.g. a causal LM given as a reward model) is
refused by the loaders, naming the key and the missing weights. Weights load from safetensors and no model's own
code runs (components/models/safety.py): `allow_pickle` (`policy.allow_pickle`, `critic.allow_pickle`,
`reward.allow_pickle`) admits a pickle-only checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
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


from components.config import ConfigError, PROJECT_ROOT
from components.errors import UserError
from components.models.safety import check_model_files, loading
from components.models.uris import ModelURIError, adapter_base, resolve_model_uri

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelLoadError(UserError):
    """A configured model that cannot be found or used; the message names its configuration key."""


def locate(key: str, ref: str, revision: str | None = None, root: Path = PROJECT_ROOT) -> str:
    """The model URI `key` holds, as `from_pretrained` takes it, checked before anything is loaded."""
    if ref.startswith("models:"):
        try:
            return resolve_model_uri(ref)
        except ModelURIError as exc:
            raise ModelLoadError(f"{key}: {exc}") from None
    path = Path(ref).expanduser()
    local = path if path.is_absolute() else root / path
    if local.is_dir():
        if not ((local / "config.json").is_file() or (local / "adapter_config.json").is_file()):
            raise ModelLoadError(f"{key}: {local} is a directory but holds no saved model (no config.json or "
                                 "adapter_config.json, as save_pretrained writes)")
        return str(local)
    if local.exists():  # a file (a weights file, a config.json, an archive): not what from_pretrained loads
        holder = local.parent if (local.parent / "config.json").is_file() or (local.parent / "adapter_config.json").is_file() else None
        hint = (f": point {key} at its folder, {holder}" if holder is not None else
                ": point it at the folder save_pretrained wrote (config.json and the weights beside it)")
        raise ModelLoadError(f"{key}: {local} is a file, not a model folder{hint}")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or not _HUB_ID.match(ref)
    if looks_local:
        raise ModelLoadError(f"{key}: {ref!r} is neither a local directory ({local} does not exist) nor a hub id")
    why = _hub_problem(ref, revision)
    if why is not None:
        raise ModelLoadError(f"{key}: {ref!r} is neither a local directory ({local} does not exist) nor a hub id "
                             f"that can be reached: {why}")
    return ref


def with_models(config, rewrite):
    """The configuration with its model URIs (policy, reward model, critic, judge) passed through `rewrite(key, ref)`."""
    critic, judge = config.critic.model, config.judge
    return config.model_copy(update={
        "policy": config.policy.model_copy(update={"model": rewrite("policy.model", config.policy.model)}),
        "critic": config.critic.model_copy(update={"model": None if critic is None else rewrite("critic.model", critic)}),
        "reward": config.reward.model_copy(update={"model": rewrite("reward.model", config.reward.model)}),
        "judge": None if judge is None else judge.model_copy(update={"model": rewrite("judge.model", judge.model)}),
    })


def resolved_models(config):
    """The run configuration with every model URI as this machine loads it (checked, registry URIs downloaded):
    what the pipeline's first task, `alignflow plan` and each machine of a launch load."""
    return with_models(config, lambda key, ref: locate(key, ref, _revision(config, key)))


def _revision(config, key: str) -> str | None:
    if key == "judge.model":
        return config.judge.revision
    return config.reward.revision if key == "reward.model" else config.policy.revision


def tokenizer_fingerprint(ref: str) -> str:
    """What identifies a tokenizer: the md5 of a local directory's tokenizer files, else the hub id."""
    import hashlib

    path = Path(ref)
    if not path.is_dir():
        return ref
    digest = hashlib.md5()
    for item in sorted(path.iterdir()):
        if item.is_file() and item.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
            digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()


def _hub_problem(repo_id: str, revision: str | None) -> str | None:
    """Why the hub model `repo_id` cannot be loaded from here, or None. One request, no retries: an unreachable hub
    is reported in seconds, not after the minutes of retries `from_pretrained` would spend."""
    import httpx
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in ("config.json", "adapter_config.json"):
        if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
            return None
    if constants.HF_HUB_OFFLINE:
        return "it is not in the local hub cache and HF_HUB_OFFLINE is set"
    url = f"{constants.ENDPOINT}/api/models/{repo_id}" + (f"/revision/{revision}" if revision else "")
    token = os.environ.get("HF_TOKEN")
    try:
        answer = httpx.head(url, timeout=10, follow_redirects=True,
                            headers={"Authorization": f"Bearer {token}"} if token else None)
    except httpx.HTTPError as exc:
        return f"the hub at {constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {exc})"
    if answer.status_code in (401, 403):
        return "the hub refuses access (a private or gated model: set HF_TOKEN)"
    if answer.status_code == 404:
        return f"the hub has no model {repo_id}" + (f" at revision {revision}" if revision else "")
    if answer.status_code >= 400:
        return f"the hub answered {answer.status_code}"
    return None


def _check_local_ref(name_or_path: str) -> None:
    if str(name_or_path).startswith("models:"):
        raise ValueError(f"{name_or_path!r} is a registry URI; resolve it to a local path before loading")


def _refuse_missing_weights(key: str, name_or_path: str, info: dict, what: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{key}: {name_or_path} is not {what}: its weights lack {shown}, which would be initialised at random on "
            "load. Point the key at a model trained for this role."
        )


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


def load_causal_lm(name_or_path: str, revision: str | None = None, key: str = "policy.model", *,
                   allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM in `dtype` (float32 by default) and eval mode (dropout off: rollout and update log-probs must agree)."""
    _check_local_ref(name_or_path)
    model, info = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForCausalLM.from_pretrained(
        str(name_or_path), revision=revision, dtype=dtype, output_loading_info=True, **safe))
    _refuse_missing_weights(key, name_or_path, info, "a complete causal language model")
    return model.eval()


def load_seq2seq_lm(name_or_path: str, revision: str | None = None, key: str = "policy.model", *,
                    allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An encoder-decoder LM (T5, FLAN-T5, BART...) in `dtype` and eval mode."""
    _check_local_ref(name_or_path)
    model, info = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForSeq2SeqLM.from_pretrained(
        str(name_or_path), revision=revision, dtype=dtype, output_loading_info=True, **safe))
    _refuse_missing_weights(key, name_or_path, info, "a complete encoder-decoder language model")
    return model.eval()


def load_policy(name_or_path: str, revision: str | None = None, key: str = "policy.model", *,
                allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The policy LM in `dtype` (RunConfig.policy_dtype): an encoder-decoder when its config says so
    (`is_encoder_decoder`), else a causal LM. A saved LoRA adapter (`lora.save_mode: adapter`) is loaded onto its
    base model and merged into it."""
    _check_local_ref(name_or_path)
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        base_model = load_policy(base, key=key, allow_pickle=allow_pickle, dtype=dtype)
        return loading(name_or_path, key, allow_pickle, lambda **safe: PeftModel.from_pretrained(
            base_model, str(name_or_path))).merge_and_unload().eval()
    check_model_files(name_or_path, key, allow_pickle)  # before the config is read: no remote code, no pickle-only weights
    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    if getattr(config, "is_encoder_decoder", False):
        return load_seq2seq_lm(name_or_path, revision, key, allow_pickle=allow_pickle, dtype=dtype)
    return load_causal_lm(name_or_path, revision, key, allow_pickle=allow_pickle, dtype=dtype)


def load_reward_model(name_or_path: str, revision: str | None = None, key: str = "reward.model", *,
                      allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A sequence classifier in `dtype` (memory.frozen_dtype; float32 by default), eval mode, frozen. Its pad_token_id is set (from EOS if needed)
    so decoder reward models can find each row's last real token. A model without a trained scoring head (a causal
    LM or a base model, whose head would be initialised at random) is refused, naming `key`."""
    _check_local_ref(name_or_path)
    model, info = loading(name_or_path, key, allow_pickle, lambda **safe: AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), revision=revision, dtype=dtype, output_loading_info=True, **safe))
    _refuse_missing_weights(key, name_or_path, info, "a reward model (a sequence classifier with a trained head)")
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


# --- building the roles: LoRA on the policy, the separate critic --------------------------------


def lora_target_modules(policy: PreTrainedModel, lora) -> list[str] | str:
    """`policy.lora.target_modules`, else PEFT's default for the model family (e.g. c_attn for GPT-2,
    q_proj/v_proj for Llama, Qwen2, Mistral, OPT and BART, query_key_value for GPT-NeoX, q/v for T5)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS


    if lora.target_modules:
        return list(lora.target_modules)
    model_type = policy.config.model_type
    if model_type not in DEFAULTS:
        raise ConfigError(
            f"no default LoRA target modules for model type {model_type!r}; set policy.lora.target_modules "
            f"to the names of its attention projections (e.g. [q_proj, v_proj])"
        )
    return DEFAULTS[model_type]


def with_lora(policy: PreTrainedModel, lora, task_type: str | None = None) -> torch.nn.Module:
    """Inject LoRA adapters (`policy.lora`) into the policy's own weights (no copy), in eval mode: the engine keeps
    the policy's dropout off, so the adapters have none. `task_type` SEQ_CLS (a reward model) also trains the scoring
    head; default: the policy's LM task."""
    from peft import LoraConfig, get_peft_model


    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora_target_modules(policy, lora),
        task_type=task_type or ("SEQ_2_SEQ_LM" if getattr(policy.config, "is_encoder_decoder", False) else "CAUSAL_LM"),
    )
    return get_peft_model(policy, config).eval()


def critic_source(critic, reward, policy_tokenizer: Callable[[], PreTrainedTokenizerBase]) -> tuple[str, str | None, str, bool] | None:
    """Where a separate critic starts, as (model URI, revision, its key, allow_pickle): `critic.model`, else the reward
    model when its tokenizer has the policy's vocabulary (`policy_tokenizer()`'s, asked only then); None: a copy of
    the policy's backbone."""
    if critic.model is not None:
        return critic.model, None, "critic.model", critic.allow_pickle
    if reward.model.startswith("models:"):
        return None
    try:
        reward_tokenizer = AutoTokenizer.from_pretrained(reward.model, revision=reward.revision, trust_remote_code=False)
        if reward_tokenizer.get_vocab() != policy_tokenizer().get_vocab():
            return None
    except OSError:
        return None
    return reward.model, reward.revision, "reward.model", reward.allow_pickle


def load_critic(critic, reward, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module | None:
    """The separate critic's initial model (`critic.model`, its URI resolved to a local path or hub id), else the
    reward model when it shares the policy's vocabulary; None: the trainer copies the policy's backbone. A reward
    model is loaded with its scoring head (refused, naming the key, if its weights lack one), which starts the value
    head."""

    started = critic_source(critic, reward, lambda: tokenizer)
    if started is None:
        return None
    source, revision, key, allow_pickle = started
    if source.startswith("models:"):
        raise ConfigError(f"critic.model={source!r}: resolve registry URIs to a local path first")
    config = loading(source, key, allow_pickle, lambda **safe: AutoConfig.from_pretrained(
        source, revision=revision, trust_remote_code=False))
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and config.num_labels == 1:
        return load_reward_model(source, revision, key=key, allow_pickle=allow_pickle).requires_grad_(True)
    from transformers import AutoModel

    return loading(source, key, allow_pickle, lambda **safe: AutoModel.from_pretrained(
        source, revision=revision, dtype=torch.float32, **safe))


def hidden_size(model: PreTrainedModel) -> int:
    """The width of a model's hidden states, under whichever name its family's config gives it."""
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")
