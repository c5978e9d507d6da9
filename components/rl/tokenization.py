"""Text and the policy's token ids: prompts rendered and tokenized as the policy reads them, the ids that end a
completion (EOS) and pad it, and sampled responses decoded back to text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import GenerationConfig
from components.data.dialogue import render_transcript
from components.errors import UserError
from components.rl.roles import is_encoder_decoder

if TYPE_CHECKING:
    from components.rl.sampler import Samples


class PromptError(UserError, ValueError):
    """A prompt that cannot be used as given (empty, or too long with prompt_overflow=reject)."""


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> torch.Tensor:
    """All ids that end a completion: the tokenizer's EOS plus the model's generation_config ones. The first is the
    tokenizer's own (where it has one): the EOS a completion's text is re-read with (`sequence_kl`)."""
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
    first = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    return torch.tensor(first + sorted(ids - set(first)))


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


def decode(tokenizer: PreTrainedTokenizerBase, samples: "Samples") -> tuple[list[str], list[str]]:
    """(prompt texts, completion texts) such that prompt + completion is the decoded whole sequence
    (for an encoder-decoder, the completion is the decoded response: it does not continue the prompt)."""
    prompts, completions = [], []
    lengths = samples.lengths.tolist()
    query_rows = [row[mask.bool()].tolist() for row, mask in zip(samples.queries, samples.query_mask)]
    response_rows = [row[:n].tolist() for row, n in zip(samples.responses, lengths)]
    prompt_texts = tokenizer.batch_decode(query_rows, skip_special_tokens=True)
    if samples.encoder_decoder:
        return prompt_texts, tokenizer.batch_decode(response_rows, skip_special_tokens=True)
    full_texts = tokenizer.batch_decode([q + r for q, r in zip(query_rows, response_rows)], skip_special_tokens=True)
    response_texts = tokenizer.batch_decode(response_rows, skip_special_tokens=True)
    for prompt, full, response in zip(prompt_texts, full_texts, response_texts):
        prompts.append(prompt)
        completions.append(full[len(prompt) :] if full.startswith(prompt) else response)
    return prompts, completions
