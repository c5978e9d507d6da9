"""RL for language models: one iteration is experience -> advantages -> learning -> KL control.

    experience = experience_maker.make(prompts)     # experience.py: sample, reference, critic, reward model, rewards
    estimate_advantages(experience, rl)             # core.py: the one switch on rl.advantage_estimator
    stats = learner.learn(experience)               # learner.py: clipped policy loss (+ value loss, + KL), optimizer steps
    kl_ctl.update(kl)                               # kl_controller.py: fixed, or adaptive towards rl.target_kl

The roles (OpenRLHF's names): the actor is the policy; the critic a value head on it (`critic.type: shared`), a model
of its own (`separate`) or none (the critic-free estimators: rloo, grpo, dr_grpo, reinforce_pp, reinforce_pp_baseline,
which compare the `rl.samples_per_prompt` completions of a prompt instead); the reference the starting policy (for a LoRA policy, itself with its adapter off);
the reward model a function of text. `build_trainer` is the one way a trainer is built: the flow, the launched
processes and the benchmarks all use it.

Statistics of an iteration (to `train`'s callback), named as in TRL / OpenRLHF:

| name                        | meaning                                                                          |
|-----------------------------|----------------------------------------------------------------------------------|
| objective/scores            | mean reward-model score, before penalties, normalisation and clipping            |
| objective/kl                | mean over sequences of sum_t (logp_t - ref_logp_t): the KL to the reference (k1, |
|                             | whatever rl.kl_estimator)                                                        |
| objective/non_score_reward  | mean over sequences of the KL penalty in the reward, sum_t -kl_coef k_t (0 with   |
|                             | the KL in the loss; k_t = logp_t - ref_logp_t for k1)                            |
| objective/rlhf_reward       | mean over sequences of sum_t r_t: the score used in training minus the KL penalty |
| objective/sequence_entropy  | mean over sequences of sum_t -logp_t of the sampled tokens                       |
| policy/approxkl             | KL to the old policy (the rollout's), not the reference: 0.5 mean over tokens of  |
|                             | (logp_t - old_logp_t)^2 (k2), averaged over the micro-batches of all update epochs|
| policy/clipfrac             | share of tokens where the clipped surrogate is active                            |
| policy/token_entropy        | mean per-token entropy of the policy's distribution during the update            |
| policy/ratio                | mean probability ratio pi / pi_old during the update                             |
| loss/policy                 | clipped surrogate loss                                                           |
| loss/value                  | clipped value loss (before vf_coef); with a critic only                          |
| loss/kl                     | KL to the reference in the loss: the rl.kl_estimator estimate (k3 for GRPO, k2   |
|                             | for REINFORCE++-baseline) aggregated as the policy loss, before kl_coef;         |
|                             | with rl.kl_placement: loss only                                                  |
| group/frac_score_zero_std   | share of prompts whose k scores are all equal (zero advantage); k >= 2 only      |
|                             | (TRL's frac_reward_zero_std)                                                     |
| group/score_std             | mean over prompts of the std of their k scores; k >= 2 only (TRL's reward_std)   |
| val/clipfrac                | share of tokens where the clipped value loss is active; with a critic only       |
| val/explained_variance      | 1 - Var[R - V] / Var[R] of the rollout values; with a critic only                |
| val/mean                    | mean rollout value over real tokens; with a critic only                          |
| kl_coef                     | the KL coefficient used for this iteration's rewards                             |
| lr                          | learning rate used for this iteration's updates                                  |
| response/length_mean        | mean response length in tokens (the EOS counts)                                  |
| response/eos_fraction       | share of responses that ended with EOS                                           |
| episodes                    | cumulative episodes (sampled completions, k per prompt) trained on               |
| iteration                   | iterations done                                                                  |
| perf/tokens_per_second      | response tokens of the iteration / its wall-clock time                           |
| time/rollout                | seconds: sampling, reference log-probs (and separate critic values)              |
| time/scoring                | seconds: decoding and the reward function                                        |
| time/update                 | seconds: the update epochs                                                       |
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import ConfigError, CriticConfig, GenerationConfig, LoraConfig, MemoryConfig, RewardConfig, RLConfig
from components.models.lengths import positions as positions_of
from components.models.loading import fuse_gelu, hidden_size, load_critic, with_lora
from components.rl import distributed, state
from components.rl.core import estimate_advantages, explained_variance, group_stats, masked_mean
from components.errors import TrainingError
from components.rl.experience import ExperienceMaker, PolicyValue, RewardFn
from components.rl.kl_controller import kl_controller
from components.rl.learner import Learner
from components.rl.packing import packs_sequences
from components.rl.precision import check_precision, enable_activation_checkpointing
from components.rl.roles import AdapterDisabled, Critic, ValueHead, backbone_of, is_encoder_decoder, reference_of
from components.rl.tokenization import eos_token_ids, pad_id, render_prompt

Callback = Callable[[dict[str, float]], None]
CRITIC_TYPES = get_args(CriticConfig.model_fields["type"].annotation)  # critic.type's choices
STOP_REASONS = ("iterations", "target_score", "total_episodes")


@dataclass
class TrainResult:
    stop_reason: str  # one of STOP_REASONS
    iterations: int  # iterations run by this call
    episodes: int  # cumulative episodes
    history: list[dict[str, float]] = field(default_factory=list)  # this call's iterations' statistics

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class Trainer:
    """The engine. Knows nothing of Prefect or MLflow: metrics go to a callback.

    `policy` is the starting causal LM or encoder-decoder (trained in place); `reference` defaults to a frozen copy
    of it, or, for a LoRA (PEFT) policy, to the policy with its adapter switched off. `critic_type` "shared" reads
    values from the policy's last hidden state (the decoder's, for an encoder-decoder; one forward for both);
    "separate" (causal LMs) uses `critic` (default a copy of the policy's backbone); "none" has no critic (the default
    for a critic-free `rl.advantage_estimator`, and the only type it takes).

    The same code runs in N data-parallel processes (a torch.distributed process group, e.g. from
    `accelerate launch`), replicated or sharded by FSDP2 as the Accelerate config says, taking the same steps
    as one process over the same global batch: see `distributed`.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_fn: RewardFn,
        rl: RLConfig,
        generation: GenerationConfig,
        reward: RewardConfig | None = None,
        reference: PreTrainedModel | None = None,
        critic: torch.nn.Module | None = None,
        critic_type: str | None = None,
        seed: int = 0,
        use_chat_template: bool = False,
        memory: MemoryConfig | None = None,
    ):
        critic_type = critic_type or ("shared" if rl.needs_critic else "none")
        if critic_type not in CRITIC_TYPES:
            raise ConfigError(f"critic.type={critic_type!r}; allowed: {', '.join(map(repr, CRITIC_TYPES))}")
        problem = rl.estimator.critic_problem(critic_type)  # the rule the run configuration validates (RunConfig)
        if problem:
            raise ConfigError(problem)
        self.encoder_decoder = is_encoder_decoder(policy)
        if critic_type == "separate" and self.encoder_decoder:
            raise ConfigError("critic.type=separate is for causal LMs; an encoder-decoder policy uses the shared value head")
        if use_chat_template:
            render_prompt(tokenizer, "x", use_chat_template=True)  # fails now, naming the tokenizer, if it has none
        _check_lengths(policy, generation, self.encoder_decoder)
        self.rl, self.generation = rl, generation
        self.reward = reward if reward is not None else RewardConfig()
        self.tokenizer, self.seed, self.critic_type = tokenizer, seed, critic_type
        self.device = policy.device
        self.memory = memory = memory if memory is not None else MemoryConfig()
        check_precision(memory, self.device)
        fuse_gelu(policy)  # before the reference is copied from it
        self.policy = policy.eval()  # eval: dropout off, so rollout and update log-probs agree
        self.reference = reference_of(policy) if reference is None else reference.eval().requires_grad_(False)
        if not isinstance(self.reference, AdapterDisabled):  # a model of its own, not the LoRA policy with its adapter off
            # memory.frozen_dtype, or the policy's own dtype where that is narrower (a pure-bf16 policy's reference
            # stays bf16: an upcast copy would take twice the memory and compare another precision)
            frozen, own = memory.frozen_torch_dtype, next(policy.parameters()).dtype
            self.reference.to(own if torch.finfo(own).bits < torch.finfo(frozen).bits else frozen)
        trained_dtype = memory.trained_dtype
        self.value_head = ValueHead(hidden_size(policy)).to(self.device, trained_dtype) if critic_type == "shared" else None
        self.critic: Critic | None = None
        if critic_type == "separate":
            self.critic = Critic.of(critic if critic is not None else backbone_of(policy), copy=critic is None).to(
                self.device, trained_dtype).eval()
            fuse_gelu(self.critic)
        if memory.activation_checkpointing:  # after the reference is copied: it never runs a backward
            enable_activation_checkpointing(self.policy, "policy.model")
            if self.critic is not None:
                enable_activation_checkpointing(self.critic, "critic.model")

        # Packing (rl.pack_sequences) where the model's attention keeps packed episodes apart; checked now, before any
        # data-parallel wrapping. The reference is the policy's family.
        pack = rl.pack_sequences and not self.encoder_decoder
        policy_value = PolicyValue(
            self.policy, self.value_head, self.critic,
            pack_policy=pack and packs_sequences(backbone_of(self.policy)),
            pack_critic=pack and self.critic is not None and packs_sequences(self.critic.backbone),
        )
        module, accelerator = policy_value, None  # or its data-parallel wrapper (FSDP shards it in place)
        if distributed.world_size() > 1:  # launch.num_processes of them (components/rl/build.py checks the launch)
            # A separate critic loaded from another model may hold layers the value never reads (a pooler).
            module, accelerator = distributed.data_parallel(policy_value, find_unused_parameters=critic_type == "separate",
                                                            trained_precision=memory.trained_precision)
            if distributed.is_sharded(module) and memory.trained_precision == "fp16_mixed":
                # each rank would check only its own gradient shards for fp16 overflow and could skip a step alone
                raise ConfigError("memory.trained_precision=fp16_mixed is not supported under FSDP (its loss scaler would "
                                  "decide per shard): use bf16_mixed, or data parallelism without FSDP")
        self.experience_maker = ExperienceMaker(policy_value, self.reference, tokenizer, reward_fn, rl, generation, self.reward,
                                                eos_token_ids(tokenizer, policy).to(self.device), pad_id(tokenizer),
                                                use_chat_template, memory)
        # fused: one kernel for all parameters instead of a loop of small ops per tensor (the CPU default)
        self.optimizer = torch.optim.AdamW(self._trainable_parameters(), lr=rl.learning_rate, weight_decay=0.0,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.learner = Learner(module, self.optimizer, rl, generation.temperature, generation.max_new_tokens, accelerator,
                               has_critic=critic_type != "none", memory=memory, device=self.device)
        total_iterations = math.ceil(rl.total_episodes / rl.episodes_per_iteration)
        linear = rl.lr_schedule == "linear"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: max(0.0, 1.0 - i / total_iterations) if linear else 1.0)
        self.kl_ctl = kl_controller(rl.kl_coef, rl.adaptive_kl, rl.target_kl, rl.kl_horizon)

        # Our own generators: sampling, minibatch shuffling, prompt order. Checkpointed.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.prompt_generator = torch.Generator().manual_seed(seed + 2)
        self.prompt_order: list[int] = []
        self.prompt_cursor = 0

        self.iteration = 0
        self.episodes = 0
        self.recent_scores: deque[float] = deque(maxlen=rl.target_window)
        self.history: list[dict[str, float]] = []  # every iteration's statistics, checkpointed with the weights

    @property
    def accelerator(self):
        return self.learner.accelerator

    @property
    def packed_models(self) -> list[str]:
        """The models whose forwards run on packed episodes: `rl.pack_sequences` is on and the family keeps packed
        episodes apart (the reference is the policy's family)."""
        module = self.experience_maker.policy_value
        return [name for name, packed in (("policy", module.pack_policy), ("critic", module.pack_critic)) if packed]

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.policy] + [m for m in (self.value_head, self.critic) if m is not None]
        seen, params = set(), []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # ------------------------------------------------------------------ one iteration

    def run_iteration(self, prompts: Sequence) -> dict[str, float]:
        """One iteration on `prompts` (`rl.samples_per_prompt` episodes each). Returns the statistics (see the module
        docstring)."""
        if len(prompts) == 0:
            raise TrainingError(f"iteration {self.iteration + 1}: empty prompt batch")
        start = time.perf_counter()
        iteration, kl_coef, lr = self.iteration + 1, self.kl_ctl.kl_coef, self.scheduler.get_last_lr()[0]
        exp, times = self.experience_maker.make(prompts, kl_coef, iteration, self.sample_generator)
        estimate_advantages(exp, self.rl)
        update_start = time.perf_counter()
        update_stats = self.learner.learn(exp, iteration, self.shuffle_generator, kl_coef)
        update_time = distributed.mean_over_ranks(time.perf_counter() - update_start)
        times = {name: distributed.mean_over_ranks(seconds) for name, seconds in times.items()}

        kl_per_sequence = exp.kl.sum(1)
        stats = {
            "objective/scores": exp.scores.mean().item(),
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/non_score_reward": (exp.rewards.sum(1) - exp.shaped_scores).mean().item(),
            "objective/rlhf_reward": exp.rewards.sum(1).mean().item(),
            "objective/sequence_entropy": (-exp.logprobs).sum(1).mean().item(),
            **update_stats,
            "kl_coef": kl_coef,
            "lr": lr,
            "response/length_mean": exp.mask.sum(1).mean().item(),
            "response/eos_fraction": exp.ended_with_eos.float().mean().item(),
        }
        if self.rl.samples_per_prompt > 1:
            stats.update(group_stats(exp.shaped_scores, self.rl.samples_per_prompt))
        if exp.values is not None:
            stats["val/explained_variance"] = explained_variance(exp.values, exp.returns, exp.mask)
            stats["val/mean"] = masked_mean(exp.values, exp.mask).item()
        self.kl_ctl.update(stats["objective/kl"], exp.size)
        self.scheduler.step()
        self.iteration = iteration
        self.episodes += exp.size
        self.recent_scores.append(stats["objective/scores"])
        elapsed = distributed.mean_over_ranks(time.perf_counter() - start)
        stats.update({"episodes": float(self.episodes), "iteration": float(self.iteration),
                      "perf/tokens_per_second": exp.mask.sum().item() / elapsed, **times, "time/update": update_time})
        return stats

    # ------------------------------------------------------------------ the loop and stopping

    @property
    def stop_reason(self) -> str | None:
        """"target_score" once the mean score over the last `target_window` iterations reaches `rl.target_score`
        (a full window is required), "total_episodes" once `rl.total_episodes` episodes are done."""
        target = self.rl.target_score
        if target is not None and len(self.recent_scores) == self.rl.target_window:
            if sum(self.recent_scores) / len(self.recent_scores) >= target:
                return "target_score"
        if self.episodes >= self.rl.total_episodes:
            return "total_episodes"
        return None

    def next_prompts(self, prompts: Sequence) -> list:
        """The next `rl.rollout_batch_size` prompts, cycling through `prompts` in a fresh seeded order each pass."""
        if len(prompts) == 0:
            raise TrainingError("no prompts to train on")
        batch: list = []
        while len(batch) < self.rl.rollout_batch_size:
            if self.prompt_cursor >= len(self.prompt_order) or len(self.prompt_order) != len(prompts):
                self.prompt_order = torch.randperm(len(prompts), generator=self.prompt_generator).tolist()
                self.prompt_cursor = 0
            take = min(self.rl.rollout_batch_size - len(batch), len(self.prompt_order) - self.prompt_cursor)
            batch.extend(prompts[i] for i in self.prompt_order[self.prompt_cursor : self.prompt_cursor + take])
            self.prompt_cursor += take
        return batch

    def train(self, prompts: Sequence, iterations: int | None = None, callback: Callback | None = None) -> TrainResult:
        """Run iterations until `iterations` are done, the target reward is met, or `total_episodes` episodes."""
        history: list[dict[str, float]] = []
        while True:
            reason = self.stop_reason
            if reason is None and iterations is not None and len(history) >= iterations:
                reason = "iterations"
            if reason is not None:
                return TrainResult(reason, len(history), self.episodes, history)
            stats = self.run_iteration(self.next_prompts(prompts))
            history.append(stats)
            self.history.append(stats)
            if callback is not None:
                callback(stats)

    # ------------------------------------------------------------------ state (state.py)

    def save_checkpoint(self, directory: str | Path) -> Path:
        return state.save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        state.load_checkpoint(self, directory)

    def export_policy(self, directory: str | Path, merge: bool = True) -> Path:
        return state.export_policy(self.policy, self.tokenizer, directory, merge)

    def checkpoint_bytes(self) -> int:
        """About what a checkpoint of this trainer takes on disk: the trainable weights and AdamW's two moments."""
        return 3 * sum(p.numel() * p.element_size() for p in self._trainable_parameters())


