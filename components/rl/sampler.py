"""The KV-cache sampler: prompts (token ids) -> `Samples`, the sampled responses with their log-probabilities.

`sample` is our own decoding loop over the KV cache: at each step one backbone call gives the hidden
state of the last token, from which the LM head gives the logits (hence the sampled token's old
log-probability) and the value head gives the old value. No second policy forward is needed.
For an encoder-decoder the encoder reads the prompt once and the decoder steps from
`decoder_start_token_id` with its own cache (`decoding_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel, StaticCache

from components.config import GenerationConfig
from components.rl import distributed
from components.rl.core import logprobs_of, response_mask
from components.rl.roles import (
    backbone_of,
    decoder_start_token_id,
    is_encoder_decoder,
    lm_logits,
    position_ids_from,
    run_backbone,
    running,
    seq2seq_forward,
    unwrap,
)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed tokens get -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class Samples:
    """A batch of sampled responses (the rollout's), trimmed to the longest one, as experience making takes it.
    Padding (after the first EOS) is 0 in every float."""

    queries: torch.Tensor  # (B, P) prompt ids, left-padded (right-padded for an encoder-decoder)
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, T) pad after the first EOS
    mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t) at the sampling temperature
    values: torch.Tensor | None  # (B, T) V_old(s_t) from the shared value head, if any
    ended_with_eos: torch.Tensor  # (B,) bool
    encoder_decoder: bool = False  # the responses are the decoder's, not a continuation of the queries

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1).long()


@torch.no_grad()  # not inference mode: FSDP's gathered parameters are reused by the update's forwards
def sample(
    policy: PreTrainedModel,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    generation: GenerationConfig,
    eos_ids: torch.Tensor,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    value_head: torch.nn.Module | None = None,
    rows: tuple[int, int] | None = None,
) -> Samples:
    """Sample up to `max_new_tokens` per prompt, stopping once every row has produced an EOS.

    `rows=(offset, total)`: these prompts are rows offset.. of a global batch of `total` shared among
    data-parallel ranks; they draw their slice of the global batch's noise, and decoding stops once every
    rank's rows have ended, so the ranks together sample what one process would.

    `generation.generation_batch_size`: the prompts are sampled that many at a time (one KV cache of that many rows
    at once), one after the other from the same generator, and the pieces joined (responses padded to the longest)."""
    size = generation.generation_batch_size
    if size is not None and queries.shape[0] > size:
        return _joined(policy, queries, query_mask, generation, eos_ids, pad_token_id, generator, value_head, rows)
    device = queries.device
    eos_ids = eos_ids.to(device)
    batch = queries.shape[0]
    tokens, logprobs, values = [], [], []
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    with running(policy) as model:
        step = decoding_steps(model, queries, query_mask, generation.kv_cache, generation.max_new_tokens)
        logits, hidden = step(None)
        for t in range(generation.max_new_tokens):
            logits = logits.float() / generation.temperature
            if value_head is not None:
                values.append(value_head(hidden).float())
            probs = torch.softmax(filter_logits(logits, generation.top_k, generation.top_p), dim=-1)
            if rows is None:
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:  # multinomial's own draw, argmax p / q with q ~ Exp(1), over the global batch
                offset, total = rows
                noise = torch.empty((total, probs.shape[-1]), device=device).exponential_(1, generator=generator)
                token = (probs / noise[offset : offset + batch]).argmax(-1)
            logprobs.append(logprobs_of(logits, token))
            token = torch.where(ended, pad_token_id, token)
            tokens.append(token)
            ended |= torch.isin(token, eos_ids)
            done = bool(ended.all()) if rows is None else distributed.all_true(bool(ended.all()))
            if done or t == generation.max_new_tokens - 1:
                break
            logits, hidden = step(token)
    responses = torch.stack(tokens, 1)
    mask = response_mask(responses, eos_ids)
    return Samples(
        queries=queries,
        query_mask=query_mask,
        responses=responses,
        mask=mask,
        logprobs=torch.stack(logprobs, 1) * mask,
        values=torch.stack(values, 1) * mask if values else None,
        ended_with_eos=ended,
        encoder_decoder=is_encoder_decoder(policy),
    )


def _joined(policy, queries, query_mask, generation, eos_ids, pad_token_id, generator, value_head, rows) -> Samples:
    """`sample` over `generation.generation_batch_size` prompts at a time, one piece after the other from the same
    generator, the pieces joined with their responses padded to the longest."""
    if rows is not None:
        raise ValueError("generation.generation_batch_size is for one process; under data parallelism each process "
                         "samples its own share of the batch: leave it unset (null)")
    size, whole = generation.generation_batch_size, generation.model_copy(update={"generation_batch_size": None})
    pieces = [sample(policy, queries[i : i + size], query_mask[i : i + size], whole, eos_ids, pad_token_id, generator,
                     value_head) for i in range(0, queries.shape[0], size)]
    width = max(piece.responses.shape[1] for piece in pieces)

    def joined(name: str, pad) -> torch.Tensor | None:
        tensors = [getattr(piece, name) for piece in pieces]
        if tensors[0] is None:
            return None
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in tensors])

    return Samples(
        queries=queries, query_mask=query_mask, responses=joined("responses", pad_token_id), mask=joined("mask", 0.0),
        logprobs=joined("logprobs", 0.0), values=joined("values", 0.0),
        ended_with_eos=torch.cat([piece.ended_with_eos for piece in pieces]), encoder_decoder=pieces[0].encoder_decoder,
    )


def kv_cache(model: PreTrainedModel, kind: str, length: int):
    """The causal LM's KV cache for `length` positions (generation.kv_cache): transformers' StaticCache, allocated once
    for the whole sequence, or a DynamicCache grown token by token. `auto`: static on a GPU where the family supports it
    (`_can_compile_fullgraph`: no reallocation per token, and fixed shapes for CUDA graphs and torch.compile), dynamic
    on the CPU, where static measured no faster (0.92x on the demo, 1.03x on GPT-2 6x512: benchmarks/kv_cache.py)."""
    supported = getattr(unwrap(model), "_can_compile_fullgraph", False)
    if kind == "static" or (kind == "auto" and supported and model.device.type == "cuda"):
        return StaticCache(config=unwrap(model).config, max_cache_len=length)
    return DynamicCache()


def decoding_steps(model: PreTrainedModel, queries: torch.Tensor, query_mask: torch.Tensor, cache_kind: str = "dynamic",
                   max_new_tokens: int = 0):
    """`step(token)` -> (logits, hidden) of the next position, extending the KV cache: `step(None)` reads
    the prompt, then each call feeds the token just sampled (B,). Causal LM: the backbone over the prompt,
    then one token at a time, its cache as `kv_cache` picks. Encoder-decoder: the encoder once, then the decoder
    from its start token."""
    batch = queries.shape[0]
    if is_encoder_decoder(model):
        encoder_outputs = unwrap(model).get_encoder()(input_ids=queries, attention_mask=query_mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = queries.new_full((batch,), decoder_start_token_id(model))

        def seq2seq_step(token: torch.Tensor | None):
            nonlocal cache
            token = start if token is None else token
            logits, hidden, cache = seq2seq_forward(model, query_mask, token[:, None], encoder_outputs=encoder_outputs, cache=cache)
            return logits[:, -1], hidden[:, -1]

        return seq2seq_step

    backbone = backbone_of(model)
    cache = kv_cache(model, cache_kind, queries.shape[1] + max_new_tokens)
    attention_mask = query_mask
    next_position = None

    def causal_step(token: torch.Tensor | None):
        nonlocal attention_mask, next_position
        if token is None:
            positions = position_ids_from(query_mask)
            hidden = run_backbone(backbone, queries, attention_mask, positions, cache)[:, -1]
            next_position = positions[:, -1:] + 1
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            hidden = run_backbone(backbone, token[:, None], attention_mask, next_position, cache)[:, -1]
            next_position = next_position + 1
        return lm_logits(model, hidden), hidden

    return causal_step

