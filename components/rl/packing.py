"""Sequence packing: the forwards over prompt + response without padding.

A batch of episodes laid out as rows [left padding, prompt, response, right padding] spends its FLOPs on
the padding as on tokens: on the demo task 47% of a rollout batch's positions are padding, 36% of a trimmed
minibatch's (prompts of 5-16 tokens, responses of 1-24). Packed, each episode's real tokens are placed one
after another in a few rows, each episode's position ids restarting at 0; transformers reads position ids
that restart inside a row as separate sequences (its block-diagonal causal mask,
`find_packed_sequence_indices`), so no token attends across episodes, and the hidden states equal the padded
forward's to float rounding.

Rows are filled first-fit by decreasing length, each as wide as the longest episode, so packing never
widens a row and the attention cost (quadratic in the row width) does not grow. The rest of the engine keeps
its (B, T) layout: `packed_hidden` gathers back, for each episode, the positions that predict its
response tokens.

A model family whose attention does not read packed position ids (one with ALiBi, such as BLOOM, or an
older custom forward) would let episodes see each other; `packs_sequences` checks the model on two short
sequences once, and the engine packs only if the packed forward equals the separate ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.rl.roles import position_ids_from, run_backbone

_SUPPORT: dict[tuple, bool] = {}


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (rows, width): the episodes' real tokens one after another, then filler
    position_ids: torch.Tensor  # (rows, width): 0.. within each episode
    response_index: torch.Tensor  # (B, T): flat position (row * width + column) that predicts response token t


def pack_episodes(queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> PackedBatch:
    """Pack the real tokens (query_mask / mask == 1, prompts padded on either side) of each episode.
    Response token t of episode i is predicted by the position of its token P_i - 1 + t; past the end of
    its response (t >= R_i), the index repeats the episode's last predicting position (finite, masked later)."""
    tokens = torch.cat([queries, responses], dim=1)
    real = torch.cat([query_mask.bool(), mask.bool()], dim=1)
    prompt_lengths = query_mask.long().sum(1)
    lengths = (prompt_lengths + mask.long().sum(1)).tolist()
    width = max(lengths)

    # first-fit decreasing: each episode goes to the first row with room, longest first
    row_of, offset_of, fill = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
        if row == len(fill):
            fill.append(0)
        row_of[i], offset_of[i] = row, fill[row]
        fill[row] += lengths[i]

    device = tokens.device
    start = torch.tensor(row_of, device=device) * width + torch.tensor(offset_of, device=device)  # (B,)
    position = position_ids_from(real)  # each real token's position within its episode, as the padded forward's
    destination = (start[:, None] + position)[real]
    real_tokens = tokens[real]
    # The filler after a row's last episode is a real token of the batch, not the pad id: models warn
    # when they see pad ids without an attention mask.
    input_ids = real_tokens[:1].repeat(len(fill) * width)
    input_ids[destination] = real_tokens
    # The filler keeps its column as position: it comes after every real token of its row, so causal
    # attention never reads it.
    position_ids = torch.arange(width, device=device).repeat(len(fill))
    position_ids[destination] = position[real]

    steps = torch.arange(responses.shape[1], device=device)
    last = (mask.long().sum(1) - 1).clamp(min=0)
    response_index = start[:, None] + prompt_lengths[:, None] - 1 + torch.minimum(steps[None, :], last[:, None])
    return PackedBatch(input_ids.view(-1, width), position_ids.view(-1, width), response_index)


def packed_hidden(backbone: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Hidden states (B, T, H) of the positions that predict each response token, from one packed forward."""
    hidden = run_backbone(backbone, batch.input_ids, None, batch.position_ids)
    return hidden.reshape(-1, hidden.shape[-1])[batch.response_index]


@torch.no_grad()
def packs_sequences(backbone: nn.Module) -> bool:
    """Whether this backbone's forward keeps packed sequences apart: two short sequences run packed in one row
    give the hidden states they give alone. Checked once per model class and attention implementation."""
    config = getattr(backbone, "config", None)
    key = (type(backbone), getattr(config, "_attn_implementation", None))
    if key not in _SUPPORT:
        _SUPPORT[key] = _keeps_sequences_apart(backbone)
    return _SUPPORT[key]


def _keeps_sequences_apart(backbone: nn.Module) -> bool:
    vocab = int(getattr(backbone.config, "vocab_size", 0) or 0)
    if vocab < 8:
        return False
    device = next(backbone.parameters()).device
    first = torch.tensor([[1, 2, 3, 4]], device=device) % vocab
    second = torch.tensor([[5, 6, 7]], device=device) % vocab

    def alone(ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        return run_backbone(backbone, ids, mask, position_ids_from(mask))

    try:
        packed = run_backbone(
            backbone, torch.cat([first, second], 1), None, torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
        )
        expected = torch.cat([alone(first), alone(second)], 1)
    except (TypeError, ValueError, RuntimeError, IndexError):  # a forward that cannot take this input: pad instead
        return False
    return bool(torch.allclose(packed.float(), expected.float(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6))
