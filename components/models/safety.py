"""Loading a model runs none of its own code: weights from safetensors, no `trust_remote_code`.

* A model whose `config.json` asks for code of its own (`auto_map` for an architecture transformers does not
  implement) is refused naming the model's key: alignflow never passes `trust_remote_code=True`, and the config keys
  `policy.trust_remote_code` / `reward.trust_remote_code` exist only to be refused.
* Weights load with `use_safetensors=True`. A checkpoint that only has pickle files (`pytorch_model.bin`, `*.pt`,
  `*.pth`, `*.ckpt`, `*.pkl`; or a `config.json` whose `transformers_weights` names one) is refused naming the key that
  allows it for that model (`policy.allow_pickle`, `reward.allow_pickle`): unpickling can run any code the file holds.

Local folders are checked before loading; a hub id is held to the same rules by transformers (`use_safetensors=True`
fails on a repository without safetensors, explicit `trust_remote_code=False` on remote code), and its errors are
reworded here to name the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from components.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_SUFFIXES = (".safetensors",)
T = TypeVar("T")


class UnsafeModelError(UserError, ValueError):
    """A model that would run code of its own when loaded; the message names the config key."""


def allow_key(key: str) -> str:
    """The key that allows pickle for the model named by `key` (`policy.model` -> `policy.allow_pickle`,
    `critic.model` -> `critic.allow_pickle`)."""
    return key.split(".", 1)[0] + ".allow_pickle"


def _weight_files(folder: Path) -> tuple[list[str], list[str]]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    safe = [n for n in names if n.endswith(SAFE_SUFFIXES) or n.endswith(".safetensors.index.json")]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in ("training_args.bin",)
               or n.endswith(".bin.index.json")]
    return safe, pickled


def _needs_remote_code(config: dict[str, Any]) -> bool:
    if not config.get("auto_map"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING  # a known type loads transformers' own code instead


def check_model_files(name_or_path: str | Path, key: str, allow_pickle: bool = False) -> None:
    """Refuse a local model folder that would run code of its own when loaded (see the module docstring); anything
    that is not a local folder (a hub id) is left to transformers' own checks (`from_pretrained_kwargs`)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if _needs_remote_code(config):
        raise UnsafeModelError(
            f"{key}: {folder} asks for code of its own (config.json auto_map: {', '.join(config['auto_map'])}) for "
            f"model type {config.get('model_type')!r}, which transformers does not implement; alignflow never runs a "
            "model's own code (trust_remote_code stays off): use a model of an architecture transformers implements")
    safe, pickled = _weight_files(folder)
    explicit = config.get("transformers_weights")
    if explicit and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        pickled, safe = pickled + [f"{explicit} (config.json transformers_weights)"], []
    adapter = (folder / "adapter_config.json").is_file()
    if pickled and not safe and not allow_pickle:
        raise UnsafeModelError(
            f"{key}: {folder} holds only a pickle checkpoint ({', '.join(sorted(pickled))}), and unpickling can run any "
            f"code the file holds. Convert it to safetensors (model.save_pretrained() writes {'adapter_model' if adapter else 'model'}"
            f".safetensors), or set {allow_key(key)}: true if you trust where it comes from")


def from_pretrained_kwargs(allow_pickle: bool = False) -> dict[str, Any]:
    """Keyword arguments of `from_pretrained` for weights: safetensors only unless pickle is allowed; never remote code."""
    return {"use_safetensors": None if allow_pickle else True, "trust_remote_code": False}


def loading(name_or_path: str | Path, key: str, allow_pickle: bool, load: Callable[..., T]) -> T:
    """`load(**from_pretrained_kwargs(allow_pickle))` after `check_model_files`, with transformers' refusals of a hub
    model (no safetensors, remote code) reworded to name `key`."""
    check_model_files(name_or_path, key, allow_pickle)
    try:
        return load(**from_pretrained_kwargs(allow_pickle))
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise UnsafeModelError(f"{key}: {name_or_path} needs code of its own (trust_remote_code); alignflow never "
                                   "runs a model's own code: use a model of an architecture transformers implements") from None
        hub_model_without_safetensors = (isinstance(exc, OSError) and "safetensors" in text and not Path(name_or_path).is_dir()
                                         and ("no file named" in text or "does not appear to have" in text))
        if hub_model_without_safetensors and not allow_pickle:
            raise UnsafeModelError(f"{key}: {name_or_path} has no safetensors weights ({text}); set "
                                   f"{allow_key(key)}: true to load its pickle checkpoint if you trust where it comes from") from None
        raise


def check_run_models(config, root: Path) -> None:
    """`check_model_files` for the policy, the reward model, the critic and the judge of a run configuration (local folders
    only; a relative path is relative to `root`), each against its own `allow_pickle`."""
    models = (("policy.model", config.policy.model, config.policy.allow_pickle),
              ("reward.model", config.reward.model, config.reward.allow_pickle),
              ("critic.model", config.critic.model, config.critic.allow_pickle),
              *((("judge.model", config.judge.model, config.judge.allow_pickle),) if getattr(config, "judge", None) else ()))
    for key, ref, allow_pickle in models:
        if ref and not ref.startswith("models:"):
            check_model_files(Path(ref) if Path(ref).is_absolute() else root / ref, key, allow_pickle)
