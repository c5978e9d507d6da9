"""Precision per role, activation checkpointing and generation micro-batches (memory.*, generation.generation_batch_size),
on tiny models: what each setting holds in memory and that the engine's maths stays in float32."""

from __future__ import annotations

import pytest
import torch

from components.config import ConfigError, RunConfig
from components.models.loading import load_causal_lm, load_policy, load_reward_model, load_tokenizer
from components.rl.reward import RewardScorer
from components.rl import build_trainer
from components.rl.core import logprobs_of
from components.rl.sampler import sample
from components.rl.tokenization import eos_token_ids, pad_id, tokenize_prompts
from tests.support import word_share

PROMPTS = ["the film was", "this movie is", "I loved the", "the plot was", "the acting is", "we hated the", "a very", "the music"]


def config(lm_dir, **sections) -> RunConfig:
    base = {"seed": 0, "policy": {"model": str(lm_dir)},
            "rl": {"rollout_batch_size": 8, "mini_batch_size": 4, "update_epochs": 2, "learning_rate": 1e-3},
            "generation": {"max_new_tokens": 6}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return RunConfig.model_validate(base)


def trainer_for(cfg: RunConfig, reward_fn=None):
    policy = load_policy(cfg.policy.model, dtype=cfg.policy_dtype)
    return build_trainer(policy, load_tokenizer(cfg.policy.model), reward_fn or word_share("good"), **cfg.trainer_sections())


def assert_ratio_starts_at_one(trainer):
    """The rollout's log-probabilities are the update's own forward's: the ratio is exactly 1 before any step."""
    from components.rl.core import estimate_advantages

    exp, _ = trainer.experience_maker.make(PROMPTS, 0.05, 1, trainer.sample_generator)
    estimate_advantages(exp, trainer.rl)
    _, stats = trainer.learner.loss(exp, torch.arange(exp.size))
    assert stats["policy/ratio"].item() == 1.0 and stats["policy/approxkl"].item() == 0.0
    return exp


def test_log_probabilities_of_bf16_logits_are_taken_in_float32():
    """A bf16 log-softmax is off by up to ~0.06 nats at a vocabulary of 50k (bf16 keeps 8 bits of mantissa), which
    biases every ratio and KL; the engine upcasts the logits first, and is then exact for the logits it was given."""
    torch.manual_seed(0)
    logits = (torch.randn(16, 50257) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50257, (16,))
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    engine = logprobs_of(logits.float(), tokens)
    in_bf16 = logprobs_of(logits, tokens)
    assert engine.dtype == torch.float32
    assert (engine.double() - exact).abs().max() < 1e-4
    assert (in_bf16.double() - exact).abs().max() > 1e-2  # what the upcast avoids


@pytest.mark.parametrize("precision", ["bf16_mixed", "bfloat16"])
def test_a_mixed_or_bf16_policy_starts_at_ratio_one_and_keeps_float32_maths(tiny_lm_dir, precision):
    cfg = config(tiny_lm_dir, memory={"trained_precision": precision, "frozen_dtype": "bfloat16"})
    trainer = trainer_for(cfg)
    weights = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert {p.dtype for p in trainer.policy.parameters()} == {weights}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    exp = assert_ratio_starts_at_one(trainer)
    assert exp.logprobs.dtype == exp.ref_logprobs.dtype == exp.values.dtype == torch.float32
    stats = trainer.run_iteration(PROMPTS)
    assert all(torch.isfinite(torch.tensor(stats[name])) for name in ("loss/policy", "loss/value", "policy/approxkl", "objective/kl"))
    state = trainer.optimizer.state[next(p for p in trainer.policy.parameters())]
    assert state["exp_avg"].dtype == weights  # AdamW's moments are held as the weights are


def test_a_pure_bf16_policy_keeps_its_reference_in_bf16_and_starts_at_kl_zero(tiny_lm_dir):
    trainer = trainer_for(config(tiny_lm_dir, memory={"trained_precision": "bfloat16"}))  # frozen_dtype float32
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}  # not an upcast copy
    exp, _ = trainer.experience_maker.make(PROMPTS, 0.05, 1, trainer.sample_generator)
    assert exp.kl.abs().max().item() == 0.0


