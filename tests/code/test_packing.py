"""Sequence packing: episodes' real tokens packed into rows without padding give the padded forward's hidden
states, and a model family whose attention would mix packed episodes is detected and run padded."""

import pytest
import torch
from support import policy_tokenizer, save_tiny_policy
from support import one_thread  # noqa: F401
from transformers import AutoModelForCausalLM, BloomConfig

from components.rl.roles import backbone_of
from components.rl.packing import pack_episodes, packs_sequences
from components.rl.forward import response_hidden, response_logprobs


def ragged_batch(vocab: int, seed: int = 0, batch: int = 12, prompt_width: int = 9, response_width: int = 7):
    """Left-padded prompts of 2..prompt_width tokens and responses of 1..response_width, as a rollout has them."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randint(4, vocab, (batch, prompt_width), generator=g)
    responses = torch.randint(4, vocab, (batch, response_width), generator=g)
    query_mask = torch.ones_like(queries)
    mask = torch.ones(batch, response_width)
    for i in range(batch):
        query_mask[i, : prompt_width - int(torch.randint(2, prompt_width + 1, (1,), generator=g))] = 0
        mask[i, int(torch.randint(1, response_width + 1, (1,), generator=g)) :] = 0
    return queries, query_mask, responses, mask


def test_episodes_are_packed_first_fit_with_positions_restarting_and_response_positions_found():
    # prompts of 2, 1, 3 tokens (left-padded), responses of 1, 2, 3 tokens: lengths 3, 3, 6
    queries = torch.tensor([[0, 11, 12], [0, 0, 21], [31, 32, 33]])
    query_mask = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]])
    responses = torch.tensor([[13, 0, 0], [22, 23, 0], [34, 35, 36]])
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]])
    packed = pack_episodes(queries, query_mask, responses, mask)
    # rows as wide as the longest episode (6): the longest alone, then the two of 3 in one row
    assert packed.input_ids.tolist() == [[31, 32, 33, 34, 35, 36], [11, 12, 13, 21, 22, 23]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
    flat = packed.input_ids.flatten()
    for i in range(3):
        length = int(mask[i].sum())
        # the position that predicts response token t holds the token before it
        predicted_next = flat[packed.response_index[i, :length] + 1]
        assert predicted_next.tolist() == responses[i, :length].tolist()
    # past the end of a response, the index stays on the episode's last predicting position
    assert packed.response_index[0].tolist() == [7, 7, 7]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gpt_neox", "mistral"])
def test_packed_forward_equals_the_padded_one(family, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_policy(tmp_path / family, family)).eval()
    batch = ragged_batch(model.config.vocab_size)
    assert packs_sequences(backbone_of(model))
    assert pack_episodes(*batch).input_ids.shape[0] < batch[0].shape[0]  # episodes do share rows
    mask = batch[3].bool()
    with torch.no_grad():
        padded = response_hidden(model, *batch)
        packed = response_hidden(model, *batch, pack=True)
        logprobs = response_logprobs(model, *batch), response_logprobs(model, *batch, pack=True)
    torch.testing.assert_close(packed[mask], padded[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs[1], logprobs[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()  # positions past a response's end are finite too (masked later)


def test_gradients_through_the_packed_forward_equal_the_padded_ones(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_policy(tmp_path / "llama", "llama")).eval()
    batch = ragged_batch(model.config.vocab_size, seed=1)
    grads = []
    for pack in (False, True):
        model.zero_grad()
        (response_logprobs(model, *batch, pack=pack) * batch[3]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for padded, packed in zip(*grads):
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


def test_families_whose_attention_mixes_packed_sequences_are_detected(tmp_path):
    tokenizer = policy_tokenizer("gpt2")
    opt = AutoModelForCausalLM.from_pretrained(save_tiny_policy(tmp_path / "opt", "opt")).eval()  # positions from the mask
    bloom = AutoModelForCausalLM.from_config(  # ALiBi, no position ids
        BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=2, attn_implementation="eager")
    ).eval()
    for model in (opt, bloom):
        assert not packs_sequences(backbone_of(model))
        batch = ragged_batch(model.config.vocab_size)
        with torch.no_grad():  # which is why: packed, the episodes would see each other
            packed, padded = response_hidden(model, *batch, pack=True), response_hidden(model, *batch)
        assert not torch.allclose(packed[batch[3].bool()], padded[batch[3].bool()], atol=1e-4)
