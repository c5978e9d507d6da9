"""The reward model as a function of text: `RewardScorer(prompts, completions) -> scores (B,)`.

It wraps any `AutoModelForSequenceClassification` with its OWN tokenizer, so it may differ from the
policy's: the trainer decodes completions and the scorer re-tokenizes `prompt + completion`.
The score is the single output, or the logit (or softmax probability, `reward.score`) of the
label chosen by name or index (`reward.label`). For a single-output model, `probability` is its sigmoid.
With `reward.text: completion` the model reads the completion alone (a summary judged on its own).

A completion the policy ended with its EOS is read with the reward tokenizer's EOS after it
(`reward.append_eos`, pass `ended_with_eos`): the model sees that the text is finished, as TRL's and OpenRLHF's
PPO feed their reward model the EOS the policy sampled. Besides telling a finished text from one cut off at
`max_new_tokens`, this gives the stop decision credit of its own: with a critic started from the reward model,
V(s) before the EOS is the reward model's score of the text so far, so a score of the same text without the
EOS leaves stopping an advantage of ~0 (on the demo task: gold share 0.77 -> 0.81, responses 6.4 -> 7.4 tokens).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.config import RewardConfig
from components.data.dialogue import render_transcript
from components.errors import UserError
from components.models.lengths import positions
from components.models.loading import fuse_gelu, load_reward_model, load_tokenizer


class RewardLabelError(UserError, ValueError):
    """`reward.label` does not pick exactly one output of the reward model."""


def resolve_label(model_config, label: str | int | None) -> int:
    """The output index `reward.label` names, checked against the model's outputs."""
    num_labels = int(getattr(model_config, "num_labels", 1))
    id2label = {int(k): str(v) for k, v in (getattr(model_config, "id2label", None) or {}).items()}
    allowed = ", ".join(f"{i}={id2label.get(i, i)!r}" for i in range(num_labels))
    if label is None:
        if num_labels == 1:
            return 0
        raise RewardLabelError(
            f"the reward model has {num_labels} outputs ({allowed}); set reward.label to one of these names or indices"
        )
    if isinstance(label, bool):
        raise RewardLabelError(f"reward.label={label!r} must be a label name or an index; allowed: {allowed}")
    if isinstance(label, int):
        if not 0 <= label < num_labels:
            raise RewardLabelError(f"reward.label={label} is out of range; allowed: {allowed}")
        return label
    by_name = {name: index for index, name in id2label.items() if index < num_labels}
    if label not in by_name:
        raise RewardLabelError(f"reward.label={label!r} is not a label of the reward model; allowed: {allowed}")
    return by_name[label]


