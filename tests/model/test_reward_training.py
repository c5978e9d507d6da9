"""The Bradley-Terry trainer on a tiny GPT-2: it learns a preference, resumes exactly, reads chosen and rejected in one
forward, honours margins, stops on a non-finite loss before any step, and trains only adapters and head with LoRA.
Dropout is off unless kept; kept, its masks come from the seed alone."""

from __future__ import annotations

import random

import pytest
import torch
from support import one_thread, save_tiny_lm_with_dropout  # noqa: F401 - tiny models are op-overhead bound
from transformers import LlamaConfig, LlamaForSequenceClassification

from components.config import LoraConfig, RewardModelConfig, RewardTrainingConfig
from components.data.preferences import PreferencePair
from components.reward.training import RewardTrainer, disable_dropout, encode_pairs, load_base, lr_factor, score_pairs
from components.errors import TrainingError


def pairs(n: int, seed: int = 0, margin: float | None = None) -> list[PreferencePair]:
    """Reviews where the annotators prefer `good`/`great` to `bad`/`awful`."""
    rng = random.Random(seed)
    out = []
    for row in range(1, n + 1):
        subject = rng.choice(["the film", "the movie", "the plot", "the acting"])
        good, bad = rng.choice(["good", "great", "fun"]), rng.choice(["bad", "awful", "boring"])
        out.append(PreferencePair(f"{subject} was", f" very {good} .", f" very {bad} .", margin, row))
    return out


def trainer_for(tiny_lm_dir, train, steps=40, seed=0, lora=False, **training):
    model, tokenizer = load_base(RewardModelConfig(base=str(tiny_lm_dir), lora=LoraConfig(enabled=lora, target_modules=["c_attn"])), seed)
    settings = RewardTrainingConfig(learning_rate=3e-3, batch_size=8, max_steps=steps, **training)
    return RewardTrainer(model, encode_pairs(train, tokenizer), settings, seed, tokenizer.pad_token_id), tokenizer


def test_it_learns_the_preference_and_scores_held_out_pairs(tiny_lm_dir):
    trainer, tokenizer = trainer_for(tiny_lm_dir, pairs(200), steps=60)
    trainer.train()
    chosen, rejected = score_pairs(trainer.model, encode_pairs(pairs(50, seed=1), tokenizer), tokenizer.pad_token_id)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / 50
    assert accuracy >= 0.9 and trainer.history[-1]["train/loss"] < trainer.history[0]["train/loss"]
    assert [row["step"] for row in trainer.history] == list(range(1, 61))


@pytest.mark.parametrize("sampling", ["epochs", "with_replacement"])
def test_resuming_from_a_checkpoint_takes_the_same_steps(tiny_lm_dir, tmp_path, sampling):
    straight, _ = trainer_for(tiny_lm_dir, pairs(100), steps=30, sampling=sampling)
    straight.train()
    first, _ = trainer_for(tiny_lm_dir, pairs(100), steps=30, sampling=sampling)
    first.train(until=12)
    first.save_checkpoint(tmp_path / "checkpoint")
    resumed, _ = trainer_for(tiny_lm_dir, pairs(100), steps=30, sampling=sampling)  # a new process: fresh state
    resumed.load_checkpoint(tmp_path / "checkpoint")
    assert resumed.step == 12
    resumed.train()
    assert resumed.history == straight.history
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_length_is_refused(tiny_lm_dir, tmp_path):
    trainer, _ = trainer_for(tiny_lm_dir, pairs(50), steps=10)
    trainer.train(until=2)
    trainer.save_checkpoint(tmp_path / "checkpoint")
    other, _ = trainer_for(tiny_lm_dir, pairs(50), steps=20)
    with pytest.raises(TrainingError, match="10-step run"):
        other.load_checkpoint(tmp_path / "checkpoint")


def test_chosen_and_rejected_go_through_one_forward(tiny_lm_dir):
    trainer, _ = trainer_for(tiny_lm_dir, pairs(50), steps=5)
    rows = []
    hook = trainer.model.transformer.register_forward_hook(lambda module, inputs, output: rows.append(output[0].shape[0]))
    trainer.train()
    hook.remove()
    assert rows == [16] * 5  # one forward of 2 x 8 texts per step


def test_a_margin_asks_for_a_larger_gap(tiny_lm_dir):
    plain, _ = trainer_for(tiny_lm_dir, pairs(50), steps=1)
    margin, _ = trainer_for(tiny_lm_dir, pairs(50, margin=2.0), steps=1)
    plain.train(), margin.train()
    # -log sigmoid(d - m) > -log sigmoid(d) for m > 0, on the same batch and weights
    assert margin.history[0]["train/loss"] > plain.history[0]["train/loss"] + 0.5


