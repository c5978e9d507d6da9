"""The tokens a run feeds each model, against the positions the model has: checked from config files, before anything
is recorded, prepared or loaded (each stage's input check, and `alignflow plan`).

A model with a table of positions (GPT-2's `n_positions`, BERT's, BART's or Llama's `max_position_embeddings`) reads
at most that many tokens; a longer input fails deep inside a forward (an IndexError) minutes into a run. What each
model reads:

    policy stage    the policy, a separate critic      generation.max_prompt_tokens + generation.max_new_tokens
                    (an encoder-decoder policy)        its encoder the prompt, its decoder the completion after its
                                                       start token: max_prompt_tokens, max_new_tokens + 1
                    the reward model, the judge        reward.max_length, judge.max_length (their inputs are truncated
                                                       to it, components/rl/reward.py)
    reward stage    the base model                     model.max_length (longer pairs are left out)

Families without such a table (T5's relative positions, BLOOM's ALiBi) have no limit here.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from components.config import ConfigError, RewardRunConfig, RunConfig
from components.models.loading import critic_source, load_tokenizer, locate
from components.models.uris import adapter_base

# Where a family's config gives its number of positions (GPT-2's n_positions also answers to max_position_embeddings).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
# Families whose positions start after the padding index (RoBERTa's create_position_ids_from_input_ids): their table
# holds pad_token_id + 1 rows no token reads.
PADDING_OFFSET = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert", "longformer", "mpnet",
                  "data2vec-text", "ibert", "xmod", "luke")


class TooLongError(ConfigError):
    """A length the run would feed a model beyond the model's positions; one line per length, naming its key."""


def positions(config: PretrainedConfig) -> int | None:
    """The most tokens a model of `config` reads; None for a family without a table of positions."""
    found = next((value for name in POSITION_KEYS if isinstance(value := getattr(config, name, None), int)
                  and not isinstance(value, bool) and value > 0), None)
    if found is not None and config.model_type in PADDING_OFFSET:
        found -= (getattr(config, "pad_token_id", None) or 0) + 1
    return found


@dataclass(frozen=True)
class Read:
    """`setting` (its keys and values, as a person reads them) makes `length` tokens, which the `role` (the model `key`
    names, `ref` located) reads."""

    setting: str
    length: int
    role: str
    key: str
    ref: str
    revision: str | None = None


def model_config(key: str, ref: str, revision: str | None = None) -> PretrainedConfig:
    """The config of the located model `ref` (a saved LoRA adapter: its base model's); config.json only."""
    base = adapter_base(ref)
    if base is not None:
        ref, revision = locate(key, base), None
    return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=False)


def run_reads(config: RunConfig, policy: PretrainedConfig) -> list[Read]:
    """What the policy stage feeds each of its models (`policy`: the policy's config)."""
    generation, key = config.generation, "policy.model"
    prompt, new = generation.max_prompt_tokens, generation.max_new_tokens
    sequence = (f"generation.max_prompt_tokens + generation.max_new_tokens = {prompt} + {new} = {prompt + new}", prompt + new)
    if getattr(policy, "is_encoder_decoder", False):  # a separate critic is for causal LMs (refused by the trainer)
        reads = [Read(f"generation.max_prompt_tokens={prompt}", prompt, "policy's encoder", key, config.policy.model,
                      config.policy.revision),
                 Read(f"generation.max_new_tokens={new} (+1, the decoder's start token)", new + 1, "policy's decoder",
                      key, config.policy.model, config.policy.revision)]
    else:
        reads = [Read(*sequence, "policy", key, config.policy.model, config.policy.revision)]
        if config.critic.type == "separate":
            started = critic_source(config.critic, config.reward,
                                    lambda: load_tokenizer(config.policy.model, config.policy.revision))
            if started is not None:
                ref, revision, critic_key, _ = started
                reads.append(Read(*sequence, "separate critic", critic_key, ref, revision))
    reads.append(Read(f"reward.max_length={config.reward.max_length}", config.reward.max_length, "reward model",
                      "reward.model", config.reward.model, config.reward.revision))
    if config.judge is not None:
        reads.append(Read(f"judge.max_length={config.judge.max_length}", config.judge.max_length, "judge",
                          "judge.model", config.judge.model, config.judge.revision))
    return reads


def check_lengths(config: RunConfig | RewardRunConfig) -> None:
    """Refuse a run (its model URIs located: local paths or hub ids) that would feed a model more tokens than it has
    positions, one line per length naming its key, the model and the model's limit."""
    if isinstance(config, RewardRunConfig):
        reads = [Read(f"model.max_length={config.model.max_length}", config.model.max_length, "base model",
                      "model.base", config.model.base, config.model.revision)]
    else:
        reads = run_reads(config, model_config("policy.model", config.policy.model, config.policy.revision))
    configs: dict[tuple[str, str | None], PretrainedConfig] = {}
    too_long = []
    for read in reads:
        if (read.ref, read.revision) not in configs:
            configs[read.ref, read.revision] = model_config(read.key, read.ref, read.revision)
        limit = positions(configs[read.ref, read.revision])
        if limit is not None and read.length > limit:
            too_long.append(f"{read.setting}: more tokens than the {limit} positions of the {read.role} "
                            f"({read.key}: {read.ref})")
    if too_long:
        raise TooLongError("\n".join(too_long))
