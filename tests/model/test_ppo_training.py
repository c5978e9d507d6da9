"""The engine end to end on a tiny GPT-2: it learns, resumes exactly, checkpoints atomically, fails loudly."""

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from support import one_thread, word_share  # noqa: F401

from components.config import GenerationConfig, RLConfig, RewardConfig, RunConfig
from components.models.loading import load_causal_lm, load_tokenizer
from components.rl import Trainer, TrainingError, build_trainer
from components.checkpoint import StorageError, check_writable, resolve_checkpoint

PROMPTS = ["the film was", "I loved the movie", "the plot is", "it was a", "the acting", "we hated it but", "the music", "this movie"]
STAT_NAMES = {
    "objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward", "objective/sequence_entropy",
    "policy/approxkl", "policy/clipfrac", "policy/token_entropy", "loss/policy", "loss/value", "val/clipfrac",
    "val/explained_variance", "val/mean", "kl_coef", "lr", "response/length_mean", "response/eos_fraction",
    "episodes", "iteration", "perf/tokens_per_second", "time/rollout", "time/scoring", "time/update",
}
TIMING = ("perf/tokens_per_second", "time/rollout", "time/scoring", "time/update")


def make_trainer(lm_dir, reward_fn=None, seed=0, reward=None, critic="shared", **rl):
    settings = dict(learning_rate=1e-3, rollout_batch_size=16, mini_batch_size=8, update_epochs=2, kl_coef=0.05,
                    total_episodes=10_000)
    settings.update(rl)
    return Trainer(
        load_causal_lm(lm_dir), load_tokenizer(lm_dir), reward_fn or word_share("good"),
        RLConfig(**settings), GenerationConfig(max_new_tokens=8, max_prompt_tokens=8), reward or RewardConfig(),
        critic_type=critic, seed=seed,
    )


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_mean_score_rises_while_kl_stays_bounded(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, learning_rate=2e-3, rollout_batch_size=32, mini_batch_size=8, update_epochs=4)
    start = time.perf_counter()
    result = trainer.train(PROMPTS, iterations=30)
    elapsed = time.perf_counter() - start
    scores = [s["objective/scores"] for s in result.history]
    before, after = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print(f"word share of 'good': {before:.3f} -> {after:.3f} in {elapsed:.1f}s; final KL {result.last['objective/kl']:.2f}")
    assert result.stop_reason == "iterations" and result.iterations == 30 and trainer.episodes == 960
    assert before < 0.1 and after > 0.7
    assert max(s["objective/kl"] for s in result.history) < 15
    assert set(result.last) == STAT_NAMES | {"policy/ratio"}


def test_rollout_and_training_forward_agree_ratio_is_one_on_the_first_minibatch(tiny_lm_dir):
    # one epoch, one minibatch: the statistics are those of the first forward, before any optimizer step
    trainer = make_trainer(tiny_lm_dir, rollout_batch_size=16, mini_batch_size=16, update_epochs=1, gradient_accumulation_steps=2)
    stats = trainer.run_iteration(PROMPTS * 2)
    assert stats["policy/approxkl"] < 1e-10
    assert stats["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/clipfrac"] == 0.0 and stats["val/clipfrac"] == 0.0


