"""On an NVIDIA GPU (marker `gpu`; skipped elsewhere, never faked): the precisions the CPU cannot run (fp16 with loss
scaling), bf16 memory as CUDA's allocator counts it, and the memory plan against torch.cuda's peak.
benchmarks/gpu_check.sh runs these, then the GPU benchmark."""

from __future__ import annotations

import pytest
import torch

from components.config import RunConfig, apply_overrides
from components.models.loading import load_policy, load_reward_model, load_tokenizer
from components.rl.reward import RewardScorer
from components.rl import build_trainer
from support import word_share

pytestmark = pytest.mark.gpu
PROMPTS = ["the film was", "this movie is", "I loved the", "the plot was", "the acting is", "we hated the", "a very", "the music"]


def cuda_trainer(lm_dir, *overrides):
    config = apply_overrides(RunConfig.model_validate({
        "policy": {"model": str(lm_dir)}, "critic": {"type": "shared"},
        "rl": {"rollout_batch_size": 8, "mini_batch_size": 4, "update_epochs": 2, "learning_rate": 1e-3},
        "generation": {"max_new_tokens": 6}}), list(overrides))
    policy = load_policy(str(lm_dir), dtype=config.policy_dtype).to("cuda")
    return build_trainer(policy, load_tokenizer(str(lm_dir)), word_share("good"), **config.trainer_sections())


def test_fp16_mixed_trains_with_a_loss_scale_and_float32_maths(tiny_lm_dir):
    trainer = cuda_trainer(tiny_lm_dir, "memory.trained_precision=fp16_mixed", "memory.frozen_dtype=float16")
    assert trainer.learner.scaler is not None
    for _ in range(3):
        stats = trainer.run_iteration(PROMPTS)
        assert torch.isfinite(torch.tensor(stats["loss/policy"]))
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}  # master weights
    assert trainer.learner.scaler.get_scale() > 0


@pytest.mark.parametrize("precision", ["bf16_mixed", "bfloat16"])
def test_bf16_on_the_gpu_starts_at_ratio_one(tiny_lm_dir, precision):
    from components.rl.core import estimate_advantages

    trainer = cuda_trainer(tiny_lm_dir, f"memory.trained_precision={precision}", "memory.frozen_dtype=bfloat16")
    exp, _ = trainer.experience_maker.make(PROMPTS, 0.05, 1, trainer.sample_generator)
    estimate_advantages(exp, trainer.rl)
    _, stats = trainer.learner.loss(exp, torch.arange(exp.size, device="cuda"))
    assert stats["policy/ratio"].item() == 1.0
    assert exp.logprobs.dtype == torch.float32


def test_a_bf16_reward_model_takes_half_the_gpu_memory(tiny_reward_dir):
    sizes = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_reward_model(str(tiny_reward_dir), dtype=dtype).to("cuda")
        sizes.append(torch.cuda.memory_allocated() - before)
        scores = RewardScorer(model, load_tokenizer(str(tiny_reward_dir), padding_side="right"))(["the film was"], [" good"])
        assert scores.dtype == torch.float32 and scores.device.type == "cuda"
        del model
    assert sizes[1] <= 0.55 * sizes[0]


def test_the_memory_plan_is_within_15_percent_of_cuda_peak(tmp_path):
    """A ~25M GPT-2 trained for two iterations on the GPU: torch.cuda.max_memory_allocated against the plan (less its
    runtime line: CUDA's context is not an allocation)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from components.models.memory_plan import plan_run
    from support import word_tokenizer

    tokenizer = word_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=512, n_layer=8, n_head=8, pad_token_id=0, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "policy")
    config.num_labels = 1
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "reward")
    for path in ("policy", "reward"):
        tokenizer.save_pretrained(tmp_path / path)
    run = RunConfig.model_validate({
        "policy": {"model": str(tmp_path / "policy")}, "reward": {"model": str(tmp_path / "reward")}, "critic": {"type": "shared"},
        "rl": {"rollout_batch_size": 16, "mini_batch_size": 16, "update_epochs": 1},
        "generation": {"max_new_tokens": 32, "max_prompt_tokens": 32}, "memory": {"frozen_dtype": "bfloat16",
                                                                                "trained_precision": "bf16_mixed"}})
    plan = plan_run(run)
    torch.cuda.reset_peak_memory_stats()
    scorer = RewardScorer.from_config(run.reward, dtype=torch.bfloat16)
    scorer.model.to("cuda")
    policy = load_policy(run.policy.model, dtype=run.policy_dtype).to("cuda")
    trainer = build_trainer(policy, load_tokenizer(run.policy.model), scorer, **run.trainer_sections())
    for _ in range(2):
        trainer.run_iteration([" ".join(["the film was good"] * 8)] * 16)
    measured = torch.cuda.max_memory_allocated()
    predicted = plan.peak_bytes - next(line.bytes for line in plan.lines if line.role == "runtime")
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_an_fp16_run_resumed_from_its_checkpoint_keeps_its_loss_scale(tiny_lm_dir, tmp_path):
    settings = ("memory.trained_precision=fp16_mixed", "memory.frozen_dtype=float16")
    uninterrupted = cuda_trainer(tiny_lm_dir, *settings)
    uninterrupted.run_iteration(PROMPTS)
    uninterrupted.save_checkpoint(tmp_path / "checkpoint")
    scale = uninterrupted.learner.scaler.get_scale()
    expected = uninterrupted.run_iteration(PROMPTS)
    resumed = cuda_trainer(tiny_lm_dir, *settings)
    resumed.load_checkpoint(tmp_path / "checkpoint")
    assert resumed.learner.scaler.get_scale() == scale
    got = resumed.run_iteration(PROMPTS)
    assert got["loss/policy"] == pytest.approx(expected["loss/policy"], rel=1e-3, abs=1e-5)