def _check_lengths(policy: PreTrainedModel, generation: GenerationConfig, encoder_decoder: bool) -> None:
    positions = positions_of(policy.config)  # the pipeline checked these before loading (lengths.check_lengths)
    if positions and encoder_decoder:  # the encoder reads the prompt, the decoder writes the response
        if max(generation.max_prompt_tokens, generation.max_new_tokens + 1) > positions:
            raise ConfigError(
                f"generation.max_prompt_tokens ({generation.max_prompt_tokens}) or generation.max_new_tokens "
                f"({generation.max_new_tokens}) exceed the policy's {positions} positions"
            )
    elif positions and generation.max_prompt_tokens + generation.max_new_tokens > positions:
        raise ConfigError(
            f"generation.max_prompt_tokens ({generation.max_prompt_tokens}) + generation.max_new_tokens "
            f"({generation.max_new_tokens}) exceed the policy's {positions} positions"
        )


def build_trainer(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, reward_fn: RewardFn, *, rl: RLConfig,
                  generation: GenerationConfig, reward: RewardConfig, critic: CriticConfig, lora: LoraConfig,
                  seed: int = 0, use_chat_template: bool = False, memory: MemoryConfig | None = None) -> Trainer:
    """The one way a trainer is built from configuration sections (the flow, the launched processes and the benchmarks
    alike). With `critic.type: separate`, the critic is loaded (components.models.loading.load_critic); with `lora.enabled`,
    LoRA adapters are injected into `policy` and only they (and the value head) train."""

    critic_module = load_critic(critic, reward, tokenizer) if critic.type == "separate" else None
    if lora.enabled:
        policy = with_lora(policy, lora)
    return Trainer(policy, tokenizer, reward_fn, rl, generation, reward, critic=critic_module, critic_type=critic.type,
                   seed=seed, use_chat_template=use_chat_template, memory=memory)
