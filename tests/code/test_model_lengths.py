"""How many tokens a model reads, from its config alone, under each family's name for it."""

from transformers import BartConfig, BloomConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

from components.models.lengths import positions


def test_positions_are_read_under_each_familys_name_and_a_roberta_table_loses_its_padding_offset():
    assert positions(GPT2Config(n_positions=128)) == 128  # n_positions
    assert positions(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert positions(BartConfig(max_position_embeddings=1024)) == 1024
    assert positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # positions start after pad


def test_families_without_a_table_of_positions_have_no_limit():
    assert positions(T5Config()) is None  # relative positions
    assert positions(BloomConfig()) is None  # ALiBi
