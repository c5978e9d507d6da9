"""How the policy stage trains: sampling (generation), the RL algorithm (rl, with its advantage estimators), memory
and precision, and where the training processes run (launch)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from components.config.common import Section
from components.config.estimators import ESTIMATORS, Estimator, description


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


class RLConfig(Section):
    """The RL algorithm's hyperparameters. An iteration samples `samples_per_prompt` completions of each of
    `rollout_batch_size` prompts, scores them, estimates advantages and takes `update_epochs` passes (epochs) over the
    batch in minibatches of `mini_batch_size` episodes; an episode is one sampled completion with its reward."""

    advantage_estimator: Literal[tuple(ESTIMATORS)] = Field("gae", description=description())  # the registry's names
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
    target_score: float | None = Field(
        None, description="Stop once the mean reward-model score (objective/scores) over target_window iterations reaches this.")
    target_window: int = Field(5, gt=0, description="Iterations whose mean score is compared with target_score.")
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
        """Unset kl_placement, kl_estimator and loss_aggregation take the advantage estimator's own (its entry in
        components/config/estimators.py), so the logged configuration says what ran."""
        if not isinstance(data, dict) or data.get("advantage_estimator", "gae") not in ESTIMATORS:
            return data
        own = ESTIMATORS[data.get("advantage_estimator", "gae")]
        return {**data, **{key: getattr(own, key) for key in ("kl_placement", "kl_estimator", "loss_aggregation")
                           if data.get(key) is None}}

    @model_validator(mode="after")
    def _batches_divide(self) -> "RLConfig":
        fewest = self.estimator.min_samples_per_prompt
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
    def estimator(self) -> Estimator:
        """The advantage estimator's entry in the registry (components/config/estimators.py)."""
        return ESTIMATORS[self.advantage_estimator]

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def algorithm(self) -> str:
        """The algorithm's name: ppo for gae, else the estimator's (tags, `alignflow runs`)."""
        return self.estimator.algorithm


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
        description="The Prefect deployment, FLOW/DEPLOYMENT (e.g. alignflow-train-node/gpu in prefect.yaml), that "
        "runs one machine's share of a multi-machine launch (flows/node.py) on a work pool of the machines with "
        "the hardware. Required when num_machines > 1.",
    )

    @field_validator("node_deployment")
    @classmethod
    def _flow_slash_deployment(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", value.strip()):
            raise ValueError("must name a deployment as FLOW/DEPLOYMENT, e.g. alignflow-train-node/gpu")
        if value is not None and value.strip().startswith("alignflow-ppo-node/"):  # the node flow's name in earlier releases
            raise ValueError(f"the node flow alignflow-ppo-node is now alignflow-train-node: set "
                             f"alignflow-train-node/{value.strip().split('/', 1)[1]} and deploy it (prefect deploy --all)")
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
                "(FLOW/DEPLOYMENT, e.g. alignflow-train-node/gpu) that starts the other machines' share"
            )
        return self
