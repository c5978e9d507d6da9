"""Whole-sequence forwards: prompt + response through a model at once, for the hidden states, logits and
log-probabilities at the positions that predict each response token (the reference's and the critic's forwards in
experience making, the policy's in the update and the evaluation's KL).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from components.rl.core import logprobs_of
from components.rl.packing import pack_episodes, packed_hidden
from components.rl.roles import (
    backbone_of,
    decoder_start_token_id,
    is_encoder_decoder,
    lm_logits,
    position_ids_from,
    run_backbone,
    running,
    seq2seq_forward,
)


def response_hidden(
    model: PreTrainedModel | torch.nn.Module,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    mask: torch.Tensor,
    backbone: torch.nn.Module | None = None,
    pack: bool = False,
) -> torch.Tensor:
    """Hidden states (B, T, H) of the positions that predict each response token (one forward). `pack`: the
    episodes' real tokens packed into rows without padding (`packing`; only for a backbone `packs_sequences`)."""
    backbone = backbone if backbone is not None else backbone_of(model)
    if pack:
        return packed_hidden(backbone, pack_episodes(queries, query_mask, responses, mask))
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.to(query_mask.dtype)], dim=1)
    hidden = run_backbone(backbone, input_ids, attention_mask, position_ids_from(attention_mask))
    return hidden[:, queries.shape[1] - 1 : -1]


def response_forward(
    model: PreTrainedModel | torch.nn.Module,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    mask: torch.Tensor,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, hidden), each (B, T, .), of the positions that predict each response token, in one forward.
    Causal LM: the backbone over prompt + response, the LM head on the response positions only.
    Encoder-decoder: the decoder fed [start] + response[:-1] (teacher forcing) over the encoded prompt."""
    if is_encoder_decoder(model):
        start = responses.new_full((responses.shape[0], 1), decoder_start_token_id(model))
        decoder_input_ids = torch.cat([start, responses[:, :-1]], dim=1)
        logits, hidden, _ = seq2seq_forward(model, query_mask, decoder_input_ids, input_ids=queries)
        return logits, hidden
    hidden = response_hidden(model, queries, query_mask, responses, mask, pack=pack)
    return lm_logits(model, hidden), hidden


def response_logprobs(
    model: PreTrainedModel,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    pack: bool = False,
) -> torch.Tensor:
    """log pi(a_t | s_t) of the given responses at `temperature` (0 on padding). Call under no_grad/inference_mode.
    An `AdapterDisabled` reference is run with the adapter off."""
    with running(model) as model:
        logits = response_forward(model, queries, query_mask, responses, mask, pack=pack)[0].float() / temperature
    return logprobs_of(logits, responses) * mask
