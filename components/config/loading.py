"""Reading a configuration: YAML, `--set section.key=value` overrides, renamed and retired keys, and errors that
name the key."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components.config.common import ConfigError, Section, flatten
from components.config.policy import DEMO_CONFIG, RunConfig
from components.config.reward import REWARD_CONFIG, RewardRunConfig
from components.security import secrets


def format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        # a check across keys names them itself ("rl.rollout_batch_size (60) must be ...")
        lines.append(f"  {message}{got}" if message.startswith(f"{key}.") or key == "(top level)" else f"  {key}: {message}{got}")
    return "\n".join(lines)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# Keys a configuration written for an earlier release may hold. A renamed key keeps working, with a warning naming
# its new name (its meaning is unchanged); a retired one is refused, saying why. None is silently ignored. The table
# serves both stages (a key names one stage's section or the other's).
RENAMED_KEYS: dict[str, str] = {
    **{f"ppo.{key}": f"rl.{key}" for key in (
        "learning_rate", "lr_schedule", "mini_batch_size", "gradient_accumulation_steps", "gamma", "clip_range",
        "clip_range_value", "vf_coef", "ent_coef", "max_grad_norm", "whiten_advantages", "kl_coef", "adaptive_kl",
        "target_kl", "target_window", "pack_sequences")},
    "ppo.target_reward": "rl.target_score",
    "ppo.batch_size": "rl.rollout_batch_size",
    "ppo.ppo_epochs": "rl.update_epochs",
    "ppo.lam": "rl.gae_lambda",
    "ppo.horizon": "rl.kl_horizon",
    "ppo.max_steps": "rl.total_episodes",
    **{f"ppo.{key}": f"launch.{key}" for key in (
        "num_processes", "accelerate_config", "num_machines", "main_process_ip", "main_process_port", "node_deployment")},
    "ppo.checkpoint_dir": "checkpoint.dir",
    "ppo.iterations_per_epoch": "checkpoint.every",
    "policy.value_head": "critic.type",
    "policy.critic_model": "critic.model",
    "gates.beat_champion": "gates.beats_champion",
    # the reward stage's champion switch, under the policy stage's name; its rule is now strict (a tie keeps the champion)
    "gates.not_worse_than_champion": "gates.beats_champion",
    # the reward model's score is not the reward (the score minus the KL penalty): README, Glossary
    "rl.target_reward": "rl.target_score",
    "gates.min_reward_gain": "gates.min_score_gain",
    # texts per scoring forward, not a training batch
    "reward.batch_size": "reward.score_batch_size",
    "judge.batch_size": "judge.score_batch_size",
    "evaluation.batch_size": "evaluation.score_batch_size",
    # the reward stage's checkpoint cadence, in optimizer steps, under the key the policy stage's has
    "training.checkpoint_every": "checkpoint.every",
}
# Values renamed in this release, by key: the old value keeps working, with a warning naming the new one.
RENAMED_VALUES: dict[str, dict[str, str]] = {
    "data.format": {"preference": "implicit", "messages": "conversational"},  # the reward stage's (and TRL's) words
}
RETIRED_KEYS: dict[str, str] = {
    "data.dvc_file": "the .dvc file that tracks data.source is found by DVC itself (README: Your own data)",
    "policy.lora.dropout": "LoRA dropout would make the update's log-probabilities differ from the rollout's; the "
                           "engine keeps the policy in eval mode, so it had no effect",
}


class ConfigDeprecation(UserWarning):
    """A configuration key that was renamed: it still works; the message names its new name."""


def _renamed_override(override: str) -> str:
    """An override of a renamed key or value, as an override of its new name (with a warning)."""
    key, sep, value = override.partition("=")
    if not sep:
        return override
    new = RENAMED_KEYS.get(key.strip())
    if new is not None:
        warnings.warn(f"--set {key.strip()} is now --set {new} (the same setting)", ConfigDeprecation, stacklevel=4)
    name = new or key.strip()
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = None  # _apply_override reports it
    values = RENAMED_VALUES.get(name, {})
    if isinstance(parsed, str) and parsed in values:
        warnings.warn(f"--set {name}={parsed} is now --set {name}={values[parsed]} (the same setting)",
                      ConfigDeprecation, stacklevel=4)
        return f"{name}={values[parsed]}"
    return override if new is None else f"{new}={value}"


def _rename_keys(tree: dict[str, Any], source: str, recorded: bool = False) -> None:
    """Move renamed keys of `tree` (in place) to their new names, and renamed values to theirs, warning once per key.
    `recorded`: `tree` is a configuration an earlier release recorded, which holds every key of its time."""
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".", 1)
        node = tree.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        new_section, new_key = new.split(".", 1)
        target = tree.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"invalid configuration ({source}):\n  {new_section}: must be a section")
        # a recorded tree may hold both names where its release had both keys (the reward stage's
        # training.checkpoint_every beside a checkpoint.every it never read): the old one is what ran
        if new_key in target and not recorded:
            raise ConfigError(f"invalid configuration ({source}):\n  {old} and {new} are both set: {old} is the old "
                              f"name of {new}; keep {new}")
        target[new_key] = node.pop(key)
        warnings.warn(f"{source}: {old} is now {new} (the same setting); rename it", ConfigDeprecation, stacklevel=4)
    if isinstance(tree.get("ppo"), dict) and not tree["ppo"]:
        del tree["ppo"]
    for key, values in RENAMED_VALUES.items():
        section, name = key.split(".", 1)
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name] in values:
            old, node[name] = node[name], values[node[name]]
            warnings.warn(f"{source}: {key}: {old} is now {key}: {node[name]} (the same setting); rename it",
                          ConfigDeprecation, stacklevel=4)


def _retired(tree: dict[str, Any]) -> list[str]:
    flat = flatten(tree)
    found = [key for key in RETIRED_KEYS if key in flat or any(k.startswith(key + ".") for k in flat)]
    return [f"  {key}: no longer a setting: {RETIRED_KEYS[key]}" for key in found]


def apply_overrides(config: Section, overrides: list[str] | tuple[str, ...]) -> Section:
    """A copy of a validated configuration with `key=value` overrides applied and validated again."""
    tree = config.model_dump(mode="json")
    for override in overrides:
        _apply_override(tree, override)
    try:
        return type(config).model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "overrides " + " ".join(overrides))) from None


def renamed(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` (a configuration as recorded by an earlier release) with its renamed keys under their new names and its
    renamed values as their new ones, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecation)
        _rename_keys(tree, "the recorded configuration", recorded=True)
    return tree


def given_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The `section.key`s a user set: those of the config file at `path` and of the `--set` overrides (renamed keys
    under their new names; renamed values are renamed too). What a resume compares with the run's recorded
    configuration."""
    tree = yaml.safe_load(Path(path).read_text()) if path is not None else {}
    tree = tree if isinstance(tree, dict) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecation)
        _rename_keys(tree, str(path))
        keys = set(flatten(tree))
        keys.update(_renamed_override(override).partition("=")[0].strip() for override in overrides)
    return keys


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = None):
    """Read a YAML run configuration (default: the embedded demo) and apply `key=value` overrides. `schema` is
    RunConfig (the policy pipeline, the default) or RewardRunConfig (the reward-model stage, default configs/reward.yaml)."""
    schema = schema or RunConfig
    path = Path(path) if path is not None else (REWARD_CONFIG if schema is RewardRunConfig else DEMO_CONFIG)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    source = secrets.redact_text(str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""))
    retired = _retired(tree)
    if retired:
        raise ConfigError("\n".join([f"invalid configuration ({source}):", *retired]))
    _rename_keys(tree, str(path))
    for override in overrides:
        _apply_override(tree, _renamed_override(override))
    retired = _retired(tree)
    if retired:
        raise ConfigError("\n".join([f"invalid configuration ({source}):", *retired]))
    secrets.prepare_tree(tree, schema)  # warns about plain-text secrets; fills secret keys from ALIGNFLOW_* variables
    try:
        config = schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(secrets.redact_text(format_errors(exc, source))) from None
    return secrets.externalize(config)  # tracking URI credentials to MLflow's variables; see components/security/secrets.py