def test_a_non_finite_loss_stops_before_the_optimizer_step(tiny_lm_dir):
    trainer, _ = trainer_for(tiny_lm_dir, pairs(20, margin=float("nan")), steps=5)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingError, match="non-finite loss"):
        trainer.train()
    assert trainer.step == 0 and trainer.history == []
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def test_lora_trains_the_adapters_and_the_head_only(tiny_lm_dir):
    trainer, _ = trainer_for(tiny_lm_dir, pairs(50), steps=5, lora=True)
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or "score" in name for name in trained)
    assert any("score" in name for name in trained)
    frozen = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(frozen[name], p) for name, p in trainer.model.named_parameters() if name in frozen)


def test_the_schedule_warms_up_then_decays_to_its_floor():
    training = RewardTrainingConfig(max_steps=100, warmup_ratio=0.1, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(step, 100, training) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = RewardTrainingConfig(max_steps=100, warmup_ratio=0.0, lr_schedule="constant")
    assert {lr_factor(step, 100, constant) for step in range(100)} == {1.0}


def test_epochs_take_every_pair_once_per_epoch_in_a_new_order(tiny_lm_dir):
    trainer, _ = trainer_for(tiny_lm_dir, pairs(20), steps=5)  # 5 steps x 8 pairs = 2 epochs of 20
    assert trainer.training.sampling == "epochs"
    seen = []
    for step in range(5):
        trainer.step = step
        seen += trainer.batch_indices()
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20)) and seen[:20] != seen[20:]
    again, _ = trainer_for(tiny_lm_dir, pairs(20), steps=5)
    again.step = 3  # a resumed run: the order comes from the seed and the epoch alone
    assert again.batch_indices() == seen[24:32]


@pytest.fixture(scope="module")
def lm_with_dropout(tmp_path_factory):
    return save_tiny_lm_with_dropout(tmp_path_factory.mktemp("gpt2-dropout"))


def test_dropout_is_off_in_training_and_the_saved_config_keeps_its_own(lm_with_dropout):
    trainer, _ = trainer_for(lm_with_dropout, pairs(20), steps=2)
    dropouts = [module for module in trainer.model.modules() if isinstance(module, torch.nn.Dropout)]
    assert len(dropouts) == 7 and {module.p for module in dropouts} == {0.0}  # embeddings, 2 x (attention, its output, MLP)
    assert trainer.model.config.resid_pdrop == 0.1  # what save_pretrained writes
    kept, _ = trainer_for(lm_with_dropout, pairs(20), steps=2, disable_dropout=False)
    assert {module.p for module in kept.model.modules() if isinstance(module, torch.nn.Dropout)} == {0.1}


def test_a_rate_an_attention_layer_keeps_as_a_number_is_disabled_too():
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.1,
                                                       num_labels=1, pad_token_id=0))
    assert model.model.layers[0].self_attn.attention_dropout == 0.1
    disable_dropout(model)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


def test_with_dropout_kept_its_masks_come_from_the_seed_alone_and_a_resume_draws_the_same(lm_with_dropout, tmp_path):
    def kept(seed=0):
        return trainer_for(lm_with_dropout, pairs(40), steps=8, seed=seed, disable_dropout=False)[0]

    straight = kept()
    straight.train()
    torch.rand(1000)  # other draws of the process between runs reach no mask
    again = kept()
    again.train()
    assert again.history == straight.history
    first = kept()
    first.train(until=3)
    first.save_checkpoint(tmp_path / "checkpoint")
    torch.rand(1000)
    resumed = kept()  # a new process: fresh state
    resumed.load_checkpoint(tmp_path / "checkpoint")
    resumed.train()
    assert resumed.history == straight.history
    without = trainer_for(lm_with_dropout, pairs(40), steps=8)[0]
    without.train()
    assert without.history[0]["train/loss"] != straight.history[0]["train/loss"]  # the masks were drawn


def test_lora_adapters_start_from_the_seed_alone(tiny_lm_dir):
    first = trainer_for(tiny_lm_dir, pairs(10), steps=1, lora=True)[0].model.state_dict()
    torch.rand(1000)  # other draws of the process
    second = trainer_for(tiny_lm_dir, pairs(10), steps=1, lora=True)[0].model.state_dict()
    assert any("lora_A" in name for name in first)
    assert all(torch.equal(first[name], second[name]) for name in first)
