"""The run configuration: one typed, validated source of truth for a whole run.

Load it from YAML with `load_config(path, overrides)`; overrides are `section.key=value`
strings (values parsed as YAML, so `1e-5`, `true`, `[a, b]` work). Every error names the
key and what is allowed. Relative paths (data, models, checkpoints) are relative to the project
root, so a run means the same thing from any working directory or Prefect worker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components import secrets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"

_REGISTRY_URI = re.compile(r"^models:/[^/@]+(@[A-Za-z0-9_\-]+|/\d+)$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key(s) and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _refuse_remote_code(value: bool) -> bool:
    if value:
        raise ValueError("alignflow never runs code shipped with a model (transformers' trust_remote_code): use a model "
                         "whose architecture transformers implements; remove this key")
    return value


_ALLOW_PICKLE = ("Load this model's weights from a pickle checkpoint (pytorch_model.bin, *.pt) when it has no "
                 "safetensors file. Unpickling a file can run any code it holds: only for a model whose origin you trust.")
_TRUST_REMOTE_CODE = "Never true: a model's own code (transformers' trust_remote_code) is not run; true is refused."


def _check_model_ref(value: str) -> str:
    """A model is a hub id (`org/name`), a local path, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`."""
    value = value.strip()
    if not value:
        raise ValueError("must name a model: a hub id, a local path or models:/NAME@ALIAS")
    if value.startswith("models:") and not _REGISTRY_URI.match(value):
        raise ValueError(f"{value!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    return value


class DataConfig(Section):
    source: str = Field("data/demo/prompts.jsonl", description="Hub dataset id, or a local JSONL/CSV/Parquet file or directory.")
    split: str = Field("train", description="Split to read (hub datasets and directories).")
    prompt_field: str = Field("prompt", description="Column that holds the prompt text.")
    prompt_template: str | None = Field(None, description="Optional template with a {prompt} placeholder.")
    max_prompt_chars: int = Field(1000, gt=0, description="Prompts longer than this are reported and left out.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts (after filtering).")
    eval_size: int = Field(64, gt=0, description="Held-out evaluation prompts, split off with `seed`.")
    dvc_file: str = Field("data.dvc", description="The DVC file that pins the data version.")
    check_dvc: bool = Field(True, description="Refuse to run when the data does not match the DVC file.")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError("must contain the placeholder {prompt}")
        return value


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; inactive while the engine keeps the policy in eval mode.")
    target_modules: list[str] | None = Field(
        None, description="None picks PEFT's per-family defaults (c_attn for GPT-2, q_proj/v_proj for Llama, q/v for T5...)."
    )
    save_mode: Literal["merged", "adapter"] = Field("merged", description="Register the merged model, or base plus adapter.")


class PolicyConfig(Section):
    model: str = Field("artifacts/demo/instruct", description="Hub id, local path or models:/NAME@ALIAS.")
    revision: str | None = None
    value_head: Literal["shared", "separate"] = Field("shared", description="Shared backbone, or a separate critic.")
    critic_model: str | None = Field(None, description="Separate critic's initial model (default: the reward model).")
    use_chat_template: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE + " Applies to policy.critic_model too.")
    trust_remote_code: bool = Field(False, description=_TRUST_REMOTE_CODE)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _check_model_ref(value)

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        return _refuse_remote_code(value)

    @field_validator("critic_model")
    @classmethod
    def _check_critic(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_ref(value)


class RewardConfig(Section):
    model: str = Field("artifacts/demo/reward", description="Hub id, local path or models:/NAME@ALIAS.")
    revision: str | None = None
    label: str | int | None = Field(None, description="Label name (as in id2label) or index; None for a single output.")
    score: Literal["logit", "probability"] = "logit"
    text: Literal["prompt_and_completion", "completion"] = Field(
        "prompt_and_completion", description="What the reward model reads: prompt + completion, or the completion alone (a summary)."
    )
    append_eos: bool = Field(
        True,
        description="The reward model reads its tokenizer's EOS after a completion the policy ended with EOS, so it "
        "sees the text is finished (as TRL's and OpenRLHF's PPO do); not added where the tokenizer already ends every "
        "text with it (T5, BERT).",
    )
    max_length: int = Field(256, gt=0, description="Reward-model inputs are truncated to this many tokens.")
    batch_size: int = Field(64, gt=0)
    normalize: bool = Field(False, description="Normalise scores with a running mean/std.")
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip].")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of completions without EOS.")
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE)
    trust_remote_code: bool = Field(False, description=_TRUST_REMOTE_CODE)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _check_model_ref(value)

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        return _refuse_remote_code(value)

    @field_validator("label")
    @classmethod
    def _label_index_non_negative(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("a label index must be >= 0")
        return value


class GenerationConfig(Section):
    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    top_p: float = Field(1.0, gt=0, le=1.0)
    max_prompt_tokens: int = Field(64, gt=0)
    prompt_overflow: Literal["truncate", "reject"] = Field("truncate", description="Longer prompts are left-truncated or rejected.")


class PPOConfig(Section):
    learning_rate: float = Field(1e-5, gt=0, lt=1)
    lr_schedule: Literal["constant", "linear"] = "constant"
    batch_size: int = Field(64, gt=0, description="Prompts (episodes) per PPO iteration.")
    mini_batch_size: int = Field(16, gt=0, description="Episodes per optimizer step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches each minibatch is split into.")
    ppo_epochs: int = Field(4, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(
        1.0, gt=0,
        description="Clip each optimizer step's global gradient norm to this; null: no clipping (as TRL's PPOTrainer). "
        "A non-finite norm stops the run either way.",
    )
    whiten_advantages: bool = True
    pack_sequences: bool = Field(
        True,
        description="Run the reference, critic and update forwards of a causal LM on the episodes' tokens packed into "
        "rows without padding (same results, fewer FLOPs). Only for model families whose attention keeps packed "
        "sequences apart, which the engine checks at start (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX do; OPT and BLOOM "
        "do not, and are run padded).",
    )
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0)
    horizon: int = Field(10000, gt=0)
    max_steps: int = Field(20000, gt=0, description="Stop after this many episodes.")
    target_reward: float | None = Field(None, description="Stop once the windowed mean score reaches this.")
    target_window: int = Field(5, gt=0, description="Iterations averaged for target_reward.")
    iterations_per_epoch: int = Field(10, gt=0, description="PPO iterations per pipeline epoch (one checkpoint each).")
    checkpoint_dir: str = "checkpoints"
    num_processes: int = Field(
        1, gt=0,
        description="Data-parallel processes for the PPO epochs, in total over num_machines (launched with "
        "`accelerate launch` when > 1); each "
        "rolls out its share of batch_size and computes its share of each minibatch's micro-batches, so make "
        "gradient_accumulation_steps a multiple of it.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An Accelerate config file for the launcher (multi-GPU, or sharded: distributed_type FSDP with "
        "fsdp_version 2, see infra/accelerate/); relative to the project root on every machine. What alignflow "
        "passes to the launcher wins over the file: num_processes, num_machines, machine_rank (each machine's own), "
        "main_process_ip and main_process_port. A file that says num_machines, main_process_ip or main_process_port "
        "must agree with ppo.* where those are set (a contradiction is refused at launch); where ppo.* leaves the "
        "address or port unset, the file's value is used.",
    )
    num_machines: int = Field(
        1, gt=0,
        description="Machines the PPO epochs run on. num_processes is the total over them (num_processes / "
        "num_machines per machine). Above 1 the epoch task starts one flow run of node_deployment per other machine "
        "and runs machine 0 itself; checkpoint_dir must then be on storage every machine sees at the same path.",
    )
    main_process_ip: str | None = Field(
        None,
        description="Address at which the other machines reach the main machine (machine 0, where the flow runs). "
        "None: the Accelerate config's main_process_ip, else the address the main machine's host name resolves to "
        "(refused if that is a loopback address while num_machines > 1).",
    )
    main_process_port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the main machine's rendezvous (torch.distributed's store). None: the Accelerate "
        "config's main_process_port, else a port free on the main machine at launch.",
    )
    node_deployment: str | None = Field(
        None,
        description="The Prefect deployment, FLOW/DEPLOYMENT (e.g. alignflow-ppo-node/gpu in prefect.yaml), that "
        "runs one machine's share of a multi-machine launch (flows/node.py) on a work pool of the machines with "
        "the hardware. Required when num_machines > 1.",
    )

    @field_validator("node_deployment")
    @classmethod
    def _flow_slash_deployment(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", value.strip()):
            raise ValueError("must name a deployment as FLOW/DEPLOYMENT, e.g. alignflow-ppo-node/gpu")
        return None if value is None else value.strip()

    @field_validator("main_process_ip")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() or c in "/:" for c in value.strip())):
            raise ValueError("must be a host name or IPv4 address the other machines can reach, e.g. 10.0.0.1")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _batches_divide(self) -> "PPOConfig":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.gradient_accumulation_steps % self.num_processes:
            raise ValueError(
                f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be a multiple of "
                f"ppo.num_processes ({self.num_processes}): each process takes the same number of micro-batches"
            )
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"ppo.num_processes ({self.num_processes}) is the total over ppo.num_machines ({self.num_machines}) "
                "and must be a multiple of it: every machine runs the same number of processes"
            )
        if self.num_machines > 1 and self.node_deployment is None:
            raise ValueError(
                f"ppo.num_machines is {self.num_machines}: set ppo.node_deployment to the Prefect deployment "
                "(FLOW/DEPLOYMENT, e.g. alignflow-ppo-node/gpu) that starts the other machines' share"
            )
        return self


class EvaluationConfig(Section):
    """Evaluation runs on the held-out prompts (`data.eval_size`), the same ones for every policy."""

    seed: int = 1234
    bootstrap_samples: int = Field(1000, gt=0)
    num_samples_logged: int = Field(16, ge=0)
    gold_scorer: str | None = Field(
        None, description="Optional ground-truth judge, `module:function` (text -> bool/float), e.g. the demo's."
    )

    @field_validator("gold_scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError("must look like package.module:function")
        return value


class GatesConfig(Section):
    min_reward_gain: float = 0.0
    min_win_rate: float = Field(0.5, ge=0, le=1)
    max_kl: float = Field(10.0, ge=0)
    min_length_ratio: float = Field(0.5, ge=0)
    max_length_ratio: float = Field(2.0, gt=0)
    min_distinct2: float = Field(0.2, ge=0, le=1)
    beat_champion: bool = True

    @model_validator(mode="after")
    def _ratio_bounds(self) -> "GatesConfig":
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError("gates.min_length_ratio must be <= gates.max_length_ratio")
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here.")
    experiment: str = "alignflow"
    registered_model: str = "alignflow-policy"
    champion_alias: str = "champion"


class RunConfig(Section):
    name: str = "alignflow"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for logging as MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {key}: {message}{got}")
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run configuration (default: the embedded demo) and apply `key=value` overrides."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        _apply_override(tree, override)
    secrets.prepare_tree(tree, RunConfig)  # warns about plain-text secrets; fills secret keys from ALIGNFLOW_* variables
    source = secrets.redact_text(str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""))
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(secrets.redact_text(_format_errors(exc, source))) from None
    return secrets.externalize(config)  # tracking URI credentials to MLflow's variables; see components/secrets.py
