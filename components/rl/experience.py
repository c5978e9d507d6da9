"""Experience making: prompts -> sampled responses, their log-probabilities, the reference's, the critic's values,
the reward model's scores, and the per-token rewards. Learning never runs a model that experience making runs.

With `rl.samples_per_prompt` k > 1 each prompt is sampled k times, as k consecutive rows (its group). Under N
data-parallel processes each rolls out and scores its contiguous share of the groups (groups stay whole), and the
batch is gathered, so everything computed from it (score statistics, group baselines, advantages, the KL controller)
sees the whole batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from components.config import GenerationConfig, MemoryConfig, RewardConfig, RLConfig
from components.errors import TrainingError
from components.rl.reward import score_completions
from components.rl import distributed
from components.rl.core import RunningMoments, compute_rewards, logprobs_of
from components.rl.forward import response_forward, response_hidden, response_logprobs
from components.rl.precision import autocast
from components.rl.roles import Critic, ValueHead, unwrap
from components.rl.sampler import Samples, sample
from components.rl.tokenization import decode, prompt_padding_side, tokenize_prompts

T = TypeVar("T")
# (prompts, completions) -> scores (B,); one with an `ended_with_eos` parameter (RewardScorer) also gets which
# completions ended with the policy's EOS (components.rl.reward.score_completions).
RewardFn = Callable[..., torch.Tensor]


@dataclass
class Experience:
    """One batch of B episodes (the whole batch, gathered over processes), ready for learning. Token tensors are
    (B, P) for the prompt, (B, T) for the response, T trimmed to the longest response; padding is 0 in every float."""

    queries: torch.Tensor  # (B, P) prompt ids, left-padded (right-padded for an encoder-decoder)
    query_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    responses: torch.Tensor  # (B, T) response ids, pad after the first EOS
    mask: torch.Tensor  # (B, T) 1 on real response tokens: up to and including the first EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t) from the rollout, at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t | s_t)
    values: torch.Tensor | None  # (B, T) V_old(s_t) from the critic; None without one
    scores: torch.Tensor  # (B,) the reward model's scores, as returned (before shaping)
    shaped_scores: torch.Tensor  # (B,) the scores training uses (reward.*: missing-EOS penalty, normalisation, clip)
    rewards: torch.Tensor  # (B, T) -kl_coef * KL estimate on every token (rl.kl_placement: reward, else 0), + the
    #                        shaped score on the last real one
    kl: torch.Tensor  # (B, T) log pi_old - log pi_ref per token
    ended_with_eos: torch.Tensor  # (B,) bool
    advantages: torch.Tensor | None = None  # (B, T) set by the advantage estimator (core.estimate_advantages)
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (GAE), else None

    @property
    def size(self) -> int:
        return self.queries.shape[0]


class PolicyValue(torch.nn.Module):
    """What the update trains, as one module (so a data-parallel wrapper sees one forward): the policy's logits over
    the response positions and the values there, from the shared value head on the policy's hidden states, from the
    separate critic, or none."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead | None, critic: Critic | None,
                 pack_policy: bool = False, pack_critic: bool = False):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic
        self.pack_policy, self.pack_critic = pack_policy, pack_critic  # forwards on packed episodes (packing.py)

    def forward(self, queries, query_mask, responses, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, hidden = response_forward(self.policy, queries, query_mask, responses, mask, pack=self.pack_policy)
        if self.value_head is not None:
            return logits, self.value_head(hidden)
        if self.critic is not None:
            return logits, self.critic_values(queries, query_mask, responses, mask)
        return logits, None

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


class ExperienceMaker:
    """The actor (sampling), the reference, the critic and the reward model, run over one batch of prompts."""

    def __init__(self, policy_value: PolicyValue, reference, tokenizer, reward_fn: RewardFn, rl: RLConfig,
                 generation: GenerationConfig, reward: RewardConfig, eos_ids: torch.Tensor, pad_token_id: int,
                 use_chat_template: bool, memory: MemoryConfig | None = None):
        self.policy_value, self.reference, self.tokenizer, self.reward_fn = policy_value, reference, tokenizer, reward_fn
        self.rl, self.generation, self.reward = rl, generation, reward
        self.memory = memory if memory is not None else MemoryConfig()
        # Below float32 (autocast, or weights held in bf16: a pure-bf16 policy, a LoRA policy's bf16 base) the rollout's
        # log-probabilities are recomputed by the update's whole-sequence forward.
        self.recompute_logprobs = self.memory.trained_precision != "float32" or any(
            p.dtype != torch.float32 for p in policy_value.policy.parameters())
        self.eos_ids, self.pad_token_id, self.use_chat_template = eos_ids, pad_token_id, use_chat_template
        self.score_moments = RunningMoments()  # of the shaped scores, for reward.normalize; checkpointed

    @property
    def policy(self):
        return self.policy_value.policy

    def make(self, prompts: Sequence, kl_coef: float, iteration: int,
             sample_generator: torch.Generator) -> tuple[Experience, dict[str, float]]:
        """The experience of one batch: `rl.samples_per_prompt` episodes of each prompt, as consecutive rows; and the
        seconds its phases took (time/rollout, time/scoring)."""
        device = self.eos_ids.device  # where the run computes (FSDP's offload keeps the parameters in CPU memory)
        k = self.rl.samples_per_prompt
        prompts = [prompt for prompt in prompts for _ in range(k)]
        share = distributed.shard(len(prompts), group=k)
        rows = (share.start, len(prompts)) if distributed.world_size() > 1 else None
        prompts = prompts[share]
        queries, query_mask = tokenize_prompts(
            self.tokenizer, prompts, self.generation, self.use_chat_template, prompt_padding_side(self.policy)
        )
        queries, query_mask = queries.to(device), query_mask.to(device)
        start = time.perf_counter()
        samples, ref_logprobs, values = self.policy_value.rollout(
            lambda: self._rollout(queries, query_mask, rows, sample_generator))
        distributed.reshard(self.policy_value)
        rollout_time = time.perf_counter() - start

        start = time.perf_counter()
        # The reward model judges the prompt as written (as the evaluation does) + the decoded completion, and
        # its own EOS after a completion the policy ended (reward.append_eos).
        completions = decode(self.tokenizer, samples)[1]
        scores = self._score(list(prompts), completions, samples.ended_with_eos.tolist(), iteration)
        scoring_time = time.perf_counter() - start

        mask, logprobs, ref_logprobs = samples.mask.clone(), samples.logprobs.clone(), ref_logprobs.clone()
        has_values = values is not None
        values = values.clone() if has_values else torch.zeros_like(logprobs)
        for name, tensor in (("log-probabilities", logprobs), ("reference log-probabilities", ref_logprobs), ("values", values)):
            bad = ~torch.isfinite(tensor).all(1)
            if bad.any():
                raise TrainingError(f"iteration {iteration}: non-finite {name} for episodes {bad.nonzero().flatten().tolist()}")

        left = prompt_padding_side(self.policy) == "left"
        queries, query_mask, responses, mask, logprobs, ref_logprobs, values, scores, ended = distributed.gather_rows(
            (samples.queries, samples.query_mask, samples.responses, mask, logprobs, ref_logprobs, values, scores,
             samples.ended_with_eos),
            pad_values=(self.pad_token_id, 0, self.pad_token_id, 0, 0, 0, 0, 0, False),
            left_padded=(left, left, False, False, False, False, False, False, False),
        )
        shaped = self.shape(scores.to(device), ended)
        in_reward = self.rl.kl_placement == "reward"
        rewards, kl = compute_rewards(shaped, logprobs, ref_logprobs, mask, kl_coef if in_reward else 0.0, self.rl.kl_estimator)
        experience = Experience(
            queries=queries.clone(), query_mask=query_mask.clone(), responses=responses.clone(), mask=mask,
            logprobs=logprobs, ref_logprobs=ref_logprobs, values=values if has_values else None, scores=scores,
            shaped_scores=shaped, rewards=rewards, kl=kl, ended_with_eos=ended.clone(),
        )
        return experience, {"time/rollout": rollout_time, "time/scoring": scoring_time}

    def shape(self, scores: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """The score training uses: the missing-EOS penalty, running normalisation and clipping of `reward.*`."""
        shaped = scores.clone()
        if self.reward.missing_eos_penalty is not None:
            shaped[~ended] -= self.reward.missing_eos_penalty
        if self.reward.normalize:
            self.score_moments.update(shaped)
            shaped = self.score_moments.normalize(shaped)
        if self.reward.clip is not None:
            shaped = shaped.clamp(-self.reward.clip, self.reward.clip)
        return shaped

    @torch.no_grad()  # not inference mode: under FSDP the gathered parameters are reused by the update
    def _rollout(self, queries: torch.Tensor, query_mask: torch.Tensor, rows: tuple[int, int] | None,
                 generator: torch.Generator) -> tuple[Samples, torch.Tensor, torch.Tensor | None]:
        """(samples, reference log-probabilities, values or None): sampling, the reference forward, the critic's.
        All under the trained models' autocast (memory.trained_precision), the reference's too, so that a policy
        equal to its reference and held in its precision has a KL of exactly 0 (a float32 or mixed policy against a
        bf16 reference starts at the difference bf16 rounding makes). Below float32, the log-probabilities (and the shared
        head's values) of the sampled tokens are recomputed by the update's own whole-sequence forward: decoding
        token by token through the KV cache rounds differently, which would start the ratio away from 1 (OpenRLHF and
        veRL recompute them likewise)."""
        with autocast(queries.device, self.memory):
            samples = sample(
                self.policy, queries, query_mask, self.generation, self.eos_ids, self.pad_token_id,
                generator, self.policy_value.value_head, rows,
            )
            tensors = (samples.queries, samples.query_mask, samples.responses, samples.mask)
            # the whole-sequence forwards, generation.generation_batch_size rows at a time like the sampling
            size = self.generation.generation_batch_size or len(samples.queries)
            pieces = [[t[i : i + size] for t in tensors] for i in range(0, len(samples.queries), size)]
            pack, temperature = self.policy_value.pack_policy, self.generation.temperature
            ref_logprobs = torch.cat([response_logprobs(self.reference, *args, temperature, pack=pack) for args in pieces])
            if self.recompute_logprobs:
                recomputed = [self._policy_logprobs(*args) for args in pieces]
                samples.logprobs = torch.cat([logprobs for logprobs, _ in recomputed])
                if self.policy_value.value_head is not None:
                    samples.values = torch.cat([values for _, values in recomputed])
            if self.policy_value.critic is not None:
                values = torch.cat([self.policy_value.critic_values(*args).float() * args[3] for args in pieces])
            else:
                values = samples.values  # the shared head's, read during sampling; None without a critic
        return samples, ref_logprobs, values

    def _policy_logprobs(self, queries, query_mask, responses, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probabilities of the sampled tokens (and the shared head's values) by the update's own
        whole-sequence forward."""
        logits, hidden = response_forward(self.policy, queries, query_mask, responses, mask, pack=self.policy_value.pack_policy)
        logprobs = logprobs_of(logits.float() / self.generation.temperature, responses) * mask
        head = self.policy_value.value_head
        return logprobs, (head(hidden).float() * mask if head is not None else None)

    def _score(self, prompts: list, completions: list[str], ended_with_eos: list[bool], iteration: int) -> torch.Tensor:
        raw = score_completions(self.reward_fn, prompts, completions, ended_with_eos)
        try:
            scores = torch.as_tensor(raw, dtype=torch.float32).detach().clone().cpu()
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"iteration {iteration}: the reward function returned {type(raw).__name__}, not scores: {exc}") from exc
        if scores.shape != (len(completions),):
            raise TrainingError(
                f"iteration {iteration}: the reward function returned scores of shape {tuple(scores.shape)} "
                f"for {len(completions)} completions; expected ({len(completions)},)"
            )
        bad = ~torch.isfinite(scores)
        if bad.any():
            raise TrainingError(
                f"iteration {iteration}: the reward function returned non-finite scores (NaN/inf) for "
                f"episodes {bad.nonzero().flatten().tolist()}; no update was made"
            )
        return scores
