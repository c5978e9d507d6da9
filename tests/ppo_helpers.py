"""Shared by the PPO tests: a one-thread fixture and a word-share reward."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are op-overhead bound; with 2 intra-op threads on a busy 2-core box each op can be ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_share(word: str):
    """A reward function: the share of `word` among the completion's words (0 for an empty completion)."""

    def reward_fn(prompts: list[str], completions: list[str]) -> torch.Tensor:
        shares = []
        for completion in completions:
            words = completion.split()
            shares.append(sum(w == word for w in words) / len(words) if words else 0.0)
        return torch.tensor(shares)

    return reward_fn
