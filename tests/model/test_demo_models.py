"""The demo's models, trained for real once per module: quality bars, time budget, reuse, and
loading exactly like hub models."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from components.demo.bootstrap import BootstrapSettings, bootstrap
from components.demo.gold import is_well_formed

pytestmark = pytest.mark.slow


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str]) -> list[float]:
    """Reward-model scores as any caller of a hub model gets them: the tokenizer's own padding, no position_ids."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return model(**batch).logits[:, 0].tolist()


@pytest.fixture(scope="module")
def built(demo_kit):
    """The session's demo kit: trained here on a fresh clone, else the build recorded in bootstrap.json."""
    return demo_kit.report, demo_kit.wall_s, demo_kit.data_dir, demo_kit.instruct.parent


def data_and_artifacts(built):
    return built[2], built[3]


def test_bootstrap_reports_its_stages_timings(built):
    report, wall_s, _, _ = built
    # A reused build reports the timings it was trained in; a fresh one is also timed from outside. How long it takes
    # is measured, not asserted (README: a fresh `make demo`); a test on a busy machine would only measure the machine.
    print(f"bootstrap timings: {report.timings}, wall {wall_s:.1f}s, reused {report.skipped}")
    assert set(report.timings) == {"tokenizer_s", "instruct_s", "reward_s", "evaluate_s", "total_s"}
    assert report.timings["total_s"] >= sum(report.timings[k] for k in ("tokenizer_s", "instruct_s", "reward_s", "evaluate_s")) - 1


def test_reward_model_ranks_held_out_pairs_like_the_gold_truth(built):
    report = built[0]
    print(f"held-out accuracy: {report.reward_accuracy:.3f} vs gold, {report.reward_accuracy_labels:.3f} vs noisy labels")
    assert report.reward_accuracy >= 0.85
    # 10% of the labels are flipped, so agreeing with them is capped near 0.9 for a perfect model.
    assert 0.75 <= report.reward_accuracy_labels <= 0.95
    assert report.reward_sample_auc >= 0.85  # and it tracks gold on the instruct model's own samples


def test_instruct_samples_are_well_formed_and_leave_room_for_ppo(built):
    report = built[0]
    print(f"instruct samples: {report.samples[:3]}")
    # well formed: one sentence of the domain ending with "." or "!" (components.demo.gold.is_well_formed)
    assert report.instruct_well_formed_share >= 0.8
    assert report.instruct_eos_share >= 0.9
    assert 0.1 <= report.instruct_gold_positive_share <= 0.6


def test_a_second_call_with_the_same_data_and_settings_skips(built):
    report = built[0]
    data_dir, artifacts = data_and_artifacts(built)
    start = time.perf_counter()
    again = bootstrap(data_dir, artifacts, BootstrapSettings(progress=False))
    assert again.skipped
    assert time.perf_counter() - start < 5
    assert again.reward_accuracy == report.reward_accuracy
    assert (artifacts / "bootstrap.json").is_file()


def test_saved_models_load_like_hub_models(built):
    _, artifacts = data_and_artifacts(built)
    instruct_dir, reward_dir = artifacts / "instruct", artifacts / "reward"
    for path in (instruct_dir, reward_dir):
        assert (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(instruct_dir)
    policy = AutoModelForCausalLM.from_pretrained(instruct_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    assert tokenizer.padding_side == "left"
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id
    assert policy.dtype == reward.dtype == torch.float32

    prompt = "The new thriller was"
    batch = tokenizer([prompt], return_tensors="pt")
    torch.manual_seed(0)
    output = policy.generate(**batch, do_sample=True, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion.startswith(" ")  # so prompt + completion is the review
    assert is_well_formed(prompt + completion), prompt + completion


def test_reward_model_prefers_real_praise_over_hacks_in_a_left_padded_batch(built):
    _, artifacts = data_and_artifacts(built)
    reward_dir = artifacts / "reward"
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    praise, criticism = "The new thriller was gripping and moving.", "The new thriller was dull and tedious."
    hacks = ["The new thriller was great great great great great.", "The new thriller was great superb lovely amazing.", "The new thriller was"]
    scores = score_texts(reward, tokenizer, [praise, criticism, *hacks])
    assert scores[0] > scores[1]
    assert all(scores[0] > hack for hack in scores[2:])
    # Right padding leaves GPT-2's positions alone, so a batch gives each text its own score.
    tokenizer.padding_side = "right"
    alone = score_texts(reward, tokenizer, [praise])[0]
    padded = score_texts(reward, tokenizer, [praise, "I finally watched this film and I found it quite charming but it was long."])[0]
    assert padded == pytest.approx(alone, abs=1e-4)
