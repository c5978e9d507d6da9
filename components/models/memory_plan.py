"""The memory model: what a run will hold per device, per role, before anything is loaded (`alignflow plan`).

Sizes come from each model's config file: the model is built on PyTorch's meta device (shapes, no storage), so the
parameter counts are exact for any family transformers implements, and nothing but config.json is read.

Per device, with P the policy's parameters, T the trained ones (P, or the LoRA adapters), b_w / b_t / b_f the bytes per
value of the policy's weights, of the trained weights and of the frozen models, and N processes:

    policy weights      P b_w                      (/ N under FSDP)
    gradients           T b_t                      (/ N under FSDP; live during the update)
    AdamW state         2 T b_t                    (two moments; / N under FSDP)
    reference           P b_f                      (0 for LoRA: the policy with its adapter off)
    critic              separate: its backbone as weights + gradients + AdamW in b_t; shared: a value head
    reward model, judge their parameters b_f
    KV cache            2 L kv_heads head_dim (prompt + response tokens) rows b_kv  (rows: generation_batch_size,
                        else the process's share of the rollout batch; b_kv 2 under autocast or bf16 weights, else 4)
    rollout forwards    the reference's (and below float32 the policy's) whole-sequence forward over the same rows:
                        its response logits, twice (float32 copy)
    tied embedding      V h b_t more at the end of the backward when the LM head is the input embedding (two gradients
                        summed)
    activations         the update's micro-batch: per layer and token about (6 h + 3 i) values (6 h + 4 i for a gated
                        MLP) kept for the backward, in b_a; with activation checkpointing, h per layer and token plus
                        one layer's worth; and the logits of the response tokens, V float32 values per token, about
                        3.5 times over as the backward starts (the head's output, the temperature's copy, the
                        entropy's, and their gradients)
    runtime             the process itself: Python, PyTorch and transformers on the CPU (measured here), CUDA's
                        context on a GPU

b_a is the bytes of a saved activation (4 in float32, about 3 under autocast, 2 with bf16 weights). The peak is
everything resident plus the largest transient: the rollout's (KV cache, logits), the backward's start (activations,
response logits about 3.5 times over, autocast's weight copies) or the optimizer step's (every gradient). The two
constants (3.5 logit copies, 3 bytes under autocast) were fitted to benchmarks/memory_model.py's measurements here.

benchmarks/memory_model.py measures these against real runs, on this machine, from 10M to 200M parameters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from components.config import PROJECT_ROOT, ConfigError, RunConfig, apply_overrides
from components.models.loading import hidden_size, locate, lora_target_modules
from components.models.uris import adapter_base

GIB = 1024**3
# What a process holds before any model is loaded: Python with PyTorch, transformers, MLflow's client and Prefect
# imported. CPU: measured by benchmarks/memory_model.py (an alignflow worker's VmRSS after its imports). CUDA: the
# context and kernels PyTorch loads on first use, as commonly measured (0.5-1 GB by GPU generation).
RUNTIME_BYTES = {"cpu": int(0.52 * GIB), "cuda": int(0.75 * GIB)}
# The transient phases, each on top of what stays resident; the peak is the largest. rollout: sampling (the KV cache,
# next-token logits); backward: the update's forward is done and its backward starts (every layer's saved activations,
# the response logits and their gradients); step: the backward is done (every gradient, then AdamW's step).
PHASES = ("rollout", "backward", "step")
LOGIT_COPIES = 3.5  # the response logits, float32, live about this many times over as the backward starts (measured)
# Bytes per saved activation value: float32; under autocast a mix (bf16 matmul outputs, float32 norms and softmax);
# bf16 weights: bf16.
ACTIVATION_BYTES = {"float32": 4, "mixed": 3, "bfloat16": 2}


class MemoryPlanError(ConfigError):
    """A run the memory plan says does not fit its device (memory.check_fit refuses it before loading)."""


@dataclass(frozen=True)
class Shape:
    """What the memory model needs of one model, read from its config."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    tied_embeddings: bool = False  # the LM head is the input embedding (GPT-2): its gradient is summed from two
    lora_params: int = 0  # the adapters' parameters, for a LoRA policy


