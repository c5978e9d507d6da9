"""Conversations in the forms people have them: hh-rlhf transcripts, message lists, preference pairs."""

import gzip
import json

import pytest

from components.config import DataConfig, GenerationConfig
from components.data.prompts import DataError, fit_prompts, load_prompts
from components.data.dialogue import (
    DialogueError, check_messages, drop_oldest_turns, parse_transcript, prompt_of_pair, render_transcript,
)
from components.config import PROJECT_ROOT

HH = PROJECT_ROOT / "tests" / "fixtures" / "hh-rlhf"


def test_an_hh_rlhf_transcript_parses_into_its_turns_and_back():
    text = "\n\nHuman: Hi, can you help?\n\nAssistant: Sure.\n\nHuman: With a poem.\n\nAssistant:"
    messages = parse_transcript(text)
    assert messages == [{"role": "user", "content": "Hi, can you help?"}, {"role": "assistant", "content": "Sure."},
                        {"role": "user", "content": "With a poem."}]  # the empty answer awaited is not a turn
    assert render_transcript(messages) == text
    with pytest.raises(DialogueError, match="does not start with a Human"):
        parse_transcript("Hello there")


def test_the_prompt_of_a_pair_is_their_shared_dialogue_up_to_the_last_assistant_turn():
    shared = "\n\nHuman: Tell me a joke.\n\nAssistant: Why?\n\nHuman: I'm bored.\n\nAssistant:"
    prompt, chosen, rejected = prompt_of_pair(shared + " A cat walks into a bar.", shared + " No.")
    assert (prompt, chosen, rejected) == (shared, " A cat walks into a bar.", " No.")
    # answers that begin alike: the prompt still ends at the last "Assistant:" both share
    prompt, chosen, rejected = prompt_of_pair(shared + " Sure, here goes.", shared + " Sure? No.")
    assert prompt == shared and chosen == " Sure, here goes." and rejected == " Sure? No."
    with pytest.raises(DialogueError, match="the same text"):
        prompt_of_pair(shared + " x", shared + " x")
    with pytest.raises(DialogueError, match='share no "\\\\n\\\\nAssistant:" turn'):
        prompt_of_pair("Hello.", "Goodbye.")


def test_the_hh_rlhf_fixture_gives_every_multi_turn_prompt_exactly_and_counts_the_bad_rows():
    rows = [json.loads(line) for line in gzip.open(HH / "harmless-base" / "test.jsonl.gz", "rt")]
    loaded = load_prompts(DataConfig(source=str(HH), data_dir="harmless-base", split="test", format="implicit"))
    assert loaded.report.total == 20 and loaded.report.kept == 18
    assert loaded.report.not_dialogue == [17, 18]  # identical pair; texts that are no dialogue
    third = loaded.prompts[2]  # a three-turn prompt: two Human turns around an Assistant one, awaiting the answer
    assert [m["role"] for m in third] == ["user", "assistant", "user"]
    assert render_transcript(third) == prompt_of_pair(rows[2]["chosen"], rows[2]["rejected"])[0]
    assert max(sum(m["role"] == "user" for m in p) for p in loaded.prompts) == 4  # 1 to 4 Human turns


def test_whole_dialogues_given_as_prompts_are_refused_naming_the_fix(tmp_path):
    # Pointing data.prompt_field at `chosen` would feed the chosen answer into every prompt.
    with pytest.raises(DataError, match=r"data.prompt_field: 19 of the 19 prompts in column 'chosen' .* end with the "
                                        r"assistant's answer.*set data.format: implicit"):
        load_prompts(DataConfig(source=str(HH / "harmless-base" / "test.jsonl.gz"), prompt_field="chosen", format="dialogue"))
    with pytest.raises(DataError, match="data.prompt_field: .* end with the assistant's answer"):
        load_prompts(DataConfig(source=str(HH / "harmless-base" / "test.jsonl.gz"), prompt_field="chosen", format="text",
                                max_prompt_chars=5000))


def test_message_lists_are_checked_row_by_row(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "narrator", "content": "x"}]}, {"messages": "not a list"}, {"messages": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(DataConfig(source=str(path), format="conversational", prompt_field="messages"))
    assert loaded.prompts == [rows[0]["messages"]]
    assert loaded.report.not_dialogue == [2, 3] and loaded.report.missing == [4]
    with pytest.raises(DialogueError, match="message 1 has role 'narrator'"):
        check_messages(rows[1]["messages"])


def words(prompt) -> int:
    """A stand-in tokenizer for fit_prompts: one token per word of the rendered prompt."""
    return len((prompt if isinstance(prompt, str) else render_transcript(prompt)).split())


def test_prompts_over_the_token_limit_lose_their_oldest_turns_and_are_counted_by_row(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    long = "\n\nHuman: one two three\n\nAssistant: four five\n\nHuman: six seven\n\nAssistant:"
    rows = [{"prompt": "\n\nHuman: short\n\nAssistant:"}, {"prompt": long}, {"prompt": "\n\nHuman: " + "w " * 30 + "\n\nAssistant:"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(DataConfig(source=str(path), format="dialogue"))
    fitted = fit_prompts(loaded, words, GenerationConfig(max_prompt_tokens=6))
    assert fitted.prompts[0] == [{"role": "user", "content": "short"}]
    assert fitted.prompts[1] == [{"role": "user", "content": "six seven"}]  # whole turns dropped, the last one kept
    assert words(fitted.prompts[2]) <= 6 and fitted.prompts[2][0]["content"].endswith("w")  # its start cut
    assert fitted.report.truncated == [2, 3] and fitted.report.as_metrics()["data/truncated_prompt"] == 2
    assert "2 shortened to generation.max_prompt_tokens: rows 2, 3" in fitted.report.summary()

    dropped = fit_prompts(load_prompts(DataConfig(source=str(path), format="dialogue")), words,
                          GenerationConfig(max_prompt_tokens=6, prompt_overflow="drop"))
    assert len(dropped.prompts) == 1 and dropped.report.dropped == [2, 3] and dropped.report.kept == 1
    with pytest.raises(DataError, match=r"row 2: the prompt has 11 tokens, more than generation.max_prompt_tokens=6"):
        fit_prompts(load_prompts(DataConfig(source=str(path), format="dialogue")), words,
                    GenerationConfig(max_prompt_tokens=6, prompt_overflow="reject"))


def test_a_system_message_survives_the_dropping_of_old_turns():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a a a"},
                {"role": "assistant", "content": "b b"}, {"role": "user", "content": "c"}]
    kept = drop_oldest_turns(messages, lambda m: sum(len(x["content"].split()) for x in m) <= 2)
    assert kept == [messages[0], messages[3]]
