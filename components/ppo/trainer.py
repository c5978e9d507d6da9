"""PPO for language models: rollout -> score -> rewards -> GAE -> clipped updates -> KL control.

One iteration (`PPOTrainer.step`) on a batch of prompts:
  1. experience making: sample responses with our KV-cache loop (old log-probs and old values come
     from the same forward), one reference forward for the reference log-probs (for a LoRA policy the
     reference is the policy with its adapter switched off);
  2. score prompt + completion with the reward function (told which completions ended with EOS);
  3. rewards r_t = -kl_coef (log pi - log pi_ref) on every real token, + score on the last real token;
  4. GAE advantages and returns, advantages whitened over the batch;
  5. `ppo_epochs` passes over shuffled minibatches: clipped surrogate + clipped value loss (+ entropy bonus);
  6. update the KL coefficient (fixed, or adaptive towards `target_kl`).

Statistics returned by `step` (and passed to the `train` callback), named as in TRL / OpenRLHF:

| name                        | meaning                                                                          |
|-----------------------------|----------------------------------------------------------------------------------|
| objective/scores            | mean reward-model score, before penalties, normalisation and clipping            |
| objective/kl                | mean over sequences of sum_t (logp_t - ref_logp_t)                               |
| objective/non_score_reward  | mean over sequences of sum_t -kl_coef (logp_t - ref_logp_t)                      |
| objective/rlhf_reward       | mean over sequences of sum_t r_t: the score used in training minus the KL penalty |
| objective/entropy           | mean over sequences of sum_t -logp_t of the sampled tokens                       |
| policy/approxkl             | 0.5 mean (log ratio)^2 over tokens, averaged over micro-batches of all epochs     |
| policy/clipfrac             | share of tokens where the clipped surrogate is active                            |
| policy/entropy              | mean per-token entropy of the policy's distribution during the update            |
| policy/ratio                | mean probability ratio pi / pi_old during the update                             |
| loss/policy                 | clipped surrogate loss                                                           |
| loss/value                  | clipped value loss (before vf_coef)                                              |
| val/clipfrac                | share of tokens where the clipped value loss is active                           |
| val/explained_variance      | 1 - Var[R - V] / Var[R] of the rollout values                                    |
| val/mean                    | mean rollout value over real tokens                                              |
| kl_coef                     | the KL coefficient used for this iteration's rewards                             |
| lr                          | learning rate used for this iteration's updates                                  |
| response/length_mean        | mean response length in tokens (the EOS counts)                                  |
| response/eos_fraction       | share of responses that ended with EOS                                           |
| episodes                    | cumulative episodes (prompts) trained on                                         |
| iteration                   | PPO iterations done                                                              |
| perf/tokens_per_second      | response tokens of the iteration / its wall-clock time                           |
| time/rollout                | seconds: sampling, reference log-probs (and separate critic values)              |
| time/scoring                | seconds: decoding and the reward function                                        |
| time/update                 | seconds: the PPO epochs                                                          |
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import GenerationConfig, PPOConfig, RewardConfig, RunConfig
from components.models import fuse_gelu
from components.ppo import distributed
from components.ppo.actor_critic import (
    Critic, ValueHead, backbone_of, classifier_head, hidden_size, is_encoder_decoder, reference_of, unwrap,
)
from components.ppo.checkpoint import resolve_checkpoint, write_atomically
from components.ppo.core import (
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    logprobs_of,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from components.ppo.kl_controller import kl_controller
from components.ppo.packing import packs_sequences
from components.ppo.rollout import (
    decode,
    eos_token_ids,
    pad_id,
    prompt_padding_side,
    render_prompts,
    response_forward,
    response_hidden,
    response_logprobs,
    sample,
    tokenize_prompts,
)
from components.reward import score_completions

# (prompts, completions) -> scores (B,); one with an `ended_with_eos` parameter (RewardScorer) also gets which
# completions ended with the policy's EOS (components.reward.score_completions).
RewardFn = Callable[..., torch.Tensor]
T = TypeVar("T")
Callback = Callable[[dict[str, float]], None]

STOP_REASONS = ("iterations", "target_reward", "max_steps")
LEARN_STATS = ("policy/approxkl", "policy/clipfrac", "policy/ratio", "val/clipfrac", "policy/entropy", "loss/policy", "loss/value")


class PPOError(RuntimeError):
    """Training cannot go on (non-finite values, bad reward output); raised before any optimizer step
    or checkpoint of the failing iteration, so the last good checkpoint is intact."""


@dataclass
class Experience:
    """One batch of episodes, ready for learning. Token tensors are (B, T); padding is 0."""

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,) raw reward-model scores
    kl: torch.Tensor  # (B, T) logp - ref_logp
    ended_with_eos: torch.Tensor  # (B,)


@dataclass
class TrainResult:
    stop_reason: str  # one of STOP_REASONS
    iterations: int  # iterations run by this call
    episodes: int  # cumulative episodes
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class PolicyValue(torch.nn.Module):
    """What the update trains, as one module (so a data-parallel wrapper sees one forward): the policy's
    logits over the response positions and the values there, from the shared value head on the policy's
    hidden states or from the separate critic."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead | None, critic: Critic | None,
                 pack_policy: bool = False, pack_critic: bool = False):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic
        self.pack_policy, self.pack_critic = pack_policy, pack_critic  # forwards on packed episodes (packing.py)

    def forward(self, queries, query_mask, responses, mask) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = response_forward(self.policy, queries, query_mask, responses, mask, pack=self.pack_policy)
        if self.value_head is not None:
            return logits, self.value_head(hidden)
        return logits, self.critic_values(queries, query_mask, responses, mask)

    def critic_values(self, queries, query_mask, responses, mask) -> torch.Tensor:
        """V(s_t) of the separate critic at the positions that predict each response token."""
        hidden = response_hidden(None, queries, query_mask, responses, mask, backbone=self.critic.backbone, pack=self.pack_critic)
        return self.critic.value_head(hidden)

    def rollout(self, run: Callable[[], T]) -> T:
        """`run()`: the experience making's forwards, which call the policy's parts (and the critic, and a LoRA
        policy with its adapter off) directly rather than `forward`. Under FSDP this is registered as a forward
        method, so the sharded parameters are gathered around it (`distributed.fully_sharded`)."""
        return run()

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes of the policy (and critic) models: the units Accelerate's FSDP auto-wrap policy
        shards one by one unless the config names them (`fsdp_transformer_layer_cls_to_wrap`)."""
        models = [unwrap(self.policy)] + ([self.critic.backbone] if self.critic is not None else [])
        return sorted({name for model in models for name in (getattr(model, "_no_split_modules", None) or [])})


class PPOTrainer:
    """The PPO engine. Knows nothing of Prefect or MLflow: metrics go to a callback.

    `policy` is the starting causal LM or encoder-decoder (trained in place); `reference` defaults to a
    frozen copy of it, or, for a LoRA (PEFT) policy, to the policy with its adapter switched off.
    `value_head="shared"` reads values from the policy's last hidden state (the decoder's, for an
    encoder-decoder; one forward for both); `"separate"` (causal LMs) uses `critic` (a backbone such as
    AutoModel, or a `Critic`), default a copy of the policy's backbone.

    The same code runs in N data-parallel processes (a torch.distributed process group, e.g. from
    `accelerate launch`), replicated or sharded by FSDP2 as the Accelerate config says, taking the same steps
    as one process over the same global batch: see `distributed`.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_fn: RewardFn,
        ppo: PPOConfig,
        generation: GenerationConfig,
        reward: RewardConfig | None = None,
        reference: PreTrainedModel | None = None,
        critic: torch.nn.Module | None = None,
        value_head: str = "shared",
        seed: int = 0,
        use_chat_template: bool = False,
    ):
        if value_head not in ("shared", "separate"):
            raise ValueError(f"value_head={value_head!r}; allowed: 'shared', 'separate'")
        self.encoder_decoder = is_encoder_decoder(policy)
        if value_head == "separate" and self.encoder_decoder:
            raise ValueError("policy.value_head=separate is for causal LMs; an encoder-decoder policy uses the shared value head")
        if use_chat_template:
            render_prompts(tokenizer, ["x"])  # fails now, naming the tokenizer, if it has no chat template
        self.ppo, self.generation = ppo, generation
        self.reward = reward if reward is not None else RewardConfig()
        self.tokenizer, self.reward_fn, self.seed = tokenizer, reward_fn, seed
        self.use_chat_template = use_chat_template
        self.device = policy.device
        fuse_gelu(policy)  # before the reference is copied from it
        self.policy = policy.eval()  # eval: dropout off (LoRA's too), so rollout and update log-probs agree
        self.reference = reference_of(policy) if reference is None else reference.eval().requires_grad_(False)
        self.value_head_type = value_head
        if value_head == "shared":
            self.value_head: ValueHead | None = ValueHead(hidden_size(policy)).to(self.device)
            self.critic: Critic | None = None
        else:
            self.value_head = None
            self.critic = _as_critic(critic if critic is not None else copy.deepcopy(backbone_of(policy))).to(self.device).eval()
            fuse_gelu(self.critic)
        positions = getattr(policy.config, "max_position_embeddings", None)
        if positions and self.encoder_decoder:  # the encoder reads the prompt, the decoder writes the response
            if max(generation.max_prompt_tokens, generation.max_new_tokens + 1) > positions:
                raise ValueError(
                    f"generation.max_prompt_tokens ({generation.max_prompt_tokens}) or generation.max_new_tokens "
                    f"({generation.max_new_tokens}) exceed the policy's {positions} positions"
                )
        elif positions and generation.max_prompt_tokens + generation.max_new_tokens > positions:
            raise ValueError(
                f"generation.max_prompt_tokens ({generation.max_prompt_tokens}) + generation.max_new_tokens "
                f"({generation.max_new_tokens}) exceed the policy's {positions} positions"
            )
        self.eos_ids = eos_token_ids(tokenizer, policy).to(self.device)
        self.pad_token_id = pad_id(tokenizer)

        # Packing (ppo.pack_sequences) where the model's attention keeps packed episodes apart; checked now,
        # before any data-parallel wrapping. The reference is the policy's family.
        pack = ppo.pack_sequences and not self.encoder_decoder
        self.policy_value = PolicyValue(
            self.policy, self.value_head, self.critic,
            pack_policy=pack and packs_sequences(backbone_of(self.policy)),
            pack_critic=pack and self.critic is not None and packs_sequences(self.critic.backbone),
        )
        self.learner: torch.nn.Module = self.policy_value  # or its data-parallel wrapper (FSDP shards it in place)
        self.accelerator = None
        if distributed.world_size() > 1:
            if ppo.gradient_accumulation_steps % distributed.world_size():
                raise ValueError(
                    f"ppo.gradient_accumulation_steps ({ppo.gradient_accumulation_steps}) must be a multiple of the "
                    f"{distributed.world_size()} processes: each takes the same number of micro-batches per minibatch"
                )
            # A separate critic loaded from another model may hold layers the value never reads (a pooler).
            self.learner, self.accelerator = distributed.data_parallel(self.policy_value, find_unused_parameters=value_head == "separate")
        # fused: one kernel for all parameters instead of a loop of small ops per tensor (the CPU default)
        self.optimizer = torch.optim.AdamW(self._trainable_parameters(), lr=ppo.learning_rate, weight_decay=0.0,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.total_iterations = math.ceil(ppo.max_steps / ppo.batch_size)
        total = self.total_iterations
        linear = ppo.lr_schedule == "linear"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: max(0.0, 1.0 - i / total) if linear else 1.0
        )
        self.kl_ctl = kl_controller(ppo.kl_coef, ppo.adaptive_kl, ppo.target_kl, ppo.horizon)
        self.score_moments = RunningMoments()

        # Our own generators: sampling, minibatch shuffling, prompt order. Checkpointed.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.prompt_generator = torch.Generator().manual_seed(seed + 2)
        self._prompt_order: list[int] = []
        self._prompt_cursor = 0

        self.iteration = 0
        self.episodes = 0
        self.recent_scores: deque[float] = deque(maxlen=ppo.target_window)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_fn: RewardFn,
        reference: PreTrainedModel | None = None,
        critic: torch.nn.Module | None = None,
    ) -> "PPOTrainer":
        """A trainer from a run configuration and loaded models. With `policy.value_head: separate` and no
        `critic`, the critic's backbone is loaded from `policy.critic_model`, else from the reward model when it
        shares the policy's vocabulary, else copied from the policy. With `policy.lora.enabled`, LoRA adapters
        are injected into `policy`, only they (and the value head) are trained, and the reference is the
        policy with its adapter switched off."""
        if cfg.policy.value_head == "separate" and critic is None:
            critic = _load_critic_backbone(cfg, tokenizer)
        if cfg.policy.lora.enabled:
            policy = with_lora(policy, cfg.policy.lora)
        return cls(
            policy, tokenizer, reward_fn, cfg.ppo, cfg.generation, cfg.reward,
            reference=reference, critic=critic, value_head=cfg.policy.value_head, seed=cfg.seed,
            use_chat_template=cfg.policy.use_chat_template,
        )

    @classmethod
    def from_checkpoint(cls, directory: str | Path, policy: PreTrainedModel, *args, **kwargs) -> "PPOTrainer":
        """Resume: build a trainer around the STARTING policy (the reference is copied from it, or is it with
        the adapter off), then load the checkpointed weights and state. Arguments after `policy` are the
        constructor's (a LoRA policy is passed with its adapter injected, as `from_config` does)."""
        trainer = cls(policy, *args, **kwargs)
        trainer.load_checkpoint(directory)
        return trainer

    @property
    def packed_models(self) -> list[str]:
        """The models whose forwards run on packed episodes: `ppo.pack_sequences` is on and the family keeps
        packed episodes apart (the reference is the policy's family)."""
        flags = (("policy", self.policy_value.pack_policy), ("critic", self.policy_value.pack_critic))
        return [name for name, packed in flags if packed]

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.policy, self.value_head if self.value_head is not None else self.critic]
        seen, params = set(), []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # ------------------------------------------------------------------ experience making

    def make_experience(self, prompts: Sequence[str]) -> tuple[Experience, dict[str, float]]:
        """Rollout, scoring, rewards and advantages for one batch of prompts. Under N data-parallel processes
        each rolls out and scores its contiguous share, and the experience returned is the whole batch's."""
        iteration = self.iteration + 1
        share = distributed.shard(len(prompts))
        rows = (share.start, len(prompts)) if distributed.world_size() > 1 else None
        prompts = list(prompts)[share]
        queries, query_mask = tokenize_prompts(
            self.tokenizer, prompts, self.generation, self.use_chat_template, prompt_padding_side(self.policy)
        )
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        start = time.perf_counter()
        rollout, ref_logprobs, values = self.policy_value.rollout(lambda: self._rollout(queries, query_mask, rows))
        distributed.reshard(self.policy_value)
        rollout_time = time.perf_counter() - start

        start = time.perf_counter()
        # The reward model judges the prompt as written (as the evaluation does) + the decoded completion, and
        # its own EOS after a completion the policy ended (reward.append_eos).
        completions = decode(self.tokenizer, rollout)[1]
        scores = self._score(list(prompts), completions, rollout.ended_with_eos.tolist(), iteration)
        scoring_time = time.perf_counter() - start

        mask = rollout.mask.clone()
        logprobs, ref_logprobs, values = rollout.logprobs.clone(), ref_logprobs.clone(), values.clone()
        for name, tensor in (("log-probabilities", logprobs), ("reference log-probabilities", ref_logprobs), ("values", values)):
            bad = ~torch.isfinite(tensor).all(1)
            if bad.any():
                raise PPOError(f"iteration {iteration}: non-finite {name} for episodes {bad.nonzero().flatten().tolist()}")

        left = prompt_padding_side(self.policy) == "left"
        queries, query_mask, responses, mask, logprobs, ref_logprobs, values, scores, ended = distributed.gather_rows(
            (rollout.queries, rollout.query_mask, rollout.responses, mask, logprobs, ref_logprobs, values, scores,
             rollout.ended_with_eos),
            pad_values=(self.pad_token_id, 0, self.pad_token_id, 0, 0, 0, 0, 0, False),
            left_padded=(left, left, False, False, False, False, False, False, False),
        )
        ended = ended.clone()
        shaped = scores.to(self.device).clone()
        if self.reward.missing_eos_penalty is not None:
            shaped[~ended] -= self.reward.missing_eos_penalty
        if self.reward.normalize:
            self.score_moments.update(shaped)
            shaped = self.score_moments.normalize(shaped)
        if self.reward.clip is not None:
            shaped = shaped.clamp(-self.reward.clip, self.reward.clip)

        rewards, kl = compute_rewards(shaped, logprobs, ref_logprobs, mask, self.kl_ctl.kl_coef)
        advantages, returns = compute_gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        experience = Experience(
            queries=queries.clone(), query_mask=query_mask.clone(), responses=responses.clone(),
            mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
            advantages=advantages, returns=returns, scores=scores, kl=kl, ended_with_eos=ended,
        )
        return experience, {"time/rollout": rollout_time, "time/scoring": scoring_time}

    @torch.no_grad()  # not inference mode: under FSDP the gathered parameters are reused by the update
    def _rollout(self, queries: torch.Tensor, query_mask: torch.Tensor, rows: tuple[int, int] | None):
        """(rollout, reference log-probabilities, values): sampling, the reference forward, the critic's."""
        rollout = sample(
            self.policy, queries, query_mask, self.generation, self.eos_ids, self.pad_token_id,
            self.sample_generator, self.value_head, rows,
        )
        args = (rollout.queries, rollout.query_mask, rollout.responses, rollout.mask)
        ref_logprobs = response_logprobs(self.reference, *args, self.generation.temperature, pack=self.policy_value.pack_policy)
        if self.critic is not None:
            values = self.policy_value.critic_values(*args) * rollout.mask
        else:
            values = rollout.values
        return rollout, ref_logprobs, values

    def _score(self, prompts: list[str], completions: list[str], ended_with_eos: list[bool], iteration: int) -> torch.Tensor:
        raw = score_completions(self.reward_fn, prompts, completions, ended_with_eos)
        try:
            scores = torch.as_tensor(raw, dtype=torch.float32).detach().clone().cpu()
        except (TypeError, ValueError) as exc:
            raise PPOError(f"iteration {iteration}: the reward function returned {type(raw).__name__}, not scores: {exc}") from exc
        if scores.shape != (len(completions),):
            raise PPOError(
                f"iteration {iteration}: the reward function returned scores of shape {tuple(scores.shape)} "
                f"for {len(completions)} completions; expected ({len(completions)},)"
            )
        bad = ~torch.isfinite(scores)
        if bad.any():
            raise PPOError(
                f"iteration {iteration}: the reward function returned non-finite scores (NaN/inf) for "
                f"episodes {bad.nonzero().flatten().tolist()}; no update was made"
            )
        return scores

    # ------------------------------------------------------------------ learning

    def _micro_batch_loss(self, exp: Experience, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query_mask = exp.query_mask[index]
        # Trim: keep only the prompt columns some row uses (prompts are padded on one side), and the
        # response columns up to the longest response (responses are right-padded).
        used = query_mask.bool().any(0)
        width = int(exp.mask[index].sum(1).max())
        queries, query_mask = exp.queries[index][:, used], query_mask[:, used]
        cut = lambda t: t[index, :width]  # noqa: E731
        responses, mask = cut(exp.responses), cut(exp.mask)

        logits, values = self.learner(queries, query_mask, responses, mask)
        logits = logits.float() / self.generation.temperature
        logprobs = logprobs_of(logits, responses)

        pg_loss, stats = policy_loss(logprobs, cut(exp.logprobs), cut(exp.advantages), mask, self.ppo.clip_range)
        vf_loss, vstats = value_loss(values, cut(exp.values), cut(exp.returns), mask, self.ppo.clip_range_value)
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        if self.ppo.ent_coef > 0:
            entropy = masked_mean(entropy_from_logits(logits), mask)
            loss = loss - self.ppo.ent_coef * entropy
        else:
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), mask)
        stats.update(vstats)
        stats.update({"policy/entropy": entropy.detach(), "loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach()})
        return loss, stats

    @staticmethod
    def _backward(loss: torch.Tensor, stats: dict[str, torch.Tensor], iteration: int, epoch: int, minibatch: int, weight: float) -> None:
        """Backward of `loss * weight`: the micro-batch's share of its minibatch (1 / gradient_accumulation_steps),
        times the number of ranks, whose mean DistributedDataParallel takes, so the ranks' gradients add up."""
        if not torch.isfinite(loss):
            raise PPOError(
                f"iteration {iteration}: non-finite loss (policy {stats['loss/policy'].item()}, "
                f"value {stats['loss/value'].item()}) in epoch {epoch}, minibatch {minibatch}; "
                f"no optimizer step was taken for it"
            )
        (loss * weight).backward()

    def learn(self, exp: Experience) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches; one optimizer step per minibatch. Under N processes
        the micro-batches of each minibatch are dealt out among them and the gradients summed over ranks by
        DistributedDataParallel (Accelerate) or FSDP2 (each rank then steps its shards)."""
        iteration = self.iteration + 1
        batch = exp.queries.shape[0]
        mini = self.ppo.mini_batch_size
        micro = max(1, mini // self.ppo.gradient_accumulation_steps)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # under FSDP, the shards
        max_norm = self.ppo.max_grad_norm if self.ppo.max_grad_norm is not None else float("inf")
        totals = dict.fromkeys(LEARN_STATS, 0.0)
        count = 0
        ranks, rank = distributed.world_size(), distributed.rank()
        for epoch in range(self.ppo.ppo_epochs):
            order = torch.randperm(batch, generator=self.shuffle_generator).to(self.device)
            for minibatch_number, start in enumerate(range(0, batch, mini)):
                minibatch = order[start : start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                mine = [s for n, s in enumerate(range(0, len(minibatch), micro)) if n % ranks == rank]
                for micro_start in mine:
                    index = minibatch[micro_start : micro_start + micro]
                    # Data-parallel: the gradients are all-reduced once per minibatch, on its last micro-batch.
                    last = micro_start == mine[-1]
                    with distributed.no_sync(self.learner, self.accelerator) if self.accelerator and not last else contextlib.nullcontext():
                        loss, stats = self._micro_batch_loss(exp, index)
                        self._backward(loss, stats, iteration, epoch, minibatch_number, len(index) / len(minibatch) * ranks)
                    for name, value in stats.items():
                        totals[name] = totals.get(name, 0.0) + value.item()
                    count += 1
                grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not torch.isfinite(grad_norm):
                    raise PPOError(
                        f"iteration {iteration}: non-finite gradient norm in epoch {epoch}, minibatch {minibatch_number}; "
                        f"no optimizer step was taken for it"
                    )
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed = distributed.all_sum(torch.tensor([*totals.values(), count], dtype=torch.float64)).tolist()
        return {name: total / summed[-1] for name, total in zip(totals, summed)}

    # ------------------------------------------------------------------ one iteration

    def step(self, prompts: Sequence[str]) -> dict[str, float]:
        """One PPO iteration on `prompts` (one episode each). Returns the statistics (see module docstring)."""
        if len(prompts) == 0:
            raise PPOError(f"iteration {self.iteration + 1}: empty prompt batch")
        start = time.perf_counter()
        kl_coef = self.kl_ctl.kl_coef
        lr = self.scheduler.get_last_lr()[0]
        exp, times = self.make_experience(prompts)
        update_start = time.perf_counter()
        update_stats = self.learn(exp)
        update_time = distributed.mean_over_ranks(time.perf_counter() - update_start)
        times = {name: distributed.mean_over_ranks(seconds) for name, seconds in times.items()}

        mask = exp.mask
        batch = exp.queries.shape[0]
        kl_per_sequence = exp.kl.sum(1)
        stats = {
            "objective/scores": exp.scores.mean().item(),
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/non_score_reward": (-kl_coef * kl_per_sequence).mean().item(),
            "objective/rlhf_reward": exp.rewards.sum(1).mean().item(),
            "objective/entropy": (-exp.logprobs).sum(1).mean().item(),
            **update_stats,
            "val/explained_variance": explained_variance(exp.values, exp.returns, mask),
            "val/mean": masked_mean(exp.values, mask).item(),
            "kl_coef": kl_coef,
            "lr": lr,
            "response/length_mean": mask.sum(1).mean().item(),
            "response/eos_fraction": exp.ended_with_eos.float().mean().item(),
        }
        self.kl_ctl.update(stats["objective/kl"], batch)
        self.scheduler.step()
        self.iteration += 1
        self.episodes += batch
        self.recent_scores.append(stats["objective/scores"])
        elapsed = distributed.mean_over_ranks(time.perf_counter() - start)
        stats.update({
            "episodes": float(self.episodes),
            "iteration": float(self.iteration),
            "perf/tokens_per_second": mask.sum().item() / elapsed,
            **times,
            "time/update": update_time,
        })
        return stats

    # ------------------------------------------------------------------ the loop and stopping

    @property
    def stop_reason(self) -> str | None:
        """"target_reward" once the mean score over the last `target_window` iterations reaches
        `ppo.target_reward` (a full window is required), "max_steps" once `ppo.max_steps` episodes are done."""
        target = self.ppo.target_reward
        if target is not None and len(self.recent_scores) == self.ppo.target_window:
            if sum(self.recent_scores) / len(self.recent_scores) >= target:
                return "target_reward"
        if self.episodes >= self.ppo.max_steps:
            return "max_steps"
        return None

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def next_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The next `ppo.batch_size` prompts, cycling through `prompts` in a fresh seeded order each pass."""
        if len(prompts) == 0:
            raise PPOError("no prompts to train on")
        batch: list[str] = []
        while len(batch) < self.ppo.batch_size:
            if self._prompt_cursor >= len(self._prompt_order) or len(self._prompt_order) != len(prompts):
                self._prompt_order = torch.randperm(len(prompts), generator=self.prompt_generator).tolist()
                self._prompt_cursor = 0
            take = min(self.ppo.batch_size - len(batch), len(self._prompt_order) - self._prompt_cursor)
            batch.extend(prompts[i] for i in self._prompt_order[self._prompt_cursor : self._prompt_cursor + take])
            self._prompt_cursor += take
        return batch

    def train(self, prompts: Sequence[str], iterations: int | None = None, callback: Callback | None = None) -> TrainResult:
        """Run iterations until `iterations` are done, the target reward is met, or `max_steps` episodes."""
        history: list[dict[str, float]] = []
        while True:
            reason = self.stop_reason
            if reason is None and iterations is not None and len(history) >= iterations:
                reason = "iterations"
            if reason is not None:
                return TrainResult(reason, len(history), self.episodes, history)
            stats = self.step(self.next_prompts(prompts))
            history.append(stats)
            if callback is not None:
                callback(stats)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Policy + value head (or critic), optimizer, scheduler, KL controller, score statistics, RNG states
        and counters, written atomically: the previous checkpoint stays intact until this one is complete.
        Under N processes only the main one writes (the state is the same on every rank, and the same as one
        process would have; under FSDP every rank first takes part in gathering the full weights and optimizer
        state), and all return once it is written."""
        weights = self._full_weights()
        if distributed.is_main_process():
            path = write_atomically(directory, lambda tmp: self._write_checkpoint(tmp, *weights))
        else:
            path = None
        distributed.barrier()
        return path if path is not None else Path(directory)

    @property
    def _head_name(self) -> str:
        return "value_head" if self.value_head is not None else "critic"

    def _full_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
        """(policy's trainable weights, value head's or critic's weights, optimizer state) as one process holds
        them. Unsharded, the head's weights are None: `save_model` writes the module itself (it drops tied
        duplicates). Sharded, a collective whose result only the main process gets."""
        if not distributed.is_sharded(self.learner):
            return trainable_state(self.policy), None, self.optimizer.state_dict()
        model_state, optimizer_state = distributed.full_state(self.learner, self.optimizer)
        if not model_state:
            return {}, {}, {}
        prefix = f"{self._head_name}."
        policy = {name: model_state[f"policy.{name}"].contiguous() for name in trainable_names(self.policy)}
        head = {name[len(prefix):]: value.contiguous() for name, value in model_state.items() if name.startswith(prefix)}
        return policy, head, optimizer_state

    def _write_checkpoint(self, path: Path, policy: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None, optimizer: dict) -> None:
        save_file(policy, str(path / "policy.safetensors"))
        if head is None:
            save_model(getattr(self, self._head_name), str(path / "value.safetensors"))
        else:
            save_file(head, str(path / "value.safetensors"))
        np_state = np.random.get_state()
        torch.save(
            {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                    "torch": torch.get_rng_state(),
                    "sample": self.sample_generator.get_state(),
                    "shuffle": self.shuffle_generator.get_state(),
                    "prompt": self.prompt_generator.get_state(),
                },
            },
            path / "trainer_state.pt",
        )
        state = {
            "iteration": self.iteration,
            "episodes": self.episodes,
            "recent_scores": list(self.recent_scores),
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "prompt_order": self._prompt_order,
            "prompt_cursor": self._prompt_cursor,
            "value_head": self.value_head_type,
            "ppo": self.ppo.model_dump(mode="json"),
            "generation": self.generation.model_dump(mode="json"),
            "reward": self.reward.model_dump(mode="json"),
        }
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, directory: str | Path) -> None:
        path = resolve_checkpoint(directory)
        state = json.loads((path / "trainer_state.json").read_text())
        if state["value_head"] != self.value_head_type:
            raise ValueError(f"checkpoint {path} has a {state['value_head']} value head, this trainer a {self.value_head_type} one")
        policy = load_file(str(path / "policy.safetensors"), device=str(self.device))
        blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        head = getattr(self, self._head_name)
        if distributed.is_sharded(self.learner):
            check_trainable_state(self.policy, policy, path)
            head_state = load_file(str(path / "value.safetensors"), device=str(self.device))
            if set(head_state) != set(head.state_dict()):
                raise ValueError(f"checkpoint {path} does not hold this trainer's {self._head_name} weights: {sorted(head_state)[:3]}...")
            weights = {f"policy.{name}": value for name, value in policy.items()}
            weights.update({f"{self._head_name}.{name}": value for name, value in head_state.items()})
            distributed.load_full_state(self.learner, self.optimizer, weights, blob["optimizer"])
        else:
            load_trainable_state(self.policy, policy, path)
            load_model(head, str(path / "value.safetensors"), device=str(self.device))
            self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        rng = blob["rng"]
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        self.sample_generator.set_state(rng["sample"])
        self.shuffle_generator.set_state(rng["shuffle"])
        self.prompt_generator.set_state(rng["prompt"])
        self.iteration, self.episodes = int(state["iteration"]), int(state["episodes"])
        self.recent_scores = deque(state["recent_scores"], maxlen=self.ppo.target_window)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self._prompt_order, self._prompt_cursor = list(state["prompt_order"]), int(state["prompt_cursor"])

    def export_policy(self, directory: str | Path, merge: bool = True) -> Path:
        """The policy LM (without value head) and tokenizer, via save_pretrained, for registration.

        A LoRA policy is saved merged into its base weights (`merge=True`, a plain model), or as the
        adapter alone (`merge=False`, `lora.save_mode: adapter`), which needs its base model to load."""

        def write(path: Path) -> None:
            model = self.policy
            if merge and hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)

        return write_atomically(directory, write)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that training changes: every parameter of a full fine-tune, the adapter of a LoRA policy."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def check_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = set(trainable_names(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"checkpoint {source} does not hold this policy's trainable weights (LoRA or full fine-tune, same model?): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    check_trainable_state(model, state, source)
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def lora_target_modules(policy: PreTrainedModel, lora) -> list[str] | str:
    """`policy.lora.target_modules`, else PEFT's default for the model family (e.g. c_attn for GPT-2,
    q_proj/v_proj for Llama, Qwen2, Mistral, OPT and BART, query_key_value for GPT-NeoX, q/v for T5)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if lora.target_modules:
        return list(lora.target_modules)
    model_type = policy.config.model_type
    if model_type not in DEFAULTS:
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}; set policy.lora.target_modules "
            f"to the names of its attention projections (e.g. [q_proj, v_proj])"
        )
    return DEFAULTS[model_type]