@dataclass
class Line:
    role: str
    bytes: int
    note: str = ""
    phase: str = "resident"  # resident, or one of the transient PHASES (the peak takes the largest)


@dataclass
class Plan:
    lines: list[Line]
    device: str
    device_bytes: int | None
    processes: int
    sharded: bool
    advice: list[str] = field(default_factory=list)
    offloaded: bool = False

    def total(self, phase: str | None = None) -> int:
        return sum(line.bytes for line in self.lines if phase is None or line.phase == phase)

    @property
    def peak_bytes(self) -> int:
        return self.total("resident") + max(self.total(phase) for phase in PHASES)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.peak_bytes <= self.device_bytes

    def as_dict(self) -> dict:
        return {"device": self.device, "device_gib": None if self.device_bytes is None else self.device_bytes / GIB,
                "processes": self.processes, "sharded": self.sharded, "offloaded": self.offloaded, "peak_gib": self.peak_bytes / GIB,
                "fits": self.fits, "advice": self.advice,
                "lines": [{"role": x.role, "gib": x.bytes / GIB, "phase": x.phase, "note": x.note} for x in self.lines]}


# --- sizes no run can have ----------------------------------------------------------------------------------------

# The most a count of the run configuration can be and still describe a run (2**31: beyond any context length, batch or
# process count, and far beyond any device's memory once multiplied out); larger values are refused naming their key
# before they reach the plan's arithmetic (where they would overflow a float).
MAX_COUNT = 2**31
MAX_DEVICE_GB = float(2**30)  # an exbibyte per device
SIZE_KEYS = ("generation.max_new_tokens", "generation.max_prompt_tokens", "generation.generation_batch_size",
             "rl.rollout_batch_size", "rl.samples_per_prompt", "rl.mini_batch_size", "rl.gradient_accumulation_steps",
             "launch.num_processes", "launch.num_machines", "policy.lora.r")
# A model config's dimensions, by their names across the families transformers implements.
MODEL_DIMS = ("hidden_size", "n_embd", "d_model", "dim", "intermediate_size", "n_inner", "d_ff", "ffn_dim",
              "encoder_ffn_dim", "decoder_ffn_dim", "num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers",
              "encoder_layers", "decoder_layers", "num_attention_heads", "n_head", "num_heads",
              "encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads", "head_dim", "d_kv",
              "vocab_size")
MAX_MODEL_DIM = 2**24  # 16.7M: ten times any model's vocabulary or width; n_embd 10**12 is a typo, not a model


def check_sizes(config: RunConfig, device_gb: float | None = None, device_option: str = "memory.device_memory_gb") -> None:
    """Refuse, naming the key, a size in the run configuration that no run can have (MAX_COUNT), or a device memory
    that is not a finite number of GB up to MAX_DEVICE_GB: the plan of such a run means nothing and its arithmetic
    overflows."""
    flat = config.flat()
    for key in SIZE_KEYS:
        value = flat.get(key)
        if isinstance(value, int) and value > MAX_COUNT:
            raise MemoryPlanError(f"{key}: {_figure(value)} is beyond any run (at most {MAX_COUNT}); did you mean a "
                                  "smaller number?")
    episodes = config.rl.rollout_batch_size * config.rl.samples_per_prompt
    if episodes > MAX_COUNT:
        raise MemoryPlanError(f"rl.rollout_batch_size x rl.samples_per_prompt: {config.rl.rollout_batch_size} x "
                              f"{config.rl.samples_per_prompt} = {_figure(episodes)} episodes per iteration is beyond any run "
                              f"(at most {MAX_COUNT})")
    for key, value in ((device_option, device_gb), ("memory.device_memory_gb", config.memory.device_memory_gb)):
        if value is not None and not (math.isfinite(value) and 0 < value <= MAX_DEVICE_GB):
            raise MemoryPlanError(f"{key}: {value} GB is not a device's memory (a number of GB above 0, at most "
                                  f"{MAX_DEVICE_GB:.0f})")


