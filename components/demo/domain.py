"""The demo's synthetic world: one-sentence film reviews, generated deterministically.

A review is an opening (the prompt) and a completion. Openings are sentiment-neutral ("The new
thriller was", "I saw this western last night and"); completions carry the sentiment: positive,
negative (including negations such as "not very funny"), neutral, or rude, in one or two parts
("gripping, but the ending was weak."). Completions start with a space and plain concatenation
`prompt + completion` gives the review, exactly as a policy's decoded completion (byte-level
tokens carry their leading space) is appended to its prompt.

Ground truth: `components.demo.gold.gold_score` on `prompt + completion`; positive, polite and
well-formed beats negative, negative beats rude, anything beats malformed text.

Files written by `generate_demo_data(out_dir, seed)`:
- `prompts.jsonl`     {"prompt"}: 2000 openings, the PPO prompts.
- `sft.jsonl`         {"text"}: 6000 full reviews, the instruct model's corpus. Mostly not
                      positive (about 35% gold-positive), so PPO has something to fix.
- `preferences.jsonl` {"prompt", "chosen", "rejected"}: 6000 pairs of completions of one
                      prompt. Simulated annotators prefer the higher gold score, except that
                      LABEL_NOISE = 10% of the pairs are flipped at random; pairs whose gold
                      scores differ by less than MIN_GAP are near-ties annotators would not
                      label, and are not drawn. DEGENERATE_SHARE of the pairs put a normal
                      completion against a degenerate one (a repeated or listed praise word, a
                      truncated, looped, stuttering or garbled completion, or one that stops at
                      once) so the reward model learns not to reward them.

Same seed, same bytes: every draw comes from one `random.Random(seed)` in a fixed order, the
word lists are tuples, and rows are written as JSON with sorted keys and "\\n" newlines.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from components.demo import lexicon as lx
from components.demo.gold import gold_score

DATA_FILES = ("prompts.jsonl", "sft.jsonl", "preferences.jsonl")  # what generate_demo_data writes
NUM_PROMPTS = 2000
NUM_SFT = 6000
NUM_PREFERENCES = 6000
LABEL_NOISE = 0.10
MIN_GAP = 0.4
DEGENERATE_SHARE = 0.35
# Chance of each polarity for each part of a completion; tuned so ~35% of SFT reviews are positive.
POLARITY_WEIGHTS = {"positive": 0.40, "negative": 0.33, "neutral": 0.17, "rude": 0.10}

_SLOTS = {
    "modifier": lx.MODIFIERS, "genre": lx.GENRES, "noun": lx.NOUNS, "aspect": lx.ASPECTS,
    "when": lx.WHEN, "people": lx.PEOPLE, "negative": lx.NEGATIVE_ADJECTIVES,
}


def _fill(template: str, rng: random.Random) -> str:
    # re.sub calls back left to right, so the draws happen in a fixed order.
    return re.sub(r"\{(\w+)\}", lambda match: rng.choice(_SLOTS[match.group(1)]), template)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def opening(rng: random.Random) -> tuple[str, str]:
    """A neutral review opening and its kind: "copula" (takes a predicate) or "clause"."""
    if rng.random() < 0.6:
        return _fill(rng.choice(lx.COPULA_OPENINGS), rng), "copula"
    return _fill(rng.choice(lx.CLAUSE_OPENINGS), rng), "clause"


def _polarity(rng: random.Random) -> str:
    return rng.choices(list(POLARITY_WEIGHTS), weights=list(POLARITY_WEIGHTS.values()))[0]


def predicate(polarity: str, rng: random.Random) -> str:
    """What follows "was": "gripping", "not very funny", "complete garbage"."""
    if polarity == "rude":
        return _fill(rng.choice(lx.RUDE_PREDICATES), rng)
    adjectives = {"positive": lx.POSITIVE_ADJECTIVES, "negative": lx.NEGATIVE_ADJECTIVES, "neutral": lx.NEUTRAL_ADJECTIVES}[polarity]
    first, second = rng.sample(adjectives, 2)
    shape = rng.randrange(5)
    if shape == 0:
        return first
    if shape == 1:
        return f"{rng.choice(lx.INTENSIFIERS)} {first}"
    if shape == 2:
        return f"{first} and {second}"
    if shape == 3:
        return _with_article(f"{first} {rng.choice(lx.EXPERIENCES)}")
    # Negation goes both ways ("never dull" and "never funny"), so that a negator says nothing
    # by itself and a reward model has to read the word it governs.
    if polarity == "positive":
        return f"{rng.choice(lx.NEGATIONS)} {rng.choice(lx.NEGATIVE_ADJECTIVES)}"
    if polarity == "negative":
        return f"{rng.choice(lx.NEGATIONS)} {rng.choice(lx.POSITIVE_ADJECTIVES)}"
    return first


def clause(polarity: str, rng: random.Random) -> str:
    """A whole clause: "it was dull", "I loved the soundtrack"."""
    if rng.random() < 0.5:
        subject = rng.choice(lx.CLAUSE_SUBJECTS)
        return f"{_fill(subject, rng)} {predicate(polarity, rng)}"
    clauses = {"positive": lx.POSITIVE_CLAUSES, "negative": lx.NEGATIVE_CLAUSES, "neutral": lx.NEUTRAL_CLAUSES, "rude": lx.RUDE_CLAUSES}
    return _fill(rng.choice(clauses[polarity]), rng)


def completion(kind: str, rng: random.Random) -> str:
    """A completion for an opening of `kind`, with one or two sentiment-bearing parts."""
    first_polarity = _polarity(rng)
    text = predicate(first_polarity, rng) if kind == "copula" else clause(first_polarity, rng)
    tail = rng.random()
    if tail < 0.15:
        text += rng.choice(lx.CLOSERS)
    elif tail >= 0.55:
        second_polarity = _polarity(rng)
        same_side = (first_polarity == "positive") == (second_polarity == "positive")
        joiner = "and" if same_side else "but"
        if rng.random() < 0.5:
            text += f", {joiner} the {rng.choice(lx.ASPECTS)} was {predicate(second_polarity, rng)}"
        else:
            text += f" {joiner} {clause(second_polarity, rng)}"
    return f" {text}{'!' if rng.random() < 0.1 else '.'}"


def degenerate(text: str, rng: random.Random) -> str:
    """A degenerate completion a reward model might be fooled by: malformed, or saying nothing."""
    kind = rng.randrange(8)
    if kind >= 6:  # (twice as often: the commonest drift under PPO) a glitch: a word stutters ("a a") or punctuation piles up ("fun,." "fun..")
        tokens = text.rstrip(".!").split()
        if rng.random() < 0.5:
            i = rng.randrange(len(tokens))
            return " " + " ".join(tokens[: i + 1] + tokens[i:]) + text[-1]
        return " " + " ".join(tokens) + rng.choice((",.", "..", ".!", ". .", "!.")) + ("" if rng.random() < 0.5 else " " + tokens[-1] + ".")
    if kind == 5:  # stops at once: "The comedy felt." says nothing about the film
        tokens = text.rstrip(".!").split()
        return "".join(" " + token for token in tokens[: rng.randrange(3)]) + "."
    if kind == 0:  # the same praise word (or two) over and over
        chosen = rng.sample(lx.POSITIVE_ADJECTIVES, rng.randint(1, 2))
        return " " + " ".join(chosen[i % len(chosen)] for i in range(rng.randint(4, 9))) + "."
    if kind == 1:  # a salad of praise words
        return " " + " ".join(rng.sample(lx.POSITIVE_ADJECTIVES, rng.randint(3, 6))) + "."
    if kind == 2:  # cut off before the end (as a completion that hits max_new_tokens)
        tokens = text.rstrip(".!").split()
        return "".join(" " + token for token in tokens[: rng.randrange(len(tokens))])
    if kind == 3:  # looped
        return text + text
    tokens = text.rstrip(".!").split()  # garbled: some words replaced by letter mush
    for _ in range(rng.randint(2, 4)):
        tokens[rng.randrange(len(tokens))] = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 8)))
    return " " + " ".join(tokens) + text[-1]


def annotate(prompt: str, first: str, second: str, rng: random.Random) -> dict[str, str] | None:
    """The simulated annotators' label for two completions of one prompt: the one the truth scores higher is chosen,
    except LABEL_NOISE of the time; None for a near-tie (gold scores within MIN_GAP), which they would not label."""
    first_score, second_score = gold_score(prompt + first), gold_score(prompt + second)
    if abs(first_score - second_score) < MIN_GAP:
        return None
    chosen, rejected = (first, second) if first_score > second_score else (second, first)
    if rng.random() < LABEL_NOISE:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def preference_pair(rng: random.Random) -> dict[str, str] | None:
    """One annotated pair of written completions, or None for a near-tie that annotators would not label."""
    prompt, kind = opening(rng)
    first = completion(kind, rng)
    second = degenerate(first if rng.random() < 0.5 else completion(kind, rng), rng) if rng.random() < DEGENERATE_SHARE else completion(kind, rng)
    return annotate(prompt, first, second, rng)


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Rows as JSON lines, keys sorted. Written in place (no temporary file in the DVC-tracked directory): a write cut
    short fails data.dvc's check, and `alignflow demo data` rewrites it."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def generate_demo_data(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write prompts.jsonl, sft.jsonl and preferences.jsonl into `out_dir`; same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = [{"prompt": opening(rng)[0]} for _ in range(NUM_PROMPTS)]
    sft = []
    for _ in range(NUM_SFT):
        prompt, kind = opening(rng)
        sft.append({"text": prompt + completion(kind, rng)})
    preferences: list[dict[str, str]] = []
    while len(preferences) < NUM_PREFERENCES:
        if (pair := preference_pair(rng)) is not None:
            preferences.append(pair)
    files = {"prompts": out_dir / "prompts.jsonl", "sft": out_dir / "sft.jsonl", "preferences": out_dir / "preferences.jsonl"}
    for name, rows in (("prompts", prompts), ("sft", sft), ("preferences", preferences)):
        write_jsonl(files[name], rows)
    return files
