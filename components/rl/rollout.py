"""Experience making: prompts -> sampled responses with their log-probabilities and values.

`sample` is our own decoding loop over the KV cache: at each step one backbone call gives the hidden
state of the last token, from which the LM head gives the logits (hence the sampled token's old
log-probability) and the value head gives the old value. No second policy forward is needed.
For an encoder-decoder the encoder reads the prompt once and the decoder steps from
`decoder_start_token_id` with its own cache (`decoding_steps`).

Also the evaluation helpers the pipeline uses: `generate` (seeded sampling of completions) and
`sequence_kl` (mean per-sequence KL of a policy from its reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel, PreTrainedTokenizerBase

from components.config import GenerationConfig
from components.data.dialogue import render_transcript
from components.errors import UserError
from components.rl import distributed
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
from components.rl.core import logprobs_of, response_mask
from components.rl.packing import pack_episodes, packed_hidden


class PromptError(UserError, ValueError):
    """A prompt that cannot be used as given (empty, or too long with prompt_overflow=reject)."""


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> torch.Tensor:
    """All ids that end a completion: the tokenizer's EOS plus the model's generation_config ones."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("the tokenizer has no eos_token; set one so completions can end")
    return torch.tensor(sorted(ids))


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], use_chat_template: bool = False) -> str:
    """The text the policy reads for a prompt. A text prompt is itself, or with `use_chat_template` one user turn of a
    chat; a conversation (a list of messages) is rendered with the chat template, its turns and roles kept, or
    without one as a Human:/Assistant: transcript ending with "Assistant:". The chat template adds the assistant's
    generation prompt."""
    if isinstance(prompt, str) and not use_chat_template:
        return prompt
    if not use_chat_template:
        return render_transcript(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"policy.use_chat_template is true but the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
            f"set policy.use_chat_template=false or use a tokenizer with one"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence, use_chat_template: bool = False) -> list[list[int]]:
    """Each prompt's token ids as the policy reads them (before any limit); a chat template adds its own specials."""
    texts = [render_prompt(tokenizer, prompt, use_chat_template) for prompt in prompts]
    return tokenizer(texts, add_special_tokens=not use_chat_template, padding=False, truncation=False)["input_ids"]


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    generation: GenerationConfig,
    use_chat_template: bool = False,
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (input_ids, attention_mask): left for a causal LM, right for an encoder (whose positions may
    not follow the mask). Prompts (texts or conversations, `render_prompt`) over `generation.max_prompt_tokens` keep
    their END (`prompt_overflow: truncate`; the data preparation, components.data.prompts.fit_prompts, has already shortened
    and counted them by row, this is the engine's own guard) or raise a PromptError naming the prompt index."""
    if len(prompts) == 0:
        raise PromptError("no prompts: the prompt batch is empty")
    limit = generation.max_prompt_tokens
    rows = prompt_ids(tokenizer, prompts, use_chat_template)
    for index, ids in enumerate(rows):
        if len(ids) == 0:
            raise PromptError(f"prompt {index} is empty after tokenization: {prompts[index]!r}")
        if len(ids) > limit:
            if generation.prompt_overflow != "truncate":
                raise PromptError(
                    f"prompt {index} has {len(ids)} tokens, more than generation.max_prompt_tokens={limit} "
                    f"(generation.prompt_overflow={generation.prompt_overflow}); shorten it, raise the limit, or use "
                    "prompt_overflow=truncate"
                )
            rows[index] = ids[-limit:]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, ids in enumerate(rows):
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[index, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, start : start + len(ids)] = 1
    return input_ids, attention_mask


def prompt_padding_side(model: PreTrainedModel) -> str:
    return "right" if is_encoder_decoder(model) else "left"


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
class Rollout:
    """Sampled responses, trimmed to the longest one. Padding (after the first EOS) is 0 in every float."""

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
) -> Rollout:
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
    return Rollout(
        queries=queries,
        query_mask=query_mask,
        responses=responses,
        mask=mask,
        logprobs=torch.stack(logprobs, 1) * mask,
        values=torch.stack(values, 1) * mask if values else None,
        ended_with_eos=ended,
        encoder_decoder=is_encoder_decoder(policy),
    )


def _joined(policy, queries, query_mask, generation, eos_ids, pad_token_id, generator, value_head, rows) -> Rollout:
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

    return Rollout(
        queries=queries, query_mask=query_mask, responses=joined("responses", pad_token_id), mask=joined("mask", 0.0),
        logprobs=joined("logprobs", 0.0), values=joined("values", 0.0),
        ended_with_eos=torch.cat([piece.ended_with_eos for piece in pieces]), encoder_decoder=pieces[0].encoder_decoder,
    )


