"""Tiny randomly initialised models of each supported family, built from configs and saved locally.

Policies share the word-level tokenizer of tests/tiny.py (T5 and BART with their own special-token
conventions); reward models get a DIFFERENT tokenizer (other ids, [CLS]/[SEP]-style specials), as a
user's reward model would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny import SPECIAL, WORDS, word_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
CHAT_TEMPLATE = "{% for m in messages %}<bos> {{ m['content'] }} <eos>{% endfor %}{% if add_generation_prompt %} I{% endif %}"


def _policy_config(family: str, tokenizer):
    from transformers import (
        BartConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, T5Config,
    )

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "llama":
        return LlamaConfig(**SMALL, num_key_value_heads=1, **ids)
    if family == "qwen2":
        return Qwen2Config(**SMALL, num_key_value_heads=1, **ids)
    if family == "mistral":
        return MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(**SMALL, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0, **ids)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                         max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, **ids)
    if family == "t5":  # FLAN-T5-shaped: gated-gelu, untied head, decoder starts from pad
        return T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                        decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=True, **ids)
    if family == "bart":
        return BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0,
                          attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=tokenizer.eos_token_id,
                          forced_bos_token_id=None, forced_eos_token_id=None, is_encoder_decoder=True, **ids)
    raise ValueError(family)


POLICY_FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt", "mistral", "t5", "bart")
SEQ2SEQ_FAMILIES = ("t5", "bart")


def policy_tokenizer(family: str, chat: bool = False) -> PreTrainedTokenizerFast:
    tokenizer = word_tokenizer()
    if family in SEQ2SEQ_FAMILIES:  # encoder inputs end with EOS, as T5's and BART's tokenizers do
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", tokenizer.eos_token_id)]
        )
        tokenizer.padding_side = "right"
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_policy(path: Path, family: str, seed: int = 0, chat: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    tokenizer = policy_tokenizer(family, chat)
    config = _policy_config(family, tokenizer)
    auto = AutoModelForSeq2SeqLM if family in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# --- reward models ---------------------------------------------------------------------------

REWARD_FAMILIES = ("bert", "roberta", "deberta_v2", "distilbert", "llama", "qwen2")


def reward_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with other ids than the policy's; encoders get [CLS] ... [SEP]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(reversed(WORDS)) + SPECIAL)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    decoder_family = family in ("llama", "qwen2")
    if not decoder_family:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", model_max_length=24)
    if decoder_family:
        tokenizer.eos_token = "[SEP]"  # no pad token: the loader must fall back to EOS
    else:
        tokenizer.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
    return tokenizer


def _reward_config(family: str, tokenizer, num_labels: int):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, LlamaConfig, Qwen2Config, RobertaConfig

    labels = {}
    if num_labels == 2:
        labels = dict(id2label={0: "hate", 1: "nothate"}, label2id={"hate": 0, "nothate": 1})
    common = dict(vocab_size=len(tokenizer), num_labels=num_labels, **labels)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   pad_token_id=tokenizer.pad_token_id, **common)
    if family == "bert":
        return BertConfig(max_position_embeddings=64, **encoder)
    if family == "roberta":  # positions start after the padding index
        return RobertaConfig(max_position_embeddings=64 + tokenizer.pad_token_id + 1, **encoder)
    if family == "deberta_v2":
        return DebertaV2Config(max_position_embeddings=64, relative_attention=True, position_buckets=16,
                               pos_att_type=["p2c", "c2p"], **encoder)
    if family == "distilbert":
        return DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64,
                                pad_token_id=tokenizer.pad_token_id, **common)
    decoder = dict(**SMALL, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **common)
    return (LlamaConfig if family == "llama" else Qwen2Config)(**decoder)


def save_tiny_reward(path: Path, family: str, num_labels: int = 1, seed: int = 1) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = reward_tokenizer(family)
    model = AutoModelForSequenceClassification.from_config(_reward_config(family, tokenizer, num_labels))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