def test_frozen_models_load_in_bf16_and_score_as_in_float32(tiny_reward_dir):
    fp32 = load_reward_model(str(tiny_reward_dir))
    bf16 = load_reward_model(str(tiny_reward_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(bf16) == size(fp32) // 2
    tokenizer = load_tokenizer(str(tiny_reward_dir), padding_side="right")
    prompts, completions = ["the film was"] * 4, [" good", " bad", " very good fun", " awful plot"]
    scores = [RewardScorer(model, tokenizer)(prompts, completions) for model in (fp32, bf16)]
    assert scores[1].dtype == torch.float32
    torch.testing.assert_close(scores[1], scores[0], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_activation_checkpointing_takes_the_same_step(tiny_lm_dir, tiny_reward_dir, critic):
    """Recomputing the layers in the backward changes memory, not maths: the same iteration to float rounding, for
    the policy and for a separate critic (here the tiny reward model's backbone)."""
    plain, checkpointed = (trainer_for(config(tiny_lm_dir, memory={"activation_checkpointing": on}, critic={"type": critic},
                                              reward={"model": str(tiny_reward_dir)}))
                           for on in (False, True))
    from components.rl.precision import checkpointed_layers

    assert all(layer.gradient_checkpointing for layer in checkpointed_layers(checkpointed.policy))
    if critic == "separate":
        assert checkpointed_layers(checkpointed.critic) and all(
            layer.gradient_checkpointing for layer in checkpointed_layers(checkpointed.critic))
    calls = []
    layer = checkpointed_layers(checkpointed.policy)[0]
    original = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    stats = [trainer.run_iteration(PROMPTS) for trainer in (plain, checkpointed)]
    assert calls  # the update did checkpoint ...
    assert not any(m.training for m in checkpointed.policy.modules())  # ... and left every module in eval mode
    for name in ("loss/policy", "loss/value", "policy/approxkl", "objective/scores"):
        assert stats[1][name] == pytest.approx(stats[0][name], rel=1e-4, abs=1e-6)
    for a, b in zip(plain._trainable_parameters(), checkpointed._trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_generation_micro_batches_sample_what_one_batch_samples(tiny_lm_dir):
    """Greedy decoding (top_k 1) does not depend on how the prompts are grouped: micro-batches of 3 give the one
    batch's completions, and the pieces are joined padded to the longest."""
    policy, tokenizer = load_causal_lm(str(tiny_lm_dir)), load_tokenizer(str(tiny_lm_dir))
    results = []
    for size in (None, 3):
        generation = config(tiny_lm_dir, generation={"top_k": 1, "generation_batch_size": size}).generation
        queries, query_mask = tokenize_prompts(tokenizer, PROMPTS, generation)
        results.append(sample(policy, queries, query_mask, generation, eos_token_ids(tokenizer, policy), pad_id(tokenizer),
                              torch.Generator().manual_seed(0)))
    whole, pieces = results
    assert torch.equal(whole.responses, pieces.responses) and torch.equal(whole.mask, pieces.mask)
    torch.testing.assert_close(whole.logprobs, pieces.logprobs, atol=1e-5, rtol=1e-5)


def test_a_lora_policy_keeps_its_frozen_base_in_bf16_and_its_adapters_in_float32(tiny_lm_dir):
    cfg = config(tiny_lm_dir, policy={"lora": {"enabled": True, "r": 4, "alpha": 8}}, memory={"frozen_dtype": "bfloat16"},
                 rl={"learning_rate": 3e-2})
    trainer = trainer_for(cfg, lambda prompts, completions: torch.tensor([len(c) / 10 for c in completions]))
    dtypes = {name: p.dtype for name, p in trainer.policy.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert_ratio_starts_at_one(trainer)
    stats = trainer.run_iteration(PROMPTS)
    assert torch.isfinite(torch.tensor(stats["loss/policy"])) and stats["objective/kl"] == 0.0
    stats = trainer.run_iteration(PROMPTS)
    assert stats["objective/kl"] != 0.0  # the float32 adapters moved the policy away from its bf16 base


@pytest.mark.parametrize("key, value", [("frozen_dtype", "float16"), ("trained_precision", "fp16_mixed")])
def test_fp16_on_the_cpu_is_refused_naming_the_key(tiny_lm_dir, key, value):
    cfg = config(tiny_lm_dir, memory={key: value})
    with pytest.raises(ConfigError, match=f"memory.{key}={value}: float16 does not run on the CPU"):
        build_trainer(load_causal_lm(str(tiny_lm_dir)), load_tokenizer(str(tiny_lm_dir)), word_share("good"),
                      **cfg.trainer_sections())


def test_generation_micro_batches_give_the_experience_of_one_batch(tiny_lm_dir):
    """The reference's and the critic's forwards run generation_batch_size rows at a time too: with greedy sampling the
    experience equals the one-batch experience to float rounding, in bf16 autocast (log-probs recomputed) as well."""
    for memory in ({}, {"trained_precision": "bf16_mixed"}):
        made = []
        for size in (None, 3):
            trainer = trainer_for(config(tiny_lm_dir, generation={"top_k": 1, "generation_batch_size": size}, memory=memory))
            made.append(trainer.experience_maker.make(PROMPTS, 0.05, 1, trainer.sample_generator)[0])
        whole, pieces = made
        assert torch.equal(whole.responses, pieces.responses)
        for name in ("logprobs", "ref_logprobs", "values"):
            torch.testing.assert_close(getattr(pieces, name), getattr(whole, name), atol=1e-2 if memory else 1e-5, rtol=1e-3)