def _figure(value: int) -> str:
    """A count as written, or its order of magnitude when it is too long to read."""
    digits = str(value)
    return digits if len(digits) <= 20 else f"about 10**{len(digits) - 1}"


# --- shapes from config files ------------------------------------------------------------------------------------


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def shape_of_config(config, kind: str = "lm", lora=None) -> Shape:
    """The shape of a model of `config` (a transformers PretrainedConfig): `kind` lm (causal or encoder-decoder, by its
    config) or classifier (a one-output sequence classifier). Built on the meta device: no memory, exact counts."""
    if kind == "classifier":
        config.num_labels = 1
        build = AutoModelForSequenceClassification.from_config
    elif getattr(config, "is_encoder_decoder", False):
        build = AutoModelForSeq2SeqLM.from_config
    else:
        build = AutoModelForCausalLM.from_config
    with torch.device("meta"):
        model = build(config)
    params = sum(p.numel() for p in model.parameters())

    hidden = hidden_size(model)  # the engine's own reading of the width, for every family
    heads = _config_value(config, "num_attention_heads", "n_head", "num_heads")
    intermediate = _config_value(config, "intermediate_size", "n_inner", "d_ff", "ffn_dim", default=4 * hidden)
    lora_params = 0
    if lora is not None and lora.enabled:
        targets = lora_target_modules(model, lora)
        for name, module in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in ([targets] if isinstance(targets, str) else targets)):
                continue
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 2:
                lora_params += lora.r * (weight.shape[0] + weight.shape[1])
    gated = hasattr(config, "hidden_act") and any("gate" in n for n, _ in model.named_modules())
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    return Shape(
        params=params,
        layers=_config_value(config, "num_hidden_layers", "n_layer", "num_layers") * (2 if getattr(config, "is_encoder_decoder", False) else 1),
        hidden=hidden,
        intermediate=intermediate,
        kv_heads=_config_value(config, "num_key_value_heads", default=heads),
        head_dim=_config_value(config, "head_dim", default=hidden // heads),
        vocab=_config_value(config, "vocab_size"),
        gated_mlp=gated,
        tied_embeddings=tied,
        lora_params=lora_params,
    )


def shape_of(ref: str, key: str, revision: str | None = None, kind: str = "lm", lora=None) -> Shape:
    """The shape of the model `key` names (a local directory, a hub id: config.json only, or models:/). A config whose
    sizes no model can have (a dimension beyond MAX_MODEL_DIM, or one whose tensors' sizes overflow) fails naming `key`
    and the sizes."""


    located = locate(key, ref, revision)
    base = adapter_base(located)  # a saved LoRA adapter (lora.save_mode: adapter): the shape is its base model's
    if base is not None:
        located, revision = locate(key, base), None
    config = AutoConfig.from_pretrained(located, revision=revision, trust_remote_code=False)
    written = config.to_dict()
    sizes = {name: value for name in MODEL_DIMS if isinstance(value := written.get(name), int)
             and not isinstance(value, bool)}
    absurd = {name: value for name, value in sizes.items() if value > MAX_MODEL_DIM}
    if absurd:
        raise MemoryPlanError(f"{key}: the config of {located} gives sizes no model can have: "
                              + ", ".join(f"{name}={_figure(value)}" for name, value in absurd.items())
                              + f" (at most {MAX_MODEL_DIM}): fix its config.json")
    try:
        return shape_of_config(config, kind, lora)
    except (RuntimeError, OverflowError, ValueError, ZeroDivisionError, TypeError) as exc:
        listed = ", ".join(f"{name}={value}" for name, value in sizes.items())
        raise MemoryPlanError(f"{key}: cannot size the model of {located} from its config ({listed}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


# --- the plan ------------------------------------------------------------------------------------------------------


def _bytes_per_value(dtype_name: str) -> int:
    return 4 if dtype_name == "float32" else 2


def _fsdp(config: RunConfig) -> tuple[bool, bool]:
    """(sharded, offloaded): whether the launch's Accelerate config asks for FSDP (the policy and critic are then
    sharded over the processes) and for its parameter offload (fsdp_offload_params: the shards, their gradients and
    AdamW's state stay in CPU memory, each unit copied to the device for its own forward and backward)."""
    path = config.launch.accelerate_config
    if not path or config.launch.num_processes < 2:
        return False, False
    try:
        with open(path if os.path.isabs(path) else PROJECT_ROOT / path) as handle:
            settings = yaml.safe_load(handle) or {}
    except OSError:
        return False, False
    sharded = str(settings.get("distributed_type", "")).upper() == "FSDP"
    offloaded = sharded and str((settings.get("fsdp_config") or {}).get("fsdp_offload_params", False)).lower() == "true"
    return sharded, offloaded


def device_memory(config: RunConfig) -> tuple[str, int | None]:
    """(device kind, bytes per device) the plan checks against: memory.device_memory_gb, else the first GPU's memory,
    else the RAM available now, shared by this machine's processes."""
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    if config.memory.device_memory_gb is not None:
        return kind, int(config.memory.device_memory_gb * GIB)
    if kind == "cuda":
        return kind, torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return kind, info["MemAvailable"] // max(1, config.launch.num_processes // config.launch.num_machines)
    except (OSError, KeyError):
        return kind, None


def plan_for_shapes(config: RunConfig, policy: Shape, reward: Shape, critic: Shape | None = None,
                    judge: Shape | None = None, device: str = "cpu", device_bytes: int | None = None) -> Plan:
    """The plan from the models' shapes (`shape_of`), the run's settings, and the device."""
    memory, rl, generation = config.memory, config.rl, config.generation
    processes = config.launch.num_processes  # in total over launch.num_machines
    sharded, offloaded = _fsdp(config)
    shard = processes if sharded else 1
    lora = config.policy.lora.enabled
    b_f = _bytes_per_value(memory.frozen_dtype)
    b_t = 2 if memory.trained_precision == "bfloat16" else 4
    b_w = b_f if lora else b_t  # a LoRA policy's base is frozen
    autocasting = memory.autocast_dtype is not None
    b_a = ACTIVATION_BYTES["mixed" if autocasting else ("bfloat16" if b_w == 2 else "float32")]
    trained = policy.lora_params if lora else policy.params

    # Offloaded, the device holds the units being computed (about two layers, one prefetched) and the root unit
    # (embeddings and head) gathered; the shards, gradients and AdamW state are in CPU memory.
    layer_params = (policy.params - policy.vocab * policy.hidden * (1 if policy.tied_embeddings else 2)) // max(policy.layers, 1)
    on_device = (lambda n: 0) if offloaded else (lambda n: n)  # noqa: E731
    weights = policy.params * b_w // shard + (policy.lora_params * b_t if lora else 0)
    if offloaded:
        weights = (2 * layer_params + policy.vocab * policy.hidden * (1 if policy.tied_embeddings else 2)) * b_w
    lines = [
        Line("policy weights", weights,
             f"{policy.params / 1e6:.1f}M in {'bf16/fp16' if b_w == 2 else 'fp32'}" + (f" + {policy.lora_params / 1e6:.2f}M LoRA" if lora else "")
             + (": the units in use; the shards in CPU memory" if offloaded else "")),
        Line("AdamW state", on_device(2 * trained * b_t // shard), f"2 moments of {trained / 1e6:.2f}M trained values"
             + (", in CPU memory" if offloaded else "")),
        Line("reference", 0 if lora else policy.params * min(b_f, b_w),
             "the policy with its adapter off" if lora else f"{'bf16/fp16' if min(b_f, b_w) == 2 else 'fp32'} copy"),
        Line("reward model", reward.params * b_f, f"{reward.params / 1e6:.1f}M in {memory.frozen_dtype}"),
    ]
    if judge is not None:
        lines.append(Line("judge", judge.params * b_f, f"{judge.params / 1e6:.1f}M in {memory.frozen_dtype}"))
    critic_trained = 0
    if config.critic.type == "separate" and critic is not None:
        critic_trained = critic.params
        lines.append(Line("critic weights + AdamW", 3 * critic.params * b_t // shard, f"{critic.params / 1e6:.1f}M, separate"))
    elif config.critic.type == "shared":
        critic_trained = policy.hidden + 1
        lines.append(Line("critic weights + AdamW", 3 * critic_trained * 4, "a value head on the policy"))
    gradient_bytes = on_device((trained * b_t + critic_trained * b_t) // shard)
    lines.append(Line("gradients", gradient_bytes, "trained values" + (", in CPU memory" if offloaded else ""), "step"))
    if policy.tied_embeddings and not lora:
        lines.append(Line("tied embedding gradient", policy.vocab * policy.hidden * b_t,
                          "the LM head's and the embedding's gradients, summed", "step"))

    # The rollout: the KV cache of the rows decoded together, and the logits of their next token.
    share = math.ceil(rl.rollout_batch_size * rl.samples_per_prompt / processes)  # this process's rows
    rows = min(generation.generation_batch_size or share, share)
    tokens = generation.max_prompt_tokens + generation.max_new_tokens
    kv = 2 * policy.layers * policy.kv_heads * policy.head_dim * tokens * rows * (2 if (autocasting or b_w == 2) else 4)
    lines.append(Line("KV cache", kv, f"{rows} rows x {tokens} tokens", "rollout"))
    lines.append(Line("rollout logits", 3 * rows * policy.vocab * 4, "next-token logits, probabilities", "rollout"))
    # After sampling, the reference's (and, below float32, the policy's own) whole-sequence forward over the same rows
    # at a time: its response logits and their float32 copy.
    lines.append(Line("rollout forward logits", 2 * rows * generation.max_new_tokens * policy.vocab * 4,
                      f"{rows} rows x {generation.max_new_tokens} response tokens x {policy.vocab} in fp32", "rollout"))

    # The update: one micro-batch's activations.
    micro = max(1, rl.mini_batch_size // rl.gradient_accumulation_steps)

    def layer_values(shape: Shape) -> int:
        per_layer = 6 * shape.hidden + (4 if shape.gated_mlp else 3) * shape.intermediate
        if memory.activation_checkpointing:
            return micro * tokens * (shape.layers * shape.hidden + per_layer)
        return micro * tokens * shape.layers * per_layer

    separate = config.critic.type == "separate" and critic is not None
    activations = (layer_values(policy) + (layer_values(critic) if separate else 0)) * b_a
    lines.append(Line("activations", activations,
                      f"micro-batch {micro} x {tokens} tokens, {policy.layers} layers"
                      + (", checkpointed" if memory.activation_checkpointing else ""), "backward"))
    lines.append(Line("update logits", int(LOGIT_COPIES * micro * generation.max_new_tokens * policy.vocab * 4),
                      f"{generation.max_new_tokens} response tokens x {policy.vocab} in fp32", "backward"))
    if rl.gradient_accumulation_steps // processes > 1:  # this process's earlier micro-batches' gradients are held
        lines.append(Line("accumulated gradients", gradient_bytes, "from the minibatch's earlier micro-batches", "backward"))
    if autocasting:  # autocast keeps its bf16/fp16 copy of each trained weight for the forward's backward
        lines.append(Line("autocast weight copies", (policy.params if not lora else 0) * 2 // shard,
                          "half-precision casts of the trained weights", "backward"))
    lines.append(Line("runtime", RUNTIME_BYTES.get(device, RUNTIME_BYTES["cpu"]), f"the process itself ({device})"))
    return Plan(lines, device, device_bytes, processes, sharded, offloaded=offloaded)


def plan_run(config: RunConfig, device_bytes: int | None = None) -> Plan:
    """The plan of a run whose model URIs are local paths or hub ids (the pipeline resolves registry URIs
    first), with advice when it does not fit. Sizes no run can have are refused first, naming their key
    (`check_sizes`)."""
    check_sizes(config)
    policy = shape_of(config.policy.model, "policy.model", config.policy.revision, "lm", config.policy.lora)
    reward = shape_of(config.reward.model, "reward.model", config.reward.revision, "classifier")
    judge = shape_of(config.judge.model, "judge.model", config.judge.revision, "classifier") if config.judge else None
    critic = None
    if config.critic.type == "separate":
        ref, key, revision = ((config.critic.model, "critic.model", None) if config.critic.model
                              else (config.reward.model, "reward.model", config.reward.revision))
        critic = shape_of(ref, key, revision, "classifier")
    kind, available = device_memory(config)
    if device_bytes is not None:
        available = device_bytes
    plan = plan_for_shapes(config, policy, reward, critic, judge, kind, available)
    if plan.fits is False:
        plan.advice = advice(config, policy, reward, critic, judge, kind, available)
    return plan


# Each a change a user can make, as overrides, in the order they cost the least quality or speed.
REMEDIES: list[tuple[str, list[str]]] = [
    ("frozen models in bf16", ["memory.frozen_dtype=bfloat16"]),
    ("activation checkpointing", ["memory.activation_checkpointing=true"]),
    ("smaller micro-batches", ["rl.gradient_accumulation_steps=4"]),
    ("generation micro-batches", ["generation.generation_batch_size=8"]),
    ("mixed precision", ["memory.trained_precision=bf16_mixed", "memory.frozen_dtype=bfloat16"]),
    ("LoRA", ["policy.lora.enabled=true", "memory.frozen_dtype=bfloat16"]),
    ("LoRA, checkpointing, small micro-batches", ["policy.lora.enabled=true", "memory.frozen_dtype=bfloat16",
                                                  "memory.activation_checkpointing=true", "rl.gradient_accumulation_steps=4"]),
]


def advice(config: RunConfig, policy: Shape, reward: Shape, critic, judge, kind: str, available: int) -> list[str]:
    """The remedies whose plan fits `available`, each with its peak; or what the device would need."""

    found = []
    for name, overrides in REMEDIES:
        if config.launch.num_processes > 1 and any(o.startswith("generation.generation_batch_size") for o in overrides):
            continue  # one process only
        try:
            changed = apply_overrides(config, overrides)
        except (ConfigError, ValueError):
            continue
        shaped = policy
        if changed.policy.lora.enabled and not config.policy.lora.enabled:
            shaped = Shape(**{**policy.__dict__, "lora_params": _lora_estimate(policy, changed.policy.lora.r)})
        candidate = plan_for_shapes(changed, shaped, reward, critic, judge, kind, available)
        if candidate.fits:
            found.append(f"{name}: {' '.join('--set ' + o for o in overrides)} (peak {candidate.peak_bytes / GIB:.2f} GiB)")
    if not found:
        best = plan_for_shapes(apply_overrides(config, REMEDIES[-1][1]),
                               Shape(**{**policy.__dict__, "lora_params": _lora_estimate(policy, 8)}),
                               reward, critic, judge, kind, available)
        found.append(f"nothing here fits: even with LoRA, bf16 and checkpointing the peak is {best.peak_bytes / GIB:.2f} "
                     f"GiB; use a larger device, or more processes with FSDP (launch.num_processes, "
                     "launch.accelerate_config: infra/accelerate/fsdp.yaml)")
    return found


def _lora_estimate(policy: Shape, r: int) -> int:
    """LoRA's parameters on the attention's query and value projections of every layer (PEFT's usual default)."""
    return policy.layers * r * (3 * policy.hidden + policy.kv_heads * policy.head_dim)  # q: r(h + h), v: r(h + kv hd)


def check_fits(config: RunConfig) -> Plan:
    """Refuse, before any model is loaded, a run the plan says does not fit (memory.check_fit), naming the figures
    and the options that would make it fit."""
    plan = plan_run(config)
    if config.memory.check_fit and plan.fits is False:
        biggest = sorted(plan.lines, key=lambda line: -line.bytes)[:3]
        raise MemoryPlanError(
            f"memory: this run needs about {plan.peak_bytes / GIB:.2f} GiB per {plan.device} device and "
            f"{plan.device_bytes / GIB:.2f} GiB are available (largest: "
            + ", ".join(f"{line.role} {line.bytes / GIB:.2f} GiB" for line in biggest)
            + "). What would fit: " + "; ".join(plan.advice)
            + ". `alignflow plan` prints the estimate; memory.check_fit=false tries anyway."
        )
    return plan
