"""The demo's annotators label a policy's own completions: the human-feedback loop, simulated.

A team that sees a policy drift samples its completions beside the reference's for the same prompts, has
annotators say which of each two they prefer, and trains a reward model (or a held-out judge) on those pairs too:
the pairs a reward model was trained on before never showed it what this policy writes. The demo's annotators are
the ones who labelled data/demo/preferences.jsonl (`components.demo.domain.annotate`): the truth, with LABEL_NOISE
of the labels flipped and near-ties left unlabelled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from components.config import GenerationConfig
from components.demo.domain import annotate
from components.models.loading import load_policy, load_tokenizer
from components.rl.generation import generate


@dataclass(frozen=True)
class Annotated:
    pairs: list[dict[str, str]]  # {"prompt", "chosen", "rejected"}, as data/demo/preferences.jsonl has them
    sampled: int  # prompts sampled (one completion from each model)
    near_ties: int  # pairs the annotators left unlabelled
    policy_chosen: int  # labelled pairs where the policy's completion was chosen


def sample(model_dir: str, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 64,
           key: str = "policy") -> list[str]:
    """One completion of each prompt, sampled by the pipeline's own sampler (`generate`) at the default generation
    settings (temperature 1, no top-k/top-p); a causal LM, an encoder-decoder or a saved LoRA adapter (merged), loaded
    as the policy pipeline loads them."""
    model, tokenizer = load_policy(model_dir, key=key), load_tokenizer(model_dir)
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    return generate(model, tokenizer, prompts, generation, seed=seed, batch_size=batch_size).completions


def annotate_completions(prompts: list[str], policy: list[str], reference: list[str], seed: int) -> Annotated:
    """The annotators' label for each prompt's two completions (the policy's, the reference's)."""
    rng = random.Random(seed)
    pairs, near_ties, policy_chosen = [], 0, 0
    for prompt, ours, theirs in zip(prompts, policy, reference, strict=True):
        labelled = annotate(prompt, ours, theirs, rng)
        if labelled is None:
            near_ties += 1
            continue
        pairs.append(labelled)
        policy_chosen += labelled["chosen"] == ours
    return Annotated(pairs, len(prompts), near_ties, policy_chosen)


def annotate_policy(policy_dir: str, reference_dir: str, prompts: list[str], seed: int = 0,
                    max_new_tokens: int = 24) -> Annotated:
    """Sample the policy and the reference on `prompts`, then have the demo's annotators label each pair."""
    policy = sample(policy_dir, prompts, max_new_tokens, seed, key="policy")
    reference = sample(reference_dir, prompts, max_new_tokens, seed + 1, key="--reference")
    return annotate_completions(prompts, policy, reference, seed)
