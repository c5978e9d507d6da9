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

from components.security import secrets
from components.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key(s) and what is allowed."""


def parse_registry_uri(ref: str) -> tuple[str, str | None, str | None] | None:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None), `models:/NAME/VERSION` -> (NAME, None, VERSION); else None."""
    match = _REGISTRY_URI.match(ref.strip())
    return (match["name"], match["alias"], match["version"]) if match else None


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
    if value.startswith("models:") and parse_registry_uri(value) is None:
        raise ValueError(f"{value!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    return value


class DataConfig(Section):
    """The prompts a run trains and evaluates on. Which rows are left out, and why, is reported by row number."""

    source: str = Field(
        "data/demo/prompts.jsonl",
        description="Hub dataset id, or a local file (.jsonl, .json, .csv, .parquet; .gz, .bz2, .xz or .zst compressed) "
        "or directory of them, relative to the project root.",
    )
    split: str = Field("train", description="Split to read (hub datasets and directories).")
    subset: str | None = Field(None, description="A hub dataset's configuration name (datasets' `name`), if it has several.")
    data_dir: str | None = Field(None, description="A hub dataset's sub-directory, e.g. harmless-base of Anthropic/hh-rlhf.")
    format: Literal["text", "messages", "dialogue", "preference"] = Field(
        "text",
        description="What a row holds: text (prompt_field is the prompt), messages (prompt_field is a list of "
        "{role, content}), dialogue (prompt_field is a Human:/Assistant: transcript awaiting the assistant), or "
        "preference (chosen_field and rejected_field are whole transcripts; the prompt is their shared part up to "
        "the last Assistant: turn, as in Anthropic's hh-rlhf).",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (formats text, messages, dialogue).")
    chosen_field: str = Field("chosen", description="Column holding the preferred transcript (format preference).")
    rejected_field: str = Field("rejected", description="Column holding the other transcript (format preference).")
    prompt_template: str | None = Field(None, description="Optional template with a {prompt} placeholder (format text).")
    max_prompt_chars: int = Field(1000, gt=0, description="Prompts longer than this many characters are reported and left out.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts (after filtering).")
    eval_size: int = Field(64, gt=0, description="Held-out evaluation prompts, split off with `seed`.")
    check_dvc: bool = Field(
        True,
        description="Refuse a local dataset that DVC does not track, or whose bytes differ from what its .dvc file "
        "pins. false: run on it anyway; the run records the file's own md5 and tags it unversioned.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError("must contain the placeholder {prompt}")
        return value


class LoraConfig(Section):
    """LoRA adapters on the policy: only they (and the value head) train; the reference is the policy with them off."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight of the policy.")
    r: int = Field(8, gt=0, description="The adapters' rank.")
    alpha: int = Field(16, gt=0, description="The adapters' scaling numerator (scale = alpha / r).")
    target_modules: list[str] | None = Field(
        None, description="None picks PEFT's per-family defaults (c_attn for GPT-2, q_proj/v_proj for Llama, q/v for T5...)."
    )
    save_mode: Literal["merged", "adapter"] = Field("merged", description="Register the merged model, or base plus adapter.")


class PolicyConfig(Section):
    """The policy: the instruct LM that RL trains, and the reference it is held near (its starting point)."""

    model: str = Field("artifacts/demo/instruct", description="Hub id, local path or models:/NAME@ALIAS.")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) of a hub model.")
    use_chat_template: bool = Field(
        False,
        description="Render prompts with the policy tokenizer's chat template: a conversation (data.format messages, "
        "dialogue or preference) with its turns and roles, a text prompt as one user turn. false: a conversation is "
        "written as a Human:/Assistant: transcript ending with Assistant:.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
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


class CriticConfig(Section):
    """The critic V(s_t) that GAE needs: a value head on the policy, a model of its own, or none."""

    type: Literal["shared", "separate", "none"] = Field(
        "shared",
        description="shared: a value head on the policy's last hidden state (one forward for both); separate: a model "
        "of its own (causal LMs); none: no critic (only for an advantage estimator that needs none).",
    )
    model: str | None = Field(
        None,
        description="A separate critic's initial model. None: the reward model when it shares the policy's vocabulary "
        "(its scoring head starts the value head, as TRL and OpenRLHF do), else a copy of the policy's backbone.",
    )
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE)

    @field_validator("model")
    @classmethod
    def _check_critic(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_ref(value)


class RewardConfig(Section):
    model: str = Field("artifacts/demo/reward", description="Hub id, local path or models:/NAME@ALIAS.")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) of a hub model.")
    label: str | int | None = Field(None, description="Label name (as in id2label) or index; None for a single output.")
    score: Literal["logit", "probability"] = Field("logit", description="The chosen output's logit, or its probability.")
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
    conversation_format: Literal["auto", "chat_template", "transcript"] = Field(
        "auto",
        description="How the reward model reads a conversation prompt and its completion: with its own tokenizer's "
        "chat template (as TRL does), or as a Human:/Assistant: transcript; auto: the chat template if its tokenizer "
        "has one.",
    )
    batch_size: int = Field(64, gt=0, description="Texts the reward model scores per forward.")
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
    """How the policy samples its completions, in training and in evaluation alike."""

    max_new_tokens: int = Field(24, gt=0, description="The most tokens a completion has (its EOS included).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probabilities are taken at it.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 disables top-k.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Sample within the smallest set of tokens holding this probability.")
    max_prompt_tokens: int = Field(64, gt=0, description="The most prompt tokens the policy reads (its template included).")
    prompt_overflow: Literal["truncate", "drop", "reject"] = Field(
        "truncate",
        description="A longer prompt is shortened (a conversation by its oldest turns, a text by its start), left out, "
        "or stops the run; either way it is counted and reported by row.",
    )
    kv_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="The rollout's KV cache: static (allocated once) or dynamic (grown per token); auto: static on a GPU where the family supports it.",
    )
    generation_batch_size: int | None = Field(
        None, gt=0,
        description="Prompts sampled together (their KV cache held at once); null: the whole rollout batch in one go.",
    )


# The advantage estimators, and what each is as published: (needs a critic, fewest samples per prompt, its KL
# placement, its KL estimator, its loss aggregation). The last three are the defaults of rl.kl_placement,
# rl.kl_estimator and rl.loss_aggregation when the configuration leaves them unset (components/rl/core.py has the maths).
ESTIMATORS: dict[str, tuple[bool, int, str, str, str]] = {
    "gae": (True, 1, "reward", "k1", "token_mean"),  # PPO (Schulman et al. 2017; Ziegler et al. 2019)
    "rloo": (False, 2, "reward", "k1", "token_mean"),  # RLOO (Ahmadian et al. 2024)
    "grpo": (False, 2, "loss", "k3", "sequence_mean"),  # GRPO (Shao et al. 2024)
    "dr_grpo": (False, 2, "loss", "k3", "constant"),  # Dr. GRPO (Liu et al. 2025)
    "reinforce_pp": (False, 1, "reward", "k1", "token_mean"),  # REINFORCE++ (Hu et al. 2025)
    "reinforce_pp_baseline": (False, 2, "loss", "k2", "token_mean"),  # REINFORCE++-baseline (Hu et al. 2025)
}
ALGORITHM_OF_ESTIMATOR = {"gae": "ppo"}  # the algorithm's name where it is not the estimator's


class RLConfig(Section):
    """The RL algorithm's hyperparameters. An iteration samples `samples_per_prompt` completions of each of
    `rollout_batch_size` prompts, scores them, estimates advantages and takes `update_epochs` passes (epochs) over the
    batch in minibatches of `mini_batch_size` episodes; an episode is one sampled completion with its reward."""

    advantage_estimator: Literal["gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "gae",
        description="gae: PPO with a critic; rloo: leave-one-out group baseline; grpo: group mean and std; dr_grpo: "
        "group mean, constant loss normalisation; reinforce_pp: batch-whitened returns; reinforce_pp_baseline: group "
        "mean, then batch-whitened. All but gae need no critic.",
    )
    samples_per_prompt: int = Field(
        1, gt=0, description="Completions sampled per prompt (k); each is an episode. The group estimators need >= 2.")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="The per-token KL estimator (Schulman 2020): k1 log ratio, k2 half its square, k3 "
        "(r - 1) - log r. None: the advantage estimator's own (k1 for gae, rloo and reinforce_pp).",
    )
    kl_placement: Literal["reward", "loss"] | None = Field(
        None, description="The KL penalty as a per-token reward (PPO, RLOO) or a term of the loss (GRPO). None: the "
        "advantage estimator's own.",
    )
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] | None = Field(
        None, description="The loss over a minibatch: mean over its tokens; mean over sequences of their token means; "
        "or the token sum over episodes x generation.max_new_tokens (Dr. GRPO). None: the advantage estimator's own.",
    )
    learning_rate: float = Field(1e-5, gt=0, lt=1, description="AdamW's learning rate for the policy (and the critic).")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="Constant, or linear decay to 0 over total_episodes.")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per iteration (samples_per_prompt episodes each).")
    mini_batch_size: int = Field(16, gt=0, description="Episodes per optimizer step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches each minibatch is split into (memory, not maths).")
    update_epochs: int = Field(4, gt=0, description="Passes over an iteration's batch (PPO's epochs; CleanRL's update_epochs).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per response token of the returns (GAE's, and the critic-free estimators').")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE's lambda: 0 is one-step TD, 1 is Monte Carlo returns.")
    clip_range: float = Field(0.2, gt=0, description="The ratio's clip: the surrogate is flat outside [1 - clip_range, 1 + clip_range_high].")
    clip_range_high: float | None = Field(
        None, gt=0, description="The ratio's upper clip (DAPO's clip-higher); None: clip_range, symmetric.")
    clip_range_value: float = Field(0.2, gt=0, description="The value loss's clip around the rollout's values (gae).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss (gae).")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (0: none; its value is still logged).")
    max_grad_norm: float | None = Field(
        1.0, gt=0,
        description="Clip each optimizer step's global gradient norm to this; null: no clipping (as TRL's PPOTrainer). "
        "A non-finite norm stops the run either way.",
    )
    whiten_advantages: bool = Field(
        True, description="gae: normalise advantages to mean 0, std 1 over the batch's tokens. The critic-free estimators "
        "fix their own normalisation (the REINFORCE++ ones whiten, the others do not).")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL penalty to the reference (beta), in the reward or the loss.")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef towards target_kl (Ziegler et al. 2019); false: fixed.")
    target_kl: float = Field(6.0, gt=0, description="The per-sequence KL the adaptive controller steers towards.")
    kl_horizon: int = Field(10000, gt=0, description="The adaptive controller's horizon, in episodes: how slowly it adapts.")
    total_episodes: int = Field(20000, gt=0, description="Stop after this many episodes (sampled completions, k per prompt).")
    target_reward: float | None = Field(None, description="Stop once the mean score over target_window iterations reaches this.")
    target_window: int = Field(5, gt=0, description="Iterations averaged for target_reward.")
    pack_sequences: bool = Field(
        True,
        description="Run the reference, critic and update forwards of a causal LM on the episodes' tokens packed into "
        "rows without padding (same results, fewer FLOPs). Only for model families whose attention keeps packed "
        "sequences apart, which the engine checks at start (GPT-2, Llama, Qwen2, Mistral, GPT-NeoX do; OPT and BLOOM "
        "do not, and are run padded).",
    )

    @model_validator(mode="before")
    @classmethod
    def _estimator_defaults(cls, data: Any) -> Any:
        """Unset kl_placement, kl_estimator and loss_aggregation take the advantage estimator's own (ESTIMATORS), so
        the logged configuration says what ran."""
        if not isinstance(data, dict) or data.get("advantage_estimator", "gae") not in ESTIMATORS:
            return data
        _, _, placement, estimator, aggregation = ESTIMATORS[data.get("advantage_estimator", "gae")]
        defaults = {"kl_placement": placement, "kl_estimator": estimator, "loss_aggregation": aggregation}
        return {**data, **{key: value for key, value in defaults.items() if data.get(key) is None}}

    @model_validator(mode="after")
    def _batches_divide(self) -> "RLConfig":
        fewest = ESTIMATORS[self.advantage_estimator][1]
        if self.samples_per_prompt < fewest:
            raise ValueError(f"rl.advantage_estimator={self.advantage_estimator} compares the completions of a prompt: it "
                             f"needs rl.samples_per_prompt >= {fewest} (got {self.samples_per_prompt})")
        if self.episodes_per_iteration % self.mini_batch_size:
            raise ValueError(f"rl.rollout_batch_size x rl.samples_per_prompt ({self.rollout_batch_size} x "
                             f"{self.samples_per_prompt} episodes) must be a multiple of rl.mini_batch_size "
                             f"({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"rl.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                f"rl.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        return self

    @property
    def episodes_per_iteration(self) -> int:
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def needs_critic(self) -> bool:
        return ESTIMATORS[self.advantage_estimator][0]

    @property
    def algorithm(self) -> str:
        """The algorithm's name: ppo for gae, else the estimator's (tags, `alignflow runs`)."""
        return ALGORITHM_OF_ESTIMATOR.get(self.advantage_estimator, self.advantage_estimator)

    @property
    def clip_high(self) -> float:
        return self.clip_range if self.clip_range_high is None else self.clip_range_high


DTYPES = ("float32", "bfloat16", "float16")


class MemoryConfig(Section):
    """Precision per role, activation checkpointing, and the check, before anything loads, that the run fits its
    device (`alignflow plan` prints the estimate). Log-probabilities, KL, advantages and losses are computed in
    float32 whatever the weights' precision."""

    frozen_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the frozen models: the reference, the reward model, the judge, and a LoRA policy's base.",
    )
    trained_precision: Literal["float32", "bf16_mixed", "fp16_mixed", "bfloat16"] = Field(
        "float32",
        description="Policy and critic: float32; *_mixed: autocast forwards, float32 weights and AdamW state (fp16 "
        "with loss scaling); bfloat16: pure bf16 weights and state, half the memory but updates below bf16's "
        "resolution are lost (risky for small learning rates).",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward (policy and critic): less memory, ~30% more update time.",
    )
    check_fit: bool = Field(
        True, description="Refuse, before loading, a run the memory plan says does not fit the device; false: try anyway.",
    )
    device_memory_gb: float | None = Field(
        None, gt=0, description="Memory per device the plan checks against; null: what the device reports (GPU memory, or RAM).",
    )

    @property
    def autocast_dtype(self):
        """The autocast dtype of the trained models' forwards, or None (float32 and pure bfloat16 run as stored)."""
        import torch

        return {"bf16_mixed": torch.bfloat16, "fp16_mixed": torch.float16}.get(self.trained_precision)

    @property
    def trained_dtype(self):
        """The dtype the trained models' weights (and AdamW's state) are held in."""
        import torch

        return torch.bfloat16 if self.trained_precision == "bfloat16" else torch.float32

    @property
    def frozen_torch_dtype(self):
        import torch

        return getattr(torch, self.frozen_dtype)


class LaunchConfig(Section):
    """Where the training iterations run: processes and machines (data parallel or sharded, through Accelerate)."""

    num_processes: int = Field(
        1, gt=0,
        description="Data-parallel processes for training, in total over num_machines (launched with "
        "`accelerate launch` when > 1); each rolls out its share of the batch and computes its share of each "
        "minibatch's micro-batches, so make rl.gradient_accumulation_steps a multiple of it.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An Accelerate config file for the launcher (multi-GPU, or sharded: distributed_type FSDP with "
        "fsdp_version 2, see infra/accelerate/); relative to the project root on every machine. What alignflow "
        "passes to the launcher wins over the file: num_processes, num_machines, machine_rank (each machine's own), "
        "main_process_ip and main_process_port. A file that says num_machines, main_process_ip or main_process_port "
        "must agree with launch.* where those are set (a contradiction is refused at launch); where launch.* leaves the "
        "address or port unset, the file's value is used.",
    )
    num_machines: int = Field(
        1, gt=0,
        description="Machines training runs on. num_processes is the total over them (num_processes / num_machines per "
        "machine). Above 1 the training task starts one flow run of node_deployment per other machine and runs "
        "machine 0 itself; checkpoint.dir must then be on storage every machine sees at the same path.",
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
    def _machines(self) -> "LaunchConfig":
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"launch.num_processes ({self.num_processes}) is the total over launch.num_machines ({self.num_machines}) "
                "and must be a multiple of it: every machine runs the same number of processes"
            )
        if self.num_machines > 1 and self.node_deployment is None:
            raise ValueError(
                f"launch.num_machines is {self.num_machines}: set launch.node_deployment to the Prefect deployment "
                "(FLOW/DEPLOYMENT, e.g. alignflow-ppo-node/gpu) that starts the other machines' share"
            )
        return self


class CheckpointConfig(Section):
    """What a run keeps on disk so that `alignflow run --resume RUN_ID` continues it."""

    dir: str = Field("checkpoints", description="Where each run keeps its checkpoint (one directory per MLflow run).")
    every: int = Field(10, gt=0, description="Iterations between checkpoints (each a Prefect task; metrics logged after each).")
    keep: bool = Field(
        False,
        description="Keep a run's last checkpoint after the run has registered its model; by default it is deleted "
        "then. A failed or interrupted run always keeps it, for `alignflow run --resume RUN_ID`.",
    )


# The packages `evaluation.gold_scorer` may name a function of: this project's own code, nothing else.
GOLD_SCORER_PACKAGES = ("components", "benchmarks")


def gold_scorer_allowed(module: str, function: str) -> bool:
    """Whether `module:function` may be imported as a gold judge: a public function (no leading underscore) of a
    module under GOLD_SCORER_PACKAGES."""
    parts = module.split(".")
    return (parts[0] in GOLD_SCORER_PACKAGES and not any(part.startswith("_") for part in parts)
            and not function.startswith("_"))


class EvaluationConfig(Section):
    """Evaluation runs on the held-out prompts (`data.eval_size`), the same ones for every policy."""

    seed: int = Field(1234, description="Sampling seed of every evaluation: the reference, the candidate and the champion alike.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples of the bootstrap confidence intervals.")
    num_samples_logged: int = Field(16, ge=0, description="Held-out prompts whose completions are logged (eval_samples.json).")
    gold_scorer: str | None = Field(
        None, description="Optional ground-truth judge, `module:function` (text -> bool/float), e.g. the demo's "
        "components.demo.gold:is_gold_positive. Only a public function of this project's own packages ("
        + ", ".join(GOLD_SCORER_PACKAGES) + ") can be named: the setting travels as a flow parameter, and importing "
        "any module:function (os:system) would run whatever a configuration names."
    )

    @field_validator("gold_scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError("must look like package.module:function")
        module, function = value.split(":")
        if not gold_scorer_allowed(module, function):
            raise ValueError(f"not a judge alignflow may import: name a public function of this project's own "
                             f"packages ({', '.join(p + '.' for p in GOLD_SCORER_PACKAGES)}), e.g. "
                             "components.demo.gold:is_gold_positive")
        return value


class GatesConfig(Section):
    min_reward_gain: float = Field(0.0, description="The candidate's mean score gain over the reference must be at least this.")
    significant_gain: bool = Field(True, description="The gain's bootstrap 95% CI must lie above zero (its lower bound > 0).")
    min_win_rate: float = Field(0.5, ge=0, le=1, description="Share of held-out prompts the candidate must win (ties count half).")
    max_kl: float = Field(10.0, ge=0, description="Largest KL (nats per completion) of the candidate from the reference.")
    min_length_ratio: float = Field(0.5, ge=0, description="Candidate mean completion length over the reference's: at least this.")
    max_length_ratio: float = Field(2.0, gt=0, description="Candidate mean completion length over the reference's: at most this.")
    min_distinct2: float = Field(0.2, ge=0, le=1, description="Distinct bigrams over all bigrams of the candidate's completions.")
    beats_champion: bool = Field(True, description="When a champion exists, the candidate's mean score must be higher than its.")
    judge_gain: bool = Field(
        True, description="With a judge (a second, held-out reward model), its score gain's bootstrap 95% CI must lie "
        "above zero too: a gain only the trained-against reward model sees is reward hacking."
    )

    @model_validator(mode="after")
    def _ratio_bounds(self) -> "GatesConfig":
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError("gates.min_length_ratio must be <= gates.max_length_ratio")
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here.")
    experiment: str = Field("alignflow", description="The MLflow experiment runs are recorded in.")
    registered_model: str = Field("alignflow-policy", description="The registered model each run's policy is a version of.")
    champion_alias: str = Field("champion", description="The alias of the version in production.")


class RunConfig(Section):
    name: str = Field("alignflow", description="The MLflow run's name.")
    seed: int = Field(0, description="Seeds the prompt split, sampling, minibatch order and prompt order.")
    data: DataConfig = Field(default_factory=DataConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    judge: RewardConfig | None = Field(
        None, description="Optional held-out reward model (e.g. trained by the reward stage on a disjoint split) that "
        "scores the evaluation's completions beside the reward model, never the training's; see gates.judge_gain."
    )
    rl: RLConfig = Field(default_factory=RLConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "RunConfig":
        if self.rl.gradient_accumulation_steps % self.launch.num_processes:
            raise ValueError(
                f"rl.gradient_accumulation_steps ({self.rl.gradient_accumulation_steps}) must be a multiple of "
                f"launch.num_processes ({self.launch.num_processes}): each process takes the same number of micro-batches"
            )
        if self.rl.needs_critic and self.critic.type == "none":
            raise ValueError(f"rl.advantage_estimator={self.rl.advantage_estimator} needs a critic, but critic.type is "
                             "none: set critic.type to shared or separate")
        if self.generation.generation_batch_size is not None and self.launch.num_processes > 1:
            raise ValueError(f"generation.generation_batch_size is for one process; with launch.num_processes="
                             f"{self.launch.num_processes} each process samples its own share of the batch: leave it unset")
        return self

    @model_validator(mode="before")
    @classmethod
    def _critic_follows_the_estimator(cls, data: Any) -> Any:
        """A critic-free estimator builds no critic: critic.type defaults to none for it, and a critic asked for
        explicitly is refused, naming both keys."""
        if not isinstance(data, dict):
            return data
        rl, critic = data.get("rl"), data.get("critic")
        estimator = rl.get("advantage_estimator", "gae") if isinstance(rl, dict) else getattr(rl, "advantage_estimator", "gae")
        if estimator not in ESTIMATORS or ESTIMATORS[estimator][0]:
            return data
        if isinstance(critic, CriticConfig):
            asked = critic.type if "type" in critic.model_fields_set else None
            critic = critic.model_dump(exclude_unset=True)
        else:
            critic = dict(critic or {})
            asked = critic.get("type")
        if asked not in (None, "none"):
            raise ValueError(f"rl.advantage_estimator={estimator} uses no critic, but critic.type is {asked}: set "
                             "critic.type to none (or leave it unset), or use rl.advantage_estimator=gae")
        return {**data, "critic": {**critic, "type": "none"}}

    def trainer_sections(self) -> dict[str, Any]:
        """The sections the engine takes (components.rl.build_trainer's keyword arguments), not the whole run."""
        return {"rl": self.rl, "generation": self.generation, "reward": self.reward, "critic": self.critic,
                "lora": self.policy.lora, "seed": self.seed, "use_chat_template": self.policy.use_chat_template,
                "memory": self.memory}

    @property
    def policy_dtype(self):
        """The dtype the policy loads in: a LoRA policy's base is frozen (memory.frozen_dtype); a fully trained
        policy is held in memory.trained_precision's weight dtype."""
        return self.memory.frozen_torch_dtype if self.policy.lora.enabled else self.memory.trained_dtype

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for logging as MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- the reward-model stage ---------------------------------------------------------------------

REWARD_CONFIG = PROJECT_ROOT / "configs" / "reward.yaml"


class PreferenceDataConfig(Section):
    """The human preference pairs a reward model learns from. Bad rows are reported by row number, never dropped
    silently; the held-out pairs are split off with the run's seed."""

    source: str = Field(
        "data/demo/preferences.jsonl",
        description="Hub dataset id, or a local file (.jsonl, .json, .csv, .parquet; compressed too) or directory of "
        "them, relative to the project root.",
    )
    split: str = Field("train", description="Split to read (hub datasets and directories).")
    subset: str | None = Field(None, description="A hub dataset's configuration name (datasets' `name`), if it has several.")
    data_dir: str | None = Field(None, description="A hub dataset's sub-directory, e.g. harmless-base of Anthropic/hh-rlhf.")
    format: Literal["auto", "explicit", "implicit", "conversational"] = Field(
        "auto",
        description="explicit: prompt, chosen and rejected columns of text; implicit: chosen and rejected whole "
        "Human:/Assistant: transcripts whose shared part is the prompt (hh-rlhf); conversational: chosen and rejected "
        "message lists (and an optional prompt list); auto: told by the columns and the first row.",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt (explicit; optional in conversational).")
    chosen_field: str = Field("chosen", description="Column holding the preferred answer or transcript.")
    rejected_field: str = Field("rejected", description="Column holding the other answer or transcript.")
    margin_field: str | None = Field(None, description="Optional column of how much chosen is preferred (the loss's margin).")
    max_pairs: int | None = Field(None, gt=0, description="Use at most this many pairs (after the bad rows are left out).")
    num_shards: int = Field(1, gt=0, description="Split the rows into this many disjoint shards by row number (e.g. 2: a reward model and its judge).")
    shard: int = Field(0, ge=0, description="The shard this run reads: rows N with (N - 1) % num_shards == shard.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the pairs held out for evaluation and the gates.")
    check_dvc: bool = Field(
        True,
        description="Refuse a local dataset that DVC does not track, or whose bytes differ from what its .dvc file "
        "pins. false: run on it anyway; the run records the file's own md5 and tags it unversioned.",
    )


    @model_validator(mode="after")
    def _shard_in_range(self) -> "PreferenceDataConfig":
        if self.shard >= self.num_shards:
            raise ValueError(f"data.shard ({self.shard}) must be below data.num_shards ({self.num_shards})")
        return self


class RewardModelConfig(Section):
    """The model trained to score prompt + answer: any sequence-classification model with one output."""

    base: str = Field("artifacts/demo/instruct", description="Hub id, local path or models:/NAME@ALIAS of the model to start from.")
    revision: str | None = Field(None, description="The hub revision (branch, tag or commit) of a hub model.")
    max_length: int = Field(256, gt=0, description="Tokens of prompt + answer; longer pairs are reported and left out.")
    append_eos: bool = Field(
        True, description="Each answer is read with the tokenizer's EOS after it, as the policy pipeline's scorer reads "
        "a finished completion (reward.append_eos)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE)
    trust_remote_code: bool = Field(False, description=_TRUST_REMOTE_CODE)

    @field_validator("base")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return _check_model_ref(value)

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        return _refuse_remote_code(value)


class RewardTrainingConfig(Section):
    """The pairwise Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected - margin), with AdamW."""

    learning_rate: float = Field(1e-5, gt=0, lt=1, description="AdamW's peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's weight decay.")
    batch_size: int = Field(32, gt=0, description="Pairs per optimizer step (chosen and rejected go through one forward).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    sampling: Literal["epochs", "with_replacement"] = Field(
        "epochs", description="epochs: every pair once per epoch, in a new seeded order each epoch (as TRL); "
        "with_replacement: each batch drawn at random (the demo bootstrap's)."
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; set, it overrides epochs.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps the learning rate warms up over, linearly.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="The decay after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Where cosine and linear decay end, as a share of the peak.")
    center_rewards_coef: float | None = Field(
        None, ge=0, description="Weight of mean(r^2) in the loss, keeping scores near 0 (Eisenstein et al. 2023; TRL's)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null: no clipping.")
    checkpoint_every: int = Field(100, gt=0, description="Optimizer steps between checkpoints (each logged to MLflow).")


class RewardEvaluationConfig(Section):
    """On the held-out pairs: accuracy (with a bootstrap CI), margins, score distributions, calibration, length bias."""

    seed: int = Field(1234, description="Seed of the bootstrap resamples.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples of the accuracy's bootstrap confidence interval.")
    length_buckets: int = Field(4, gt=0, description="Accuracy is reported per quantile bucket of the answers' length.")
    calibration_bins: int = Field(10, gt=1, description="Bins of P(chosen preferred) in the reliability plot.")
    batch_size: int = Field(64, gt=0, description="Texts scored per forward.")
    gold_scorer: str | None = Field(
        None, description="Optional ground-truth judge, `module:function` (text -> float): the share of held-out pairs "
        "the reward model orders as it does is reported (eval/.../gold_accuracy), e.g. the demo's gold_score."
    )

    @field_validator("gold_scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        return EvaluationConfig._module_function(value)


class RewardGatesConfig(Section):
    """Only a reward model that passes every gate is promoted."""

    min_accuracy: float = Field(0.6, ge=0, le=1, description="Held-out pairwise accuracy must be at least this.")
    significant: bool = Field(True, description="The accuracy's bootstrap 95% CI must lie above 0.5 (its lower bound > 0.5).")
    not_worse_than_champion: bool = Field(
        True, description="When a reward-model champion exists, accuracy on the same pairs must be at least the champion's."
    )


class RewardTrackingConfig(TrackingConfig):
    experiment: str = Field("alignflow-reward", description="The MLflow experiment reward-model runs are recorded in.")
    registered_model: str = Field("alignflow-reward", description="The registered model each reward model is a version of.")
    champion_alias: str = Field("champion", description="The alias of the reward model policies are trained against.")


class RewardRunConfig(Section):
    """One run of the reward-model stage: preference pairs in, a gated, registered reward model out."""

    name: str = Field("alignflow-reward", description="The MLflow run's name.")
    seed: int = Field(0, description="Seeds the held-out split, the model's new head and the order of pairs.")
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    training: RewardTrainingConfig = Field(default_factory=RewardTrainingConfig)
    evaluation: RewardEvaluationConfig = Field(default_factory=RewardEvaluationConfig)
    gates: RewardGatesConfig = Field(default_factory=RewardGatesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: RewardTrackingConfig = Field(default_factory=RewardTrackingConfig)

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
# its new name (its meaning is unchanged); a retired one is refused, saying why. None is silently ignored.
RENAMED_KEYS: dict[str, str] = {
    **{f"ppo.{key}": f"rl.{key}" for key in (
        "learning_rate", "lr_schedule", "mini_batch_size", "gradient_accumulation_steps", "gamma", "clip_range",
        "clip_range_value", "vf_coef", "ent_coef", "max_grad_norm", "whiten_advantages", "kl_coef", "adaptive_kl",
        "target_kl", "target_reward", "target_window", "pack_sequences")},
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
}
RETIRED_KEYS: dict[str, str] = {
    "data.dvc_file": "the .dvc file that tracks data.source is found by DVC itself (README: Your own data)",
    "policy.lora.dropout": "LoRA dropout would make the update's log-probabilities differ from the rollout's; the "
                           "engine keeps the policy in eval mode, so it had no effect",
}


class ConfigDeprecation(UserWarning):
    """A configuration key that was renamed: it still works; the message names its new name."""


def _renamed_override(override: str) -> str:
    """An override of a renamed key, as an override of its new name (with a warning)."""
    import warnings

    key, sep, value = override.partition("=")
    new = RENAMED_KEYS.get(key.strip())
    if not sep or new is None:
        return override
    warnings.warn(f"--set {key.strip()} is now --set {new} (the same setting)", ConfigDeprecation, stacklevel=4)
    return f"{new}={value}"


def _rename_keys(tree: dict[str, Any], source: str) -> None:
    """Move renamed keys of `tree` (in place) to their new names, warning once per key."""
    import warnings

    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".", 1)
        node = tree.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        new_section, new_key = new.split(".", 1)
        target = tree.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"invalid configuration ({source}):\n  {new_section}: must be a section")
        if new_key in target:
            raise ConfigError(f"invalid configuration ({source}):\n  {old} and {new} are both set: {old} is the old "
                              f"name of {new}; keep {new}")
        target[new_key] = node.pop(key)
        warnings.warn(f"{source}: {old} is now {new} (the same setting); rename it", ConfigDeprecation, stacklevel=4)
    if isinstance(tree.get("ppo"), dict) and not tree["ppo"]:
        del tree["ppo"]


def _retired(tree: dict[str, Any]) -> list[str]:
    flat = _flatten(tree)
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
        raise ConfigError(_format_errors(exc, "overrides " + " ".join(overrides))) from None


def renamed(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` (a configuration as recorded by an earlier release) with its renamed keys under their new names, quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecation)
        _rename_keys(tree, "the recorded configuration")
    return tree


def given_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The `section.key`s a user set: those of the config file at `path` and of the `--set` overrides (renamed keys
    under their new names). What a resume compares with the run's recorded configuration."""
    tree = yaml.safe_load(Path(path).read_text()) if path is not None else {}
    tree = tree if isinstance(tree, dict) else {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecation)
        _rename_keys(tree, str(path))
        keys = set(_flatten(tree))
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
        raise ConfigError(secrets.redact_text(_format_errors(exc, source))) from None
    return secrets.externalize(config)  # tracking URI credentials to MLflow's variables; see components/security/secrets.py
