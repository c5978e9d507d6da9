"""Conversations as data: Human/Assistant transcripts, message lists, and the prompt of a preference pair.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}` (the chat-template
form transformers and TRL use). Anthropic's hh-rlhf writes the same as a transcript:

    "\\n\\nHuman: Hi, can you help me?\\n\\nAssistant: Sure, with what?\\n\\nHuman: ..."

and a preference pair as two whole transcripts, `chosen` and `rejected`, that share everything up to the last
"\\n\\nAssistant:" and differ in the answer after it: the shared part is the prompt.
"""

from __future__ import annotations

import re
from typing import Any

Message = dict[str, str]
Conversation = list[Message]

SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}
ROLES = {role: speaker for speaker, role in SPEAKERS.items()}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|System):")
ASSISTANT_CUE = "\n\nAssistant:"


class DialogueError(ValueError):
    """A text or message list that is not a conversation; the message says what is wrong with it."""


def parse_transcript(text: str) -> Conversation:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}].
    A transcript that ends with an empty Assistant turn (a prompt awaiting the answer) keeps that turn out."""
    marks = list(_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise DialogueError("does not start with a Human:, Assistant: or System: turn")
    messages = []
    for mark, following in zip(marks, marks[1:] + [None]):
        content = text[mark.end() : following.start() if following else len(text)].strip()
        messages.append({"role": SPEAKERS[mark.group(1)], "content": content})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def render_transcript(messages: Conversation, cue_answer: bool = True) -> str:
    """The hh-rlhf text of a conversation; with `cue_answer`, followed by "\\n\\nAssistant:" for the answer to come."""
    text = "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages)
    return text + ASSISTANT_CUE if cue_answer else text


def check_messages(value: Any) -> Conversation:
    """A message list as the chat-template form has it, or DialogueError saying what is wrong."""
    if not isinstance(value, list) or not value:
        raise DialogueError(f"is not a non-empty list of messages (got {type(value).__name__})")
    messages = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DialogueError(f"message {index} is not {{'role': ..., 'content': text}}")
        if message.get("role") not in ROLES:
            raise DialogueError(f"message {index} has role {message.get('role')!r}; allowed: {', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def ends_with_answer(messages: Conversation) -> bool:
    """True for a conversation whose last turn is the assistant's answer: a whole dialogue, not a prompt."""
    return bool(messages) and messages[-1]["role"] == "assistant" and bool(messages[-1]["content"].strip())


def prompt_of_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two whole transcripts: the prompt is their shared part up to and
    including its last "\\n\\nAssistant:"; each answer is what follows. DialogueError when they share no such turn."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if chosen == rejected:
        raise DialogueError("chosen and rejected are the same text")
    cut = chosen.rfind(ASSISTANT_CUE, 0, shared)  # the last cue lying wholly inside the shared part
    if cut < 0:
        raise DialogueError('chosen and rejected share no "\\n\\nAssistant:" turn to answer')
    end = cut + len(ASSISTANT_CUE)
    return chosen[:end], chosen[end:], rejected[end:]


def drop_oldest_turns(messages: Conversation, fits) -> Conversation | None:
    """The conversation without its oldest turns (a system message kept), shortened until `fits(messages)`; it always
    keeps the last turn, whole. None when even that does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    for start in range(len(turns)):
        # start at a user turn, so the kept part reads as a dialogue
        if turns[start]["role"] != "user" and start != len(turns) - 1:
            continue
        candidate = system + turns[start:]
        if fits(candidate):
            return candidate
    return None
