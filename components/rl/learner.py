"""Learning from a batch of experience: `rl.update_epochs` passes over shuffled minibatches, each one optimizer step
of the clipped policy loss (+ the clipped value loss when there is a critic, + the KL term with `rl.kl_placement:
loss`, - the entropy bonus), aggregated over tokens as `rl.loss_aggregation` says.

Under N processes the micro-batches of each minibatch are dealt out among them and their gradients summed over the
ranks by DistributedDataParallel (Accelerate) or FSDP2 (each rank then steps its own shards), so every rank takes
the same step as one process would.
"""

from __future__ import annotations

import contextlib

import torch

from components.config import MemoryConfig, RLConfig
from components.rl import distributed
from components.rl.precision import autocast, checkpointing, grad_scaler
from components.rl.core import aggregate, entropy_from_logits, kl_estimate, logprobs_of, masked_mean, policy_loss, value_loss
from components.errors import TrainingError
from components.rl.experience import Experience

STATS = ("policy/approxkl", "policy/clipfrac", "policy/ratio", "policy/token_entropy", "loss/policy")
VALUE_STATS = ("val/clipfrac", "loss/value")
KL_STATS = ("loss/kl",)


class Learner:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rl: RLConfig, temperature: float,
                 max_new_tokens: int, accelerator=None, has_critic: bool = True, memory: MemoryConfig | None = None,
                 device: torch.device | None = None):
        self.module = module  # PolicyValue, or its data-parallel wrapper
        self.optimizer, self.rl, self.temperature, self.accelerator = optimizer, rl, temperature, accelerator
        self.max_new_tokens = max_new_tokens  # the constant of rl.loss_aggregation: constant
        self.has_critic = has_critic
        self.memory = memory
        # where the run computes (FSDP's offload keeps the parameters themselves in CPU memory)
        device = device if device is not None else next(module.parameters()).device
        self.scaler = grad_scaler(device, memory)  # fp16_mixed's loss scale, else None

    def learn(self, exp: Experience, iteration: int, shuffle: torch.Generator, kl_coef: float = 0.0) -> dict[str, float]:
        """The iteration's optimizer steps; the statistics averaged over every micro-batch of every epoch."""
        names = STATS + (VALUE_STATS if self.has_critic else ()) + (KL_STATS if self.rl.kl_placement == "loss" else ())
        totals = dict.fromkeys(names, 0.0)
        with checkpointing(self.module):  # memory.activation_checkpointing: the armed layers recompute in the backward
            count = self._epochs(exp, iteration, shuffle, kl_coef, totals)
        self.optimizer.zero_grad(set_to_none=True)
        summed = distributed.all_sum(torch.tensor([*totals.values(), count], dtype=torch.float64)).tolist()
        return {name: total / summed[-1] for name, total in zip(totals, summed)}

    def _epochs(self, exp: Experience, iteration: int, shuffle: torch.Generator, kl_coef: float, totals: dict) -> int:
        """The update epochs; adds each micro-batch's statistics to `totals` and returns how many there were."""
        batch, mini = exp.size, self.rl.mini_batch_size
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # under FSDP, the shards
        max_norm = self.rl.max_grad_norm if self.rl.max_grad_norm is not None else float("inf")
        micro = max(1, mini // self.rl.gradient_accumulation_steps)
        ranks, rank = distributed.world_size(), distributed.rank()
        device = exp.queries.device
        count = 0
        for epoch in range(self.rl.update_epochs):
            order = torch.randperm(batch, generator=shuffle).to(device)
            for number, start in enumerate(range(0, batch, mini)):
                minibatch = order[start : start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                mine = [s for n, s in enumerate(range(0, len(minibatch), micro)) if n % ranks == rank]
                for micro_start in mine:
                    index = minibatch[micro_start : micro_start + micro]
                    # Data-parallel: the gradients are all-reduced once per minibatch, on its last micro-batch.
                    last = micro_start == mine[-1]
                    syncing = not self.accelerator or last
                    with contextlib.nullcontext() if syncing else distributed.no_sync(self.module, self.accelerator):
                        loss, stats = self.loss(exp, index, kl_coef)
                        # The micro-batch's share of its minibatch, times the ranks whose mean DDP takes.
                        weight = len(index) / len(minibatch) * ranks
                        if not torch.isfinite(loss):
                            raise TrainingError(
                                f"iteration {iteration}: non-finite loss ({', '.join(f'{k} {v.item()}' for k, v in stats.items() if k.startswith('loss/'))}) "
                                f"in epoch {epoch}, minibatch {number}; no optimizer step was taken for it"
                            )
                        if self.scaler is not None:
                            self.scaler.scale(loss * weight).backward()
                        else:
                            (loss * weight).backward()
                    for name, value in stats.items():
                        totals[name] += value.item()
                    count += 1
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if self.scaler is not None:  # an overflow skips the step and lowers the scale: fp16's normal course
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    continue
                if not torch.isfinite(grad_norm):
                    raise TrainingError(
                        f"iteration {iteration}: non-finite gradient norm in epoch {epoch}, minibatch {number}; "
                        f"no optimizer step was taken for it"
                    )
                self.optimizer.step()
        return count

    def loss(self, exp: Experience, index: torch.Tensor, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the episodes `index`: the clipped surrogate, + vf_coef * the clipped value loss, + kl_coef * the
        KL estimate (with the KL in the loss), - ent_coef * the entropy. The batch is trimmed to the prompt columns some row uses (prompts are padded on one side) and the
        response columns up to the longest response (responses are right-padded)."""
        query_mask = exp.query_mask[index]
        used = query_mask.bool().any(0)
        width = int(exp.mask[index].sum(1).max())
        queries, query_mask = exp.queries[index][:, used], query_mask[:, used]
        cut = lambda t: t[index, :width]  # noqa: E731
        responses, mask = cut(exp.responses), cut(exp.mask)

        with autocast(exp.queries.device, self.memory):
            logits, values = self.module(queries, query_mask, responses, mask)
        logits = logits.float() / self.temperature  # float32 from here on, whatever the weights' precision
        logprobs = logprobs_of(logits, responses)

        rl = self.rl
        pg_loss, stats = policy_loss(logprobs, cut(exp.logprobs), cut(exp.advantages), mask, rl.clip_range,
                                     rl.clip_range_high, rl.loss_aggregation, self.max_new_tokens)
        loss = pg_loss
        if rl.kl_placement == "loss":  # GRPO's beta * KL(pi || pi_ref), per token, aggregated as the policy loss
            kl_loss = aggregate(kl_estimate(logprobs, cut(exp.ref_logprobs), rl.kl_estimator), mask, rl.loss_aggregation,
                                self.max_new_tokens)
            loss = loss + kl_coef * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        if self.has_critic:
            vf_loss, value_stats = value_loss(values.float(), cut(exp.values), cut(exp.returns), mask, self.rl.clip_range_value)
            loss = loss + self.rl.vf_coef * vf_loss
            stats.update(value_stats)
            stats["loss/value"] = vf_loss.detach()
        if self.rl.ent_coef > 0:
            entropy = masked_mean(entropy_from_logits(logits), mask)
            loss = loss - self.rl.ent_coef * entropy
        else:
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), mask)
        stats.update({"policy/token_entropy": entropy.detach(), "loss/policy": pg_loss.detach()})
        return loss, stats

    # ------------------------------------------------------------------ what a checkpoint holds of it (state.py)

    @property
    def sharded(self) -> bool:
        """FSDP holds the trained module's parameters and the optimizer's state in shards, one per process."""
        return distributed.is_sharded(self.module)

    def state(self) -> tuple[dict[str, torch.Tensor] | None, dict, dict | None]:
        """(the trained module's full weights where FSDP shards them, else None: each model's own are at hand; the
        optimizer's state, numbered as `optimizer.state_dict()` numbers it; fp16_mixed's loss scaler's, else None).
        Sharded, a collective every rank joins, whose weights and optimizer state only the main process gets (the
        others: empty dicts); the weights are named as the trained module names them (`policy.`, `value_head.`, ...)."""
        if self.sharded:
            weights, optimizer_state = distributed.full_state(self.module, self.optimizer)
        else:
            weights, optimizer_state = None, self.optimizer.state_dict()
        return weights, optimizer_state, self.scaler.state_dict() if self.scaler is not None else None

    def load_state(self, weights: dict[str, torch.Tensor] | None, optimizer_state: dict,
                   scaler_state: dict | None) -> None:
        """Restore what `state` gave. `weights` (trained module names; it may leave out what is not trained) are
        loaded here only where FSDP shards the module, a collective; unsharded, the caller loads each model's own."""
        if self.sharded:
            distributed.load_full_state(self.module, self.optimizer, weights, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