def with_lora(policy: PreTrainedModel, lora) -> torch.nn.Module:
    """Inject LoRA adapters (`policy.lora`) into the policy's own weights (no copy)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_modules(policy, lora),
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder(policy) else "CAUSAL_LM",
    )
    return get_peft_model(policy, config).eval()


def _as_critic(module: torch.nn.Module) -> Critic:
    if isinstance(module, Critic):
        return module
    if classifier_head(module) is not None:
        return Critic.from_classifier(module)  # a reward model: its scoring head starts the value head
    if isinstance(module, PreTrainedModel) and module.base_model is not module:
        module = module.base_model  # an LM or classifier: keep its backbone
    return Critic(module, hidden_size(module))


def _load_critic_backbone(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module | None:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from components.model_safety import loading

    source, revision = cfg.policy.critic_model, cfg.policy.revision
    key, allow_pickle = "policy.critic_model", cfg.policy.allow_pickle
    if source is None and not cfg.reward.model.startswith("models:"):
        try:
            reward_tokenizer = AutoTokenizer.from_pretrained(cfg.reward.model, revision=cfg.reward.revision)
            if reward_tokenizer.get_vocab() == tokenizer.get_vocab():
                source, revision = cfg.reward.model, cfg.reward.revision
                key, allow_pickle = "reward.model", cfg.reward.allow_pickle
        except OSError:
            pass
    if source is None:
        return None  # the trainer copies the policy's backbone
    if source.startswith("models:"):
        raise ValueError(f"policy.critic_model={source!r}: resolve registry URIs to a local path first")
    config = loading(source, key, allow_pickle, lambda **safe: AutoConfig.from_pretrained(
        source, revision=revision, trust_remote_code=False))
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and config.num_labels == 1:
        # A reward model: loaded with its scoring head, which starts the value head (see Critic.from_classifier).
        return loading(source, key, allow_pickle, lambda **safe: AutoModelForSequenceClassification.from_pretrained(
            source, revision=revision, dtype=torch.float32, **safe))
    return loading(source, key, allow_pickle, lambda **safe: AutoModel.from_pretrained(
        source, revision=revision, dtype=torch.float32, **safe))
