"""Tiny models built from configs and saved locally, so tests never touch a hub."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a film movie was is and but very quite good great bad awful fine boring "
    "fun plot acting story music ending loved hated it this I we . ,"
).split()
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def gpt2_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> GPT2Config:
    settings = dict(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def save_tiny_lm(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    model = GPT2LMHeadModel(gpt2_config(tokenizer, **overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_reward_model(path: Path, seed: int = 1, num_labels: int = 1, **overrides) -> Path:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = gpt2_config(tokenizer, num_labels=num_labels, **overrides)
    if num_labels == 2:
        config.id2label = {0: "hate", 1: "nothate"}
        config.label2id = {"hate": 0, "nothate": 1}
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
