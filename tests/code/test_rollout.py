"""The rollout: prompt tokenization, the KV-cache sampler, masks, whole-sequence forwards, and the evaluation helpers."""

import pytest
import torch
from support import one_thread  # noqa: F401

from components.config import GenerationConfig
from components.models.loading import load_causal_lm, load_tokenizer
from components.rl.roles import ValueHead
from components.rl.forward import response_hidden, response_logprobs
from components.rl.generation import generate, sequence_kl
from components.rl.sampler import sample
from components.rl.tokenization import PromptError, decode, eos_token_ids, tokenize_prompts

PROMPTS = ["the film was very good and", "it", "I loved the movie but the", "we hated"] * 4


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_causal_lm(tiny_lm_dir), load_tokenizer(tiny_lm_dir)


def test_long_prompts_are_truncated_keeping_their_end(lm):
    _, tokenizer = lm
    ids, mask = tokenize_prompts(tokenizer, ["the film was very good and fun", "it"], GenerationConfig(max_prompt_tokens=3))
    assert tokenizer.decode(ids[0]) == "good and fun"
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]  # left padding
    assert ids[1, :2].tolist() == [tokenizer.pad_token_id] * 2


def test_long_prompts_are_rejected_by_index_when_asked(lm):
    _, tokenizer = lm
    generation = GenerationConfig(max_prompt_tokens=3, prompt_overflow="reject")
    with pytest.raises(PromptError, match=r"prompt 1 has 7 tokens, more than generation.max_prompt_tokens=3"):
        tokenize_prompts(tokenizer, ["it", "the film was very good and fun"], generation)


def test_empty_prompt_batch_and_empty_prompt_are_errors(lm):
    _, tokenizer = lm
    with pytest.raises(PromptError, match="empty"):
        tokenize_prompts(tokenizer, [], GenerationConfig())
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        tokenize_prompts(tokenizer, ["it", ""], GenerationConfig())


def rollout_of(lm, seed=0, max_new_tokens=20, value_head=None, **generation):
    policy, tokenizer = lm
    generation = GenerationConfig(max_new_tokens=max_new_tokens, **generation)
    queries, query_mask = tokenize_prompts(tokenizer, PROMPTS, generation)
    generator = torch.Generator().manual_seed(seed)
    eos = eos_token_ids(tokenizer, policy)
    return sample(policy, queries, query_mask, generation, eos, tokenizer.pad_token_id, generator, value_head), generation


def test_tokens_after_the_first_eos_are_padding_and_masked(lm):
    rollout, _ = rollout_of(lm)
    eos, pad = lm[1].eos_token_id, lm[1].pad_token_id
    ended = rollout.ended_with_eos
    assert 0 < ended.sum() < len(PROMPTS), "the seed should give rows with and without EOS"
    for row, mask, n, done in zip(rollout.responses, rollout.mask, rollout.lengths, ended):
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert (row[n - 1] == eos) == bool(done)  # the EOS is the last real token
        assert row[n:].eq(pad).all()
    assert (rollout.logprobs[rollout.mask == 0] == 0).all()
    assert rollout.responses.shape[1] == 20


def test_responses_are_trimmed_to_the_longest_one(lm):
    rollout, _ = rollout_of(lm, seed=3, temperature=0.7, top_k=5)
    assert rollout.ended_with_eos.all() or rollout.responses.shape[1] == 20
    assert rollout.lengths.max() == rollout.responses.shape[1]


def test_sampling_logprobs_and_values_equal_a_full_forward(lm):
    """The old log-probs/values read during sampling equal those of one forward over prompt + response."""
    policy, _ = lm
    head = ValueHead(policy.config.n_embd)
    torch.nn.init.normal_(head.weight)
    rollout, generation = rollout_of(lm, temperature=0.8, value_head=head)
    args = (rollout.queries, rollout.query_mask, rollout.responses, rollout.mask)
    with torch.no_grad():
        logprobs = response_logprobs(policy, *args, temperature=0.8)
        values = head(response_hidden(policy, *args)) * rollout.mask
    torch.testing.assert_close(rollout.logprobs, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.values, values, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_logprobs(lm):
    policy, tokenizer = lm
    rollout, _ = rollout_of(lm)
    row = 1  # "it": the most padded prompt
    args = (rollout.queries, rollout.query_mask, rollout.responses, rollout.mask)
    alone = tuple(t[row : row + 1] for t in args)
    first = alone[1][0].nonzero()[0].item()
    alone = (alone[0][:, first:], alone[1][:, first:], alone[2], alone[3])
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(policy, *args)[row : row + 1], response_logprobs(policy, *alone), atol=1e-5, rtol=0)


def test_decoded_completion_continues_the_prompt(lm):
    rollout, _ = rollout_of(lm)
    prompts, completions = decode(lm[1], rollout)
    assert prompts[0] == PROMPTS[0]
    full = lm[1].decode(torch.cat([rollout.queries[0], rollout.responses[0, : rollout.lengths[0]]]), skip_special_tokens=True)
    assert prompts[0] + completions[0] == full


def test_generate_is_reproducible_for_a_seed(lm):
    policy, tokenizer = lm
    generation = GenerationConfig(max_new_tokens=8)
    first = generate(policy, tokenizer, PROMPTS, generation, seed=7, batch_size=8)
    again = generate(policy, tokenizer, PROMPTS, generation, seed=7, batch_size=8)
    other = generate(policy, tokenizer, PROMPTS, generation, seed=8, batch_size=8)
    assert first == again and first.completions != other.completions
    completions, ended, lengths, logprobs, seen = first
    assert seen == [tokenizer.decode(tokenizer(p)["input_ids"]) for p in PROMPTS]  # specials kept, as read
    assert len(completions) == len(ended) == len(lengths) == len(logprobs) == len(PROMPTS)
    assert all(lp <= 0 for lp in logprobs) and all(1 <= n <= 8 for n in lengths)


def test_sequence_kl_is_zero_against_itself_and_matches_the_rollout_definition(lm):
    policy, tokenizer = lm
    generation = GenerationConfig(max_new_tokens=8)
    samples = generate(policy, tokenizer, PROMPTS[:4], generation, seed=0)
    assert sequence_kl(policy, policy, tokenizer, PROMPTS[:4], samples.completions, generation, samples.ended_with_eos) == 0.0
    other = load_causal_lm(tokenizer.name_or_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = sequence_kl(policy, other, tokenizer, PROMPTS[:4], samples.completions, generation, samples.ended_with_eos)
    assert kl != 0.0
    # by hand: logprobs of the same tokens under both models
    queries, query_mask = tokenize_prompts(tokenizer, PROMPTS[:4], generation)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if e else []) for c, e in zip(samples.completions, samples.ended_with_eos)]
    width = max(map(len, rows))
    responses = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        diff = response_logprobs(policy, queries, query_mask, responses, mask) - response_logprobs(other, queries, query_mask, responses, mask)
    assert kl == pytest.approx(diff.sum(1).mean().item(), abs=1e-5)