def test_resumed_run_equals_the_uninterrupted_one(tiny_lm_dir, tmp_path):
    reward = RewardConfig(normalize=True, missing_eos_penalty=0.5, clip=3.0)
    uninterrupted = make_trainer(tiny_lm_dir, reward=reward, adaptive_kl=True, lr_schedule="linear", total_episodes=160)
    uninterrupted.train(PROMPTS, iterations=2)
    uninterrupted.save_checkpoint(tmp_path / "ckpt")
    third = uninterrupted.train(PROMPTS, iterations=1).last

    resumed = make_trainer(tiny_lm_dir, reward=reward, adaptive_kl=True, lr_schedule="linear", total_episodes=160)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.iteration == 2 and resumed.episodes == 32
    again = resumed.train(PROMPTS, iterations=1).last
    for name in STAT_NAMES - set(TIMING):
        assert again[name] == pytest.approx(third[name], abs=1e-5), name
    for a, b in zip(uninterrupted.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and the reference is still the starting policy, not the checkpointed one
    start = load_causal_lm(tiny_lm_dir)
    for a, b in zip(start.parameters(), resumed.reference.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_failure_mid_save_leaves_the_previous_checkpoint_intact(tiny_lm_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_lm_dir)
    trainer.run_iteration(PROMPTS * 2)
    target = trainer.save_checkpoint(tmp_path / "ckpt")
    digest = tree_digest(target)
    trainer.run_iteration(PROMPTS * 2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the save

    monkeypatch.setattr("components.rl.trainer.torch.save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(target)
    monkeypatch.undo()
    assert tree_digest(target) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    restored = make_trainer(tiny_lm_dir)
    restored.load_checkpoint(target)
    assert restored.iteration == 1

    # a save that died between its two renames: the previous checkpoint, kept aside, is put back
    target.rename(tmp_path / ".ckpt.previous")
    (tmp_path / ".ckpt.tmp-dead").mkdir()  # and one that died before them left its temporary directory
    assert resolve_checkpoint(target) == target
    assert tree_digest(target) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    trainer.save_checkpoint(target)  # and the next save completes normally
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((target / "trainer_state.json").read_text())["iteration"] == 2


def test_a_full_disk_is_named_with_the_path_and_the_key_and_keeps_the_last_checkpoint(tiny_lm_dir, small_disk):
    trainer = make_trainer(tiny_lm_dir)
    trainer.run_iteration(PROMPTS * 2)
    disk = small_disk(int(1.5 * trainer.checkpoint_bytes()))  # room for one checkpoint, not for two at once
    target = trainer.save_checkpoint(disk / "ckpt")
    digest = tree_digest(target)
    trainer.run_iteration(PROMPTS * 2)
    with pytest.raises(StorageError, match=r"checkpoint.dir: cannot write .*ckpt: no space left on the device \(ENOSPC\)"):
        trainer.save_checkpoint(target)
    assert tree_digest(target) == digest and sorted(p.name for p in disk.iterdir()) == ["ckpt"]
    with pytest.raises(StorageError, match=r"has \d+ MB free, a checkpoint of this run needs about"):
        check_writable(disk, "checkpoint.dir", need_bytes=2 * trainer.checkpoint_bytes())


def test_a_read_only_checkpoint_directory_is_refused_before_training(small_disk):
    disk = small_disk(1 << 20, read_only=True)
    with pytest.raises(StorageError, match=r"checkpoint.dir: cannot write .*: the file system is read-only \(EROFS\)"):
        check_writable(disk / "runs", "checkpoint.dir")


def test_nan_score_stops_the_run_naming_the_iteration_before_any_update(tiny_lm_dir, tmp_path):
    calls = []
    good = word_share("good")

    def flaky(prompts, completions):
        calls.append(1)
        scores = good(prompts, completions)
        if len(calls) == 2:
            scores[3] = float("nan")
        return scores

    trainer = make_trainer(tiny_lm_dir, reward_fn=flaky)
    trainer.run_iteration(PROMPTS * 2)
    target = trainer.save_checkpoint(tmp_path / "ckpt")
    digest = tree_digest(target)
    weights = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.raises(TrainingError, match=r"iteration 2: .*non-finite scores.*episodes \[3\]"):
        trainer.run_iteration(PROMPTS * 2)
    assert tree_digest(target) == digest
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.policy.parameters()))
    assert trainer.iteration == 1 and trainer.episodes == 16


def test_a_reward_function_with_ended_with_eos_learns_which_completions_the_policy_ended(tiny_lm_dir):
    seen = {}

    def reward_fn(prompts, completions, ended_with_eos):
        seen["ended"] = list(ended_with_eos)
        return torch.tensor([1.0 if ended else 0.0 for ended in ended_with_eos])

    trainer = make_trainer(tiny_lm_dir, reward_fn=reward_fn)
    exp, _ = trainer.experience_maker.make(PROMPTS * 2, trainer.kl_ctl.kl_coef, 1, trainer.sample_generator)
    assert seen["ended"] == exp.ended_with_eos.tolist() and 0 < sum(seen["ended"]) < 16
    assert exp.scores.tolist() == [float(ended) for ended in seen["ended"]]
    assert all(bool(mask[int(mask.sum()) - 1] and response[int(mask.sum()) - 1] == trainer.tokenizer.eos_token_id) == ended
               for mask, response, ended in zip(exp.mask, exp.responses, seen["ended"]))


@pytest.mark.parametrize(
    "reward_fn, message",
    [
        (lambda p, c: torch.zeros(len(c) - 1), r"iteration 1: .*shape \(15,\) for 16 completions"),
        (lambda p, c: torch.zeros(len(c), 2), r"shape \(16, 2\)"),
        (lambda p, c: "good", r"iteration 1: the reward function returned str"),
    ],
)
def test_reward_output_of_the_wrong_shape_is_an_error(tiny_lm_dir, reward_fn, message):
    with pytest.raises(TrainingError, match=message):
        make_trainer(tiny_lm_dir, reward_fn=reward_fn).run_iteration(PROMPTS * 2)


def test_empty_prompt_batch_is_an_error(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir)
    with pytest.raises(TrainingError, match="empty prompt batch"):
        trainer.run_iteration([])
    with pytest.raises(TrainingError, match="no prompts"):
        trainer.train([], iterations=1)


def test_training_stops_at_the_episode_budget_or_the_target_score(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, total_episodes=40, update_epochs=1)
    result = trainer.train(PROMPTS)  # 16 + 16 + 16 >= 40
    assert (result.stop_reason, result.iterations, result.episodes) == ("total_episodes", 3, 48)
    assert trainer.stop_reason == "total_episodes"

    trainer = make_trainer(tiny_lm_dir, target_score=-1.0, target_window=2, update_epochs=1)
    seen = []
    result = trainer.train(PROMPTS, iterations=10, callback=seen.append)
    assert (result.stop_reason, result.iterations) == ("target_score", 2)  # a full window is needed
    assert [s["iteration"] for s in seen] == [1.0, 2.0]


def test_prompts_cycle_in_a_new_order_each_pass(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, rollout_batch_size=6, mini_batch_size=6)
    first, second = trainer.next_prompts(PROMPTS), trainer.next_prompts(PROMPTS)
    assert sorted(first + second[:2]) == sorted(PROMPTS)  # the first pass covers every prompt once
    assert len(second) == 6


def test_linear_schedule_and_adaptive_kl_are_applied(tiny_lm_dir):
    trainer = make_trainer(tiny_lm_dir, total_episodes=64, lr_schedule="linear", adaptive_kl=True, target_kl=0.01, kl_horizon=100, update_epochs=1)
    history = trainer.train(PROMPTS, iterations=3).history
    assert [s["lr"] for s in history] == pytest.approx([1e-3, 0.75e-3, 0.5e-3])
    kl_0, kl_1 = history[0]["objective/kl"], history[1]["objective/kl"]
    assert history[0]["kl_coef"] == 0.05
    expected = 0.05 * (1 + max(min(kl_0 / 0.01 - 1, 0.2), -0.2) * 16 / 100)
    assert history[1]["kl_coef"] == pytest.approx(expected)
    assert history[2]["kl_coef"] == pytest.approx(expected * (1 + max(min(kl_1 / 0.01 - 1, 0.2), -0.2) * 16 / 100))


def test_separate_critic_trains_and_checkpoints(tiny_lm_dir, tmp_path):
    trainer = make_trainer(tiny_lm_dir, critic="separate")
    assert trainer.value_head is None and trainer.critic is not None
    before = [p.detach().clone() for p in trainer.critic.parameters()]
    stats = trainer.run_iteration(PROMPTS * 2)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k != "val/explained_variance")
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.critic.parameters()))
    trainer.save_checkpoint(tmp_path / "ckpt")
    restored = make_trainer(tiny_lm_dir, critic="separate")
    restored.load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(trainer.critic.parameters(), restored.critic.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="critic.type separate, this run shared"):
        make_trainer(tiny_lm_dir).load_checkpoint(tmp_path / "ckpt")


