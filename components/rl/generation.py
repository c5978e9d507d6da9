"""Completions as text: `generate` samples completions of prompts with the KV-cache sampler, reproducibly for a
seed, for the evaluation, the demo's bootstrap and its annotators; `sequence_kl` is the mean per-sequence KL of a
policy from its reference on given completions (the evaluation's KL).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import GenerationConfig
from components.rl.forward import response_logprobs
from components.rl.sampler import sample
from components.rl.tokenization import decode, eos_token_ids, pad_id, prompt_padding_side, tokenize_prompts


class Completions(NamedTuple):
    """One sampled completion per prompt, decoded; `generate`'s result."""

    completions: list[str]
    ended_with_eos: list[bool]
    lengths: list[int]
    logprobs: list[float]  # sum of the completion's token log-probabilities (at the sampling temperature)
    prompts_seen: list[str]  # each prompt as the policy read it: rendered, within max_prompt_tokens, specials kept


def generate(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    generation: GenerationConfig,
    seed: int = 0,
    batch_size: int = 64,
    use_chat_template: bool = False,
) -> Completions:
    """Sample one completion per prompt, reproducibly for a given seed (and batch_size), with the KV-cache sampler
    (`sampler.sample`) from a generator of its own."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    eos_ids, pad = eos_token_ids(tokenizer, policy), pad_id(tokenizer)
    out = Completions([], [], [], [], [])
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            queries, query_mask = tokenize_prompts(
                tokenizer, prompts[start : start + batch_size], generation, use_chat_template, prompt_padding_side(policy)
            )
            samples = sample(policy, queries.to(policy.device), query_mask.to(policy.device), generation, eos_ids, pad, generator)
            out.completions.extend(decode(tokenizer, samples)[1])
            out.ended_with_eos.extend(samples.ended_with_eos.tolist())
            out.lengths.extend(samples.lengths.tolist())
            out.logprobs.extend(samples.logprobs.sum(1).tolist())
            out.prompts_seen.extend(tokenizer.batch_decode(
                [row[mask.bool()].tolist() for row, mask in zip(samples.queries, samples.query_mask)], skip_special_tokens=False))
    finally:
        policy.train(was_training)
    return out


@torch.inference_mode()
def sequence_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    generation: GenerationConfig,
    ended_with_eos: Sequence[bool] | None = None,
    batch_size: int = 64,
    use_chat_template: bool = False,
) -> float:
    """Mean over sequences of sum_t [log pi(a_t) - log pi_ref(a_t)] on the completions' tokens
    (re-tokenized; an EOS is appended where `ended_with_eos`: the first of `eos_token_ids`, the tokenizer's own), at
    the sampling temperature."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    eos = int(eos_token_ids(tokenizer, policy)[0])
    pad = pad_id(tokenizer)
    device = policy.device
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        queries, query_mask = tokenize_prompts(
            tokenizer, prompts[start : start + batch_size], generation, use_chat_template, prompt_padding_side(policy)
        )
        rows = tokenizer(list(completions[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        if ended_with_eos is not None:
            rows = [ids + [eos] if ended else ids for ids, ended in zip(rows, ended_with_eos[start : start + batch_size])]
        width = max(1, max(len(ids) for ids in rows))
        responses = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        for index, ids in enumerate(rows):
            responses[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[index, : len(ids)] = 1
        args = (queries.to(device), query_mask.to(device), responses.to(device), mask.to(device))
        logprobs = response_logprobs(policy, *args, generation.temperature)
        ref_logprobs = response_logprobs(reference, *args, generation.temperature)
        total += float((logprobs - ref_logprobs).sum())
        count += len(rows)
    return total / max(count, 1)