def input_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The most tokens the reward model reads: its tokenizer's model_max_length and its positions
    (lengths.positions: RoBERTa-style models start positions after the padding index)."""
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 1_000_000 else []
    table = positions(model.config)
    if table is not None:
        limits.append(table)
    return min(limits) if limits else 1_000_000


def score_completions(reward_fn: Callable, prompts: list[str], completions: list[str], ended_with_eos: list[bool]):
    """`reward_fn(prompts, completions)`, also told which completions ended with the policy's EOS when it has an
    `ended_with_eos` parameter (RewardScorer does) or takes **kwargs. Training and evaluation both score this way."""
    try:
        parameters = inspect.signature(reward_fn).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    if any(p.name == "ended_with_eos" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return reward_fn(prompts, completions, ended_with_eos=ended_with_eos)
    return reward_fn(prompts, completions)


class RewardScorer:
    """Scores `prompt + completion` texts with a sequence-classification reward model.

    Inputs longer than `max_length` tokens (at most the model's own limit) are truncated on the LEFT, keeping the completion, which is
    what is being judged. Batches are padded on the RIGHT whatever the tokenizer's padding side: default
    position ids are then right for decoders (GPT-2 does not derive them from the attention mask) and
    encoders alike. Decoder reward models get a pad token (EOS) if they have none, and the model's
    `pad_token_id` is aligned with the tokenizer's so it finds each row's last real token.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        label: str | int | None = None,
        score: str = "logit",
        max_length: int = 256,
        batch_size: int = 64,
        text: str = "prompt_and_completion",
        append_eos: bool = True,
        conversation_format: str = "auto",
    ):
        if score not in ("logit", "probability"):
            raise ValueError(f"reward.score={score!r}; allowed: 'logit', 'probability'")
        if text not in ("prompt_and_completion", "completion"):
            raise ValueError(f"reward.text={text!r}; allowed: 'prompt_and_completion', 'completion'")
        self.text = text
        self.model = model.eval().requires_grad_(False)
        fuse_gelu(self.model)  # GPT-2's gelu_new as one kernel: the same scores, faster on the CPU
        self.tokenizer = tokenizer
        self.index = resolve_label(model.config, label)
        self.num_labels = int(getattr(model.config, "num_labels", 1))
        self.score = score
        self.max_length = min(max_length, input_limit(model, tokenizer))
        self.batch_size = batch_size
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the reward tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) != tokenizer.pad_token_id:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.truncation_side = "left"
        self.eos_suffix = eos_suffix(tokenizer) if append_eos else ""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if conversation_format == "chat_template" and not has_template:
            raise RewardLabelError(f"reward.conversation_format is chat_template but the reward tokenizer of "
                                   f"{tokenizer.name_or_path!r} has no chat template; use transcript or auto")
        self.chat = conversation_format == "chat_template" or (conversation_format == "auto" and has_template)

    @classmethod
    def from_config(
        cls, reward: RewardConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "RewardScorer":
        """Load `reward.model` (a local path or hub id) in `dtype` (memory.frozen_dtype) unless the model/tokenizer
        are given."""
        model = model if model is not None else load_reward_model(reward.model, reward.revision, allow_pickle=reward.allow_pickle,
                                                                  dtype=dtype)
        if tokenizer is None:
            tokenizer = load_tokenizer(reward.model, reward.revision, padding_side="right")
        return cls(model, tokenizer, reward.label, reward.score, reward.max_length, reward.score_batch_size, reward.text,
                   reward.append_eos, reward.conversation_format)

    def text_of(self, prompt, completion: str) -> tuple[str, bool]:
        """(what the reward model reads for a prompt and completion, whether that text comes from a chat template,
        which brings its own special tokens and end of turn). A conversation prompt is read with the reward
        tokenizer's chat template, or as a Human:/Assistant: transcript (`reward.conversation_format`)."""
        if self.text == "completion":
            return completion, False
        return reward_text(self.tokenizer, prompt, completion, self.chat)

    @torch.inference_mode()
    def __call__(
        self, prompts: Sequence, completions: Sequence[str], ended_with_eos: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """Scores (B,). `ended_with_eos[i]`: completion i ended with the policy's EOS, so (with append_eos) the
        model reads its own EOS after it; None reads every completion as plain text. A prompt is a text or a
        conversation (a list of messages)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if ended_with_eos is not None and len(ended_with_eos) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(ended_with_eos)} ended_with_eos flags")
        read = [self.text_of(p, c) for p, c in zip(prompts, completions)]
        texts = [text + self.eos_suffix if ended_with_eos is not None and ended_with_eos[i] and not templated else text
                 for i, (text, templated) in enumerate(read)]
        templated = [t for _, t in read]
        device = self.model.device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            rows = [
                self.tokenizer(text, add_special_tokens=not chat, truncation=True, max_length=self.max_length)
                for text, chat in zip(texts[start : start + self.batch_size], templated[start : start + self.batch_size])
            ]
            batch = self.tokenizer.pad(rows, padding=True, padding_side="right", return_tensors="pt").to(device)
            logits = self.model(**batch).logits.float()
            if logits.shape[-1] != self.num_labels:
                raise ValueError(f"the reward model returned {logits.shape[-1]} outputs, its config says {self.num_labels}")
            if self.score == "logit":
                scores.append(logits[:, self.index])
            elif self.num_labels == 1:
                scores.append(torch.sigmoid(logits[:, 0]))
            else:
                scores.append(torch.softmax(logits, dim=-1)[:, self.index])
        return torch.cat(scores).cpu() if scores else torch.zeros(0)


def reward_text(tokenizer: PreTrainedTokenizerBase, prompt, completion: str, chat: bool) -> tuple[str, bool]:
    """(the text a reward model reads for a prompt and its completion, whether it comes from the tokenizer's chat
    template, which brings its own special tokens and end of turn). A text prompt is followed by the completion; a
    conversation is rendered with the chat template (`chat`) or as a Human:/Assistant: transcript. Scoring
    (RewardScorer) and reward-model training (components/reward/training.py) read pairs the same way."""
    if isinstance(prompt, str):
        return prompt + completion, False
    if chat:
        answer = [{"role": "assistant", "content": completion.strip()}]
        return tokenizer.apply_chat_template(list(prompt) + answer, tokenize=False), True
    return render_transcript(prompt) + completion, False


def eos_suffix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text that makes the reward tokenizer end a sequence with its EOS token: the token itself, or "" where
    there is none, or where the tokenizer already ends every text with it (T5's </s>, BERT's [SEP]). A reward model
    whose pad token is its EOS takes the appended EOS for padding and scores the text before it."""
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or eos_id is None:
        return ""
    if tokenizer("x")["input_ids"][-1:] == [eos_id]:
        return ""
    if tokenizer("x" + eos)["input_ids"][-1:] != [eos_id]:
        raise ValueError(
            f"reward.append_eos: the reward tokenizer does not read its EOS token {eos!r} in text; "
            f"set reward.append_eos: false"
        )
    return eos