def test_from_config_and_export_policy(tiny_lm_dir, tmp_path):
    cfg = RunConfig.model_validate(
        {"seed": 3, "policy": {"model": str(tiny_lm_dir)}, "rl": {"rollout_batch_size": 8, "mini_batch_size": 4}, "generation": {"max_new_tokens": 4}}
    )
    trainer = build_trainer(load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"), **cfg.trainer_sections())
    trainer.run_iteration(PROMPTS)
    exported = trainer.export_policy(tmp_path / "policy")
    reloaded = load_causal_lm(exported)
    for a, b in zip(trainer.policy.state_dict().values(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert (exported / "tokenizer.json").exists() and "value_head" not in str(list(reloaded.state_dict()))


def test_lora_policy_trains_adapters_only_and_exports_merged(tiny_lm_dir, tmp_path):
    cfg = RunConfig.model_validate(
        {
            "policy": {"model": str(tiny_lm_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
            "rl": {"rollout_batch_size": 16, "mini_batch_size": 16, "update_epochs": 1, "learning_rate": 1e-2},
            "generation": {"max_new_tokens": 6},
        }
    )
    trainer = build_trainer(load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"), **cfg.trainer_sections())
    trainable = {name for name, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    stats = trainer.run_iteration(PROMPTS * 2)
    assert stats["policy/approxkl"] < 1e-10  # rollout and update agree through the adapters too
    stats = trainer.run_iteration(PROMPTS * 2)
    assert stats["objective/kl"] != 0.0  # the adapters moved the policy away from the reference

    merged = load_causal_lm(trainer.export_policy(tmp_path / "merged"))
    ids = torch.tensor([[4, 6, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.policy(input_ids=ids).logits, atol=1e-5, rtol=0)
    adapter = trainer.export_policy(tmp_path / "adapter", merge=False)
    assert (adapter / "adapter_config.json").exists()


def test_progress_bar_callback_shows_episodes_score_and_kl(tiny_lm_dir):
    import io

    from rich.console import Console

    from components.rl.progress import ProgressBar

    out = io.StringIO()
    trainer = make_trainer(tiny_lm_dir, update_epochs=1)
    with ProgressBar(total_episodes=32, console=Console(file=out, width=120, force_terminal=False)) as bar:
        trainer.train(PROMPTS, iterations=2, callback=bar)
    assert bar.progress.tasks[0].completed == 32
    assert "32/32" in out.getvalue() and "score" in out.getvalue() and "kl" in out.getvalue()


def test_separate_critic_starts_from_the_reward_model_when_vocabularies_match(tiny_lm_dir, tiny_reward_dir):
    from components.models.loading import load_reward_model

    cfg = RunConfig.model_validate(
        {
            "policy": {"model": str(tiny_lm_dir)}, "critic": {"type": "separate"},
            "reward": {"model": str(tiny_reward_dir)},
            "rl": {"rollout_batch_size": 16, "mini_batch_size": 8},
        }
    )
    trainer = build_trainer(load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"), **cfg.trainer_sections())
    reward_model = load_reward_model(tiny_reward_dir)
    reward_backbone = reward_model.transformer.state_dict()
    for name, tensor in trainer.critic.backbone.state_dict().items():
        torch.testing.assert_close(tensor, reward_backbone[name])
    # ... and with its scoring head: the critic's first value of a whole text is the reward model's score of it.
    ids = load_tokenizer(tiny_lm_dir)(["the film was good and the acting great"], return_tensors="pt")
    with torch.no_grad():
        value = trainer.critic.value_head(trainer.critic.backbone(**ids).last_hidden_state[:, -1])
        torch.testing.assert_close(value, reward_model(**ids).logits[:, 0])
    assert value.abs().item() > 1e-3  # not the zero-initialised head


def test_prompt_plus_response_must_fit_the_policy_positions(tiny_lm_dir):
    with pytest.raises(ValueError, match=r"generation.max_prompt_tokens \(100\) \+ generation.max_new_tokens \(50\) exceed the policy's 128 positions"):
        Trainer(
            load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir), word_share("good"), RLConfig(rollout_batch_size=16, mini_batch_size=8),
            GenerationConfig(max_prompt_tokens=100, max_new_tokens=50),
        )


@pytest.mark.parametrize("value_head", ["shared", "separate"])
def test_packed_and_padded_training_take_the_same_steps(tiny_lm_dir, value_head):
    # ragged prompts and responses: packing changes the layout of every forward, not the numbers
    runs = []
    for pack in (True, False):
        trainer = make_trainer(tiny_lm_dir, critic=value_head, pack_sequences=pack, rollout_batch_size=32, mini_batch_size=8)
        assert trainer.packed_models == ([] if not pack else ["policy", "critic"] if value_head == "separate" else ["policy"])
        history = [trainer.run_iteration(PROMPTS * 4) for _ in range(2)]
        runs.append((trainer, history))
    (packed, packed_stats), (padded, padded_stats) = runs
    for a, b in zip(packed_stats, padded_stats):
        for name in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/approxkl", "val/mean"):
            assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-5), name
    for a, b in zip(packed._trainable_parameters(), padded._trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