def kv_cache(model: PreTrainedModel, kind: str, length: int):
    """The causal LM's KV cache for `length` positions (generation.kv_cache): transformers' StaticCache, allocated once
    for the whole sequence, or a DynamicCache grown token by token. `auto`: static on a GPU where the family supports it
    (`_can_compile_fullgraph`: no reallocation per token, and fixed shapes for CUDA graphs and torch.compile), dynamic
    on the CPU, where static measured no faster (0.92x on the demo, 1.03x on GPT-2 6x512: benchmarks/kv_cache.py)."""
    from transformers import StaticCache

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


def decode(
    tokenizer: PreTrainedTokenizerBase, rollout: Rollout
) -> tuple[list[str], list[str]]:
    """(prompt texts, completion texts) such that prompt + completion is the decoded whole sequence
    (for an encoder-decoder, the completion is the decoded response: it does not continue the prompt)."""
    prompts, completions = [], []
    lengths = rollout.lengths.tolist()
    query_rows = [row[mask.bool()].tolist() for row, mask in zip(rollout.queries, rollout.query_mask)]
    response_rows = [row[:n].tolist() for row, n in zip(rollout.responses, lengths)]
    prompt_texts = tokenizer.batch_decode(query_rows, skip_special_tokens=True)
    if rollout.encoder_decoder:
        return prompt_texts, tokenizer.batch_decode(response_rows, skip_special_tokens=True)
    full_texts = tokenizer.batch_decode([q + r for q, r in zip(query_rows, response_rows)], skip_special_tokens=True)
    response_texts = tokenizer.batch_decode(response_rows, skip_special_tokens=True)
    for prompt, full, response in zip(prompt_texts, full_texts, response_texts):
        prompts.append(prompt)
        completions.append(full[len(prompt) :] if full.startswith(prompt) else response)
    return prompts, completions


class Samples(NamedTuple):
    completions: list[str]
    ended_with_eos: list[bool]
    lengths: list[int]
    logprobs: list[float]  # sum of the completion's token log-probabilities (at the sampling temperature)
    prompts_seen: list[str]  # each prompt as the policy read it: rendered, within max_prompt_tokens, specials kept


def generate(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    generation: GenerationConfig,
    seed: int = 0,
    batch_size: int = 64,
    use_chat_template: bool = False,
) -> Samples:
    """Sample one completion per prompt, reproducibly for a given seed (and batch_size)."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    eos_ids, pad = eos_token_ids(tokenizer, policy), pad_id(tokenizer)
    out = Samples([], [], [], [], [])
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            queries, query_mask = tokenize_prompts(
                tokenizer, prompts[start : start + batch_size], generation, use_chat_template, prompt_padding_side(policy)
            )
            rollout = sample(policy, queries.to(policy.device), query_mask.to(policy.device), generation, eos_ids, pad, generator)
            out.completions.extend(decode(tokenizer, rollout)[1])
            out.ended_with_eos.extend(rollout.ended_with_eos.tolist())
            out.lengths.extend(rollout.lengths.tolist())
            out.logprobs.extend(rollout.logprobs.sum(1).tolist())
            out.prompts_seen.extend(tokenizer.batch_decode(
                [row[mask.bool()].tolist() for row, mask in zip(rollout.queries, rollout.query_mask)], skip_special_tokens=False))
    finally:
        policy.train(was_training)
    return out


@torch.inference_mode()
def sequence_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    generation: GenerationConfig,
    ended_with_eos: Sequence[bool] | None = None,
    batch_size: int = 64,
    use_chat_template: bool = False,
) -> float:
    """Mean over sequences of sum_t [log pi(a_t) - log pi_ref(a_t)] on the completions' tokens
    (re-tokenized; an EOS is appended where `ended_with_eos`), at the sampling temperature."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    eos = int(tokenizer.eos_token_id)
    pad = pad_id(tokenizer)
    device = policy.device
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        queries, query_mask = tokenize_prompts(
            tokenizer, prompts[start : start + batch_size], generation, use_chat_template, prompt_padding_side(policy)
        )
        rows = tokenizer(list(completions[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        if ended_with_eos is not None:
            rows = [ids + [eos] if ended else ids for ids, ended in zip(rows, ended_with_eos[start : start + batch_size])]
        width = max(1, max(len(ids) for ids in rows))
        responses = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        for index, ids in enumerate(rows):
            responses[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[index, : len(ids)] = 1
        args = (queries.to(device), query_mask.to(device), responses.to(device), mask.to(device))
        logprobs = response_logprobs(policy, *args, generation.temperature)
        ref_logprobs = response_logprobs(reference, *args, generation.temperature)
        total += float((logprobs - ref_logprobs).sum())
        count += len(rows)
    return total / max(count, 1)
