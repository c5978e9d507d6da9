"""RewardScorer: which output is the score, padding, batching, truncation, and its errors."""

import pytest
import torch
from support import one_thread  # noqa: F401
from support import save_tiny_reward_model, word_tokenizer

from components.config import RewardConfig
from components.models.loading import load_reward_model, load_tokenizer
from components.rl.reward import RewardLabelError, RewardScorer

PROMPTS = ["the film was", "I loved the movie", "it"]
COMPLETIONS = [" good .", " and the music was great", " bad"]


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("hate"), num_labels=2)


def unpadded_logits(model, tokenizer, texts):
    """Each text alone: no padding can disturb the score."""
    with torch.inference_mode():
        return torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts])


def texts():
    return [p + c for p, c in zip(PROMPTS, COMPLETIONS)]


def test_single_output_score_is_the_logit(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    scores = RewardScorer(model, tokenizer)(PROMPTS, COMPLETIONS)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, unpadded_logits(model, tokenizer, texts())[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_padding_side_and_batch_size_do_not_change_scores(tiny_reward_dir, padding_side, batch_size):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side=padding_side)
    scores = RewardScorer(model, tokenizer, batch_size=batch_size)(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scores, unpadded_logits(model, tokenizer, texts())[:, 0], atol=1e-5, rtol=0)


def test_pad_token_falls_back_to_eos(tiny_reward_dir):
    model = load_reward_model(tiny_reward_dir)
    expected = unpadded_logits(model, word_tokenizer(), texts())[:, 0]
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    scores = RewardScorer(model, tokenizer)(PROMPTS, COMPLETIONS)
    assert tokenizer.pad_token == "<eos>" and model.config.pad_token_id == tokenizer.eos_token_id
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_label_by_name_index_and_probability(two_label_dir):
    model, tokenizer = load_reward_model(two_label_dir), load_tokenizer(two_label_dir, padding_side="right")
    logits = unpadded_logits(model, tokenizer, texts())
    by_name = RewardScorer(model, tokenizer, label="nothate")(PROMPTS, COMPLETIONS)
    by_index = RewardScorer(model, tokenizer, label=1)(PROMPTS, COMPLETIONS)
    hate = RewardScorer(model, tokenizer, label="hate")(PROMPTS, COMPLETIONS)
    probability = RewardScorer(model, tokenizer, label="nothate", score="probability")(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(by_name, logits[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(by_index, by_name)
    torch.testing.assert_close(hate, logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(probability, logits.softmax(-1)[:, 1], atol=1e-6, rtol=0)


def test_from_config_loads_model_and_tokenizer(two_label_dir):
    scorer = RewardScorer.from_config(RewardConfig(model=str(two_label_dir), label="nothate", score_batch_size=2))
    assert scorer.index == 1 and scorer.batch_size == 2
    assert scorer(PROMPTS, COMPLETIONS).shape == (3,)


@pytest.mark.parametrize(
    "label, fragment",
    [("love", "reward.label='love' is not a label"), (2, "reward.label=2 is out of range"), (None, "set reward.label")],
)
def test_bad_label_names_the_key_and_the_allowed_labels(two_label_dir, label, fragment):
    model, tokenizer = load_reward_model(two_label_dir), load_tokenizer(two_label_dir)
    with pytest.raises(RewardLabelError) as error:
        RewardScorer(model, tokenizer, label=label)
    assert fragment in str(error.value)
    assert "'hate'" in str(error.value) and "'nothate'" in str(error.value)


def test_long_inputs_are_truncated_keeping_the_completion(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    long_prompt = "the film was very " * 20
    truncated = RewardScorer(model, tokenizer, max_length=4)([long_prompt], [" good and fun"])
    tail = unpadded_logits(model, tokenizer, ["very good and fun"])[:, 0]
    torch.testing.assert_close(truncated, tail, atol=1e-5, rtol=0)


def test_mismatched_inputs_are_an_error(tiny_reward_dir):
    scorer = RewardScorer(load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir))
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer(["a", "b"], ["c"])


def test_a_completion_the_policy_ended_with_eos_is_read_with_the_reward_tokenizers_eos(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    scores = RewardScorer(model, tokenizer)(PROMPTS, COMPLETIONS, ended_with_eos=[True, False, True])
    with_eos = [text + "<eos>" if ended else text for text, ended in zip(texts(), [True, False, True])]
    assert tokenizer(with_eos[0])["input_ids"][-2:] == [tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id]
    torch.testing.assert_close(scores, unpadded_logits(model, tokenizer, with_eos)[:, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(scores[0], unpadded_logits(model, tokenizer, texts()[:1])[0, 0], atol=1e-3)


def test_the_eos_stays_when_a_long_input_is_truncated(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    truncated = RewardScorer(model, tokenizer, max_length=4)(["the film was very " * 20], [" good and"], ended_with_eos=[True])
    tail = unpadded_logits(model, tokenizer, ["very good and <eos>"])[:, 0]
    torch.testing.assert_close(truncated, tail, atol=1e-5, rtol=0)


def test_without_append_eos_or_flags_every_completion_is_plain_text(tiny_reward_dir):
    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    plain = unpadded_logits(model, tokenizer, texts())[:, 0]
    off = RewardScorer(model, tokenizer, append_eos=False)(PROMPTS, COMPLETIONS, ended_with_eos=[True, True, True])
    no_flags = RewardScorer(model, tokenizer)(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_flags, plain, atol=1e-5, rtol=0)
    assert RewardScorer.from_config(RewardConfig(model=str(tiny_reward_dir), append_eos=False)).eos_suffix == ""


def test_no_second_eos_where_the_tokenizer_ends_every_text_with_one(tiny_reward_dir):
    from tokenizers.processors import TemplateProcessing

    model, tokenizer = load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir, padding_side="right")
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    scorer = RewardScorer(model, tokenizer)
    assert scorer.eos_suffix == ""
    torch.testing.assert_close(scorer(PROMPTS, COMPLETIONS, ended_with_eos=[True] * 3), scorer(PROMPTS, COMPLETIONS))


def test_ended_with_eos_flags_must_match_the_completions(tiny_reward_dir):
    scorer = RewardScorer(load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir))
    with pytest.raises(ValueError, match="3 completions but 2 ended_with_eos flags"):
        scorer(PROMPTS, COMPLETIONS, ended_with_eos=[True, False])
