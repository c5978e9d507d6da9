"""The critic-free estimators in the engine, on tiny models: they learn, hold no critic anywhere, sample whole groups,
resume exactly, and run with LoRA, encoder-decoders, packing, the NaN stop and the stops, as PPO does.
(Data-parallel and sharded runs: tests/model/test_distributed.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file
from support import one_thread, save_tiny_policy, word_share  # noqa: F401

from components.config import ConfigError, GenerationConfig, RewardConfig, RLConfig, RunConfig
from components.models.loading import load_causal_lm, load_policy, load_tokenizer
from components.rl import Trainer, TrainingError, build_trainer
from components.rl.roles import AdapterDisabled

PROMPTS = ["the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but", "the music", "this movie"]
CRITIC_FREE = ("rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline")
VALUE_STATS = {"loss/value", "val/clipfrac", "val/explained_variance", "val/mean"}


def group_size(estimator: str) -> int:
    return 1 if estimator == "reinforce_pp" else 4


def make_trainer(lm_dir, estimator="grpo", reward_fn=None, seed=0, reward=None, **rl):
    k = rl.pop("samples_per_prompt", group_size(estimator))
    settings = dict(advantage_estimator=estimator, samples_per_prompt=k, learning_rate=1e-3,
                    rollout_batch_size=16 // k, mini_batch_size=8, update_epochs=2, kl_coef=0.05, total_episodes=10_000)
    settings.update(rl)
    return Trainer(load_causal_lm(lm_dir), load_tokenizer(lm_dir), reward_fn or word_share("good"), RLConfig(**settings),
                   GenerationConfig(max_new_tokens=8, max_prompt_tokens=8), reward or RewardConfig(), seed=seed)


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_each_estimator_raises_the_score_without_a_critic(tiny_lm_dir, estimator):
    trainer = make_trainer(tiny_lm_dir, estimator, learning_rate=2e-3, rollout_batch_size=32 // group_size(estimator),
                           update_epochs=4)
    result = trainer.train(PROMPTS, iterations=20)
    scores = [s["objective/scores"] for s in result.history]
    before, after = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print(f"{estimator}: word share of 'good' {before:.3f} -> {after:.3f}, final KL {result.last['objective/kl']:.2f}")
    # the unnormalised estimators (rloo, dr_grpo) take smaller steps on this reward's small spread: 0.04 -> 0.18-0.64
    assert before < 0.1 and after > 3 * before
    assert trainer.episodes == 20 * 32  # episodes are completions: k per prompt
    assert not VALUE_STATS & set(result.last)
    assert ("group/frac_score_zero_std" in result.last) == (group_size(estimator) > 1)
    assert ("loss/kl" in result.last) == (trainer.rl.kl_placement == "loss")


def test_a_critic_free_trainer_holds_no_critic_in_memory_or_in_its_checkpoint(tiny_lm_dir, tmp_path):
    trainer = make_trainer(tiny_lm_dir, "rloo")
    assert trainer.critic_type == "none" and trainer.value_head is None and trainer.critic is None
    policy_parameters = {id(p) for p in trainer.policy.parameters()}
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == policy_parameters
    trainer.run_iteration(PROMPTS[:4])
    assert set(trainer.optimizer.state) <= set(trainer.policy.parameters())  # no moments but the policy's
    checkpoint = trainer.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in checkpoint.iterdir() if "critic" in p.name or "value" in p.name) == []
    assert json.loads((checkpoint / "trainer_state.json").read_text())["critic"] == "none"
    assert set(load_file(checkpoint / "policy.safetensors")) == {name for name, _ in trainer.policy.named_parameters()}
    # a PPO trainer does not take it, nor a critic-free trainer a PPO checkpoint
    with pytest.raises(ConfigError, match="critic.type none, this run shared"):
        Trainer(load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"),
                RLConfig(rollout_batch_size=16, mini_batch_size=8), GenerationConfig(max_new_tokens=8, max_prompt_tokens=8)
                ).load_checkpoint(checkpoint)


def test_a_critic_asked_for_with_a_critic_free_estimator_is_refused_naming_both_keys(tiny_lm_dir):
    with pytest.raises(ConfigError, match=r"rl.advantage_estimator=grpo uses no critic, but critic.type is shared"):
        Trainer(load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"),
                RLConfig(advantage_estimator="grpo", samples_per_prompt=2, rollout_batch_size=8, mini_batch_size=8),
                GenerationConfig(max_new_tokens=8, max_prompt_tokens=8), critic_type="shared")


def test_each_prompt_is_sampled_k_times_as_one_group_of_consecutive_episodes(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, "grpo", samples_per_prompt=4, rollout_batch_size=4)
    exp, _ = trainer.experience_maker.make(PROMPTS[:4], trainer.kl_ctl.kl_coef, 1, trainer.sample_generator)
    assert exp.size == 16
    groups = exp.queries.view(4, 4, -1)
    assert all(torch.equal(group[0], member) for group in groups for member in group)  # one prompt per group
    assert not torch.equal(groups[0, 0], groups[1, 0])
    responses = [tuple(r[m.bool()].tolist()) for r, m in zip(exp.responses, exp.mask)]
    assert len(set(responses[:4])) > 1  # the k samples differ


def test_groups_whose_scores_are_all_equal_teach_nothing(tiny_lm_dir):
    # a constant reward: every group's advantage is 0; with the KL in the loss its gradient is 0 at the reference
    trainer = make_trainer(tiny_lm_dir, "grpo", reward_fn=lambda prompts, completions: torch.ones(len(completions)),
                           update_epochs=1, mini_batch_size=16)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.run_iteration(PROMPTS[:4])
    assert stats["group/frac_score_zero_std"] == 1.0 and stats["group/score_std"] == 0.0
    assert stats["loss/policy"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("estimator, rl", [
    ("rloo", {"adaptive_kl": True, "lr_schedule": "linear", "kl_estimator": "k3"}),
    ("grpo", {"clip_range_high": 0.28}),
    ("reinforce_pp_baseline", {"adaptive_kl": True, "loss_aggregation": "sequence_mean"}),
])
def test_a_resumed_critic_free_run_equals_the_uninterrupted_one(tiny_lm_dir, tmp_path, estimator, rl):
    reward = RewardConfig(normalize=True, missing_eos_penalty=0.5)
    uninterrupted = make_trainer(tiny_lm_dir, estimator, reward=reward, total_episodes=160, **rl)
    uninterrupted.train(PROMPTS, iterations=2)
    uninterrupted.save_checkpoint(tmp_path / "ckpt")
    third = uninterrupted.train(PROMPTS, iterations=1).last

    resumed = make_trainer(tiny_lm_dir, estimator, reward=reward, total_episodes=160, **rl)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert (resumed.iteration, resumed.episodes) == (2, 32)
    again = resumed.train(PROMPTS, iterations=1).last
    for name, value in third.items():
        if not name.startswith(("time/", "perf/")):
            assert again[name] == pytest.approx(value, abs=1e-5), name
    for a, b in zip(uninterrupted.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_kl_controllers_work_with_the_kl_in_the_loss(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, "grpo", adaptive_kl=True, target_kl=0.01, kl_horizon=100, update_epochs=1)
    history = trainer.train(PROMPTS, iterations=2).history
    assert history[0]["kl_coef"] == 0.05 and history[1]["kl_coef"] != 0.05  # it moved on the measured KL
    assert history[0]["objective/non_score_reward"] == 0.0 and history[1]["loss/kl"] > 0


def test_episode_budget_and_target_score_count_completions(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, "rloo", total_episodes=40, update_epochs=1)
    result = trainer.train(PROMPTS)  # 4 prompts x 4 samples = 16 episodes an iteration: 16, 32, 48 >= 40
    assert (result.stop_reason, result.iterations, result.episodes) == ("total_episodes", 3, 48)
    trainer = make_trainer(tiny_lm_dir, "rloo", target_score=-1.0, target_window=2, update_epochs=1)
    assert trainer.train(PROMPTS, iterations=10).stop_reason == "target_score"


def test_a_non_finite_score_stops_a_critic_free_run_before_any_update(tiny_lm_dir):
    def bad(prompts, completions):
        scores = word_share("good")(prompts, completions)
        scores[5] = float("nan")
        return scores

    trainer = make_trainer(tiny_lm_dir, "dr_grpo", reward_fn=bad)
    weights = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(TrainingError, match=r"iteration 1: .*non-finite scores.*episodes \[5\]"):
        trainer.run_iteration(PROMPTS[:4])
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.policy.parameters()))


def test_packed_and_padded_critic_free_training_take_the_same_steps(tiny_lm_dir):
    runs = []
    for pack in (True, False):
        trainer = make_trainer(tiny_lm_dir, "grpo", pack_sequences=pack, rollout_batch_size=8, mini_batch_size=8)
        assert trainer.packed_models == (["policy"] if pack else [])
        runs.append((trainer, [trainer.run_iteration(PROMPTS) for _ in range(2)]))
    (packed, packed_stats), (padded, padded_stats) = runs
    for a, b in zip(packed_stats, padded_stats):
        for name in ("objective/scores", "objective/kl", "loss/policy", "loss/kl", "policy/approxkl"):
            assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-5), name
    for a, b in zip(packed.policy.parameters(), padded.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_lora_and_encoder_decoder_policies_train_critic_free(tmp_path, family):
    policy_dir = save_tiny_policy(tmp_path / family, family)
    config = RunConfig.model_validate({
        "policy": {"model": str(policy_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "rl": {"advantage_estimator": "rloo", "samples_per_prompt": 2, "rollout_batch_size": 4, "mini_batch_size": 8,
               "update_epochs": 1, "learning_rate": 1e-2},
        # The tiny T5 is nearly deterministic at temperature 1 (token entropy 0.05): both samples of a group come out
        # the same and have no advantage. Hot sampling gives the groups two different completions.
        "generation": {"max_new_tokens": 6, "max_prompt_tokens": 8, "temperature": 4.0},
    })
    # A reward that tells any two different completions apart: a group whose two samples scored alike (the sparse
    # word_share("good") of a random tiny policy often gives 0 to both) has no advantage, and an iteration of such
    # groups would leave the adapters where they started.
    def text_hash(prompts, completions):
        return torch.tensor([sum(map(ord, completion)) % 97 / 97 for completion in completions])

    trainer = build_trainer(load_policy(str(policy_dir)), load_tokenizer(str(policy_dir)), text_hash,
                            **config.trainer_sections())
    assert isinstance(trainer.reference, AdapterDisabled) and trainer.value_head is None
    assert trainer.encoder_decoder == (family == "t5")
    assert all("lora_" in name for name, p in trainer.policy.named_parameters() if p.requires_grad)
    first = trainer.run_iteration(PROMPTS[:4])
    assert first["policy/approxkl"] < 1e-10  # the update's forward reproduces the rollout's log-probs
    second = trainer.run_iteration(PROMPTS[4:])
    assert second["objective/kl"] != 0.0 and all(torch.isfinite(torch.tensor(v)) for v in second.values())
