"""The demo domain's words: the phrases the review generator draws from, and the sentiment lexicon
the gold scorer reads. One module, so the generator and the ground truth cannot drift apart.

Everything is a tuple (never a set) so that drawing from it with a seeded `random.Random` is
reproducible across Python versions and hash seeds.
"""

from __future__ import annotations

import re

# --- Sentiment lexicon (the ground truth reads only these) ------------------------------------

POSITIVE = (
    "great", "wonderful", "superb", "brilliant", "moving", "gripping", "charming", "delightful",
    "excellent", "beautiful", "funny", "clever", "touching", "fantastic", "enjoyable", "memorable",
    "stunning", "lovely", "perfect", "amazing", "good", "nice", "fun", "best", "loved", "enjoyed", "adored",
    "laughed", "recommend",
)
NEGATIVE = (
    "boring", "dull", "awful", "terrible", "weak", "clumsy", "tedious", "bland", "messy",
    "forgettable", "painful", "flat", "poor", "disappointing", "lifeless", "predictable",
    "confusing", "bad", "slow", "worst", "hated", "disliked", "regret", "asleep", "waste",
)
RUDE = (
    "stupid", "idiotic", "moronic", "garbage", "trash", "crap", "damn", "idiots", "morons",
    "sucked", "dumb", "rubbish",
)
# A sentiment word right after one of these (or one word later: "not very good") flips polarity.
NEGATORS = ("not", "never", "hardly", "no")

# --- Prompt openings -----------------------------------------------------------------------
# `{...}` slots are filled from the tuples below. Copula openings ("... was") take a predicate;
# clause openings ("... and") take a whole clause. All openings are sentiment-neutral, so the
# sentiment of a review comes from its completion alone.

COPULA_OPENINGS = (
    "The {modifier} {genre} was",
    "This {modifier} {genre} is",
    "The {genre} I saw {when} was",
    "Honestly, the {modifier} {genre} was",
    "The {aspect} in this {genre} was",
    "The {aspect} of the {modifier} {genre} was",
    "Overall, this {noun} was",
    "To be honest, the {genre} felt",
    "The {noun} we saw {when} was",
    "For me, the {modifier} {noun} was",
    "In my opinion, the {aspect} was",
    "The {modifier} {noun} from that director is",
)
CLAUSE_OPENINGS = (
    "{people} watched the {modifier} {genre} {when} and",
    "I saw this {genre} {when} and",
    "We went to see the {modifier} {genre} and",
    "I finally watched this {noun} and",
    "After the {modifier} {genre} ended, I felt that",
    "I have to say that",
    "My verdict on the {modifier} {genre} is that",
    "{people} rented this {noun} {when} and",
)

GENRES = (
    "thriller", "comedy", "drama", "horror film", "documentary", "western", "musical", "romance",
    "war film", "crime drama", "family film", "mystery", "spy film", "animated film",
    "science fiction film", "period drama", "action film", "fantasy film",
)
MODIFIERS = (
    "new", "latest", "old", "recent", "French", "Korean", "Italian", "British", "indie",
    "low budget", "three hour", "black and white", "silent", "foreign",
)
NOUNS = ("film", "movie", "picture")
ASPECTS = (
    "acting", "plot", "script", "soundtrack", "ending", "dialogue", "pacing", "cast",
    "camera work", "story", "music", "humour", "lead actor", "lead actress", "villain",
    "final act", "editing", "direction", "score", "opening scene",
)
WHEN = (
    "last night", "yesterday", "on Sunday", "at the cinema", "on a plane", "with my kids",
    "with my parents", "twice", "at a festival", "on television", "at home", "this weekend",
)
PEOPLE = ("My friends and I", "My wife and I", "We", "I", "My brother and I", "My whole family")

# --- Completion pieces ---------------------------------------------------------------------

POSITIVE_ADJECTIVES = (
    "great", "wonderful", "superb", "brilliant", "moving", "gripping", "charming", "delightful",
    "excellent", "beautiful", "funny", "clever", "touching", "fantastic", "enjoyable", "memorable",
    "stunning", "lovely", "perfect", "amazing", "good", "nice",
)
NEGATIVE_ADJECTIVES = (
    "boring", "dull", "awful", "terrible", "weak", "clumsy", "tedious", "bland", "messy",
    "forgettable", "painful", "flat", "poor", "disappointing", "lifeless", "predictable",
    "confusing", "bad", "slow",
)
NEUTRAL_ADJECTIVES = (
    "long", "short", "loud", "quiet", "unusual", "different", "ordinary", "average", "strange",
    "simple", "okay", "serious", "dark", "colourful",
)
CLAUSE_SUBJECTS = ("it was", "I found it", "the {aspect} was")
NEGATIONS = ("not", "not very", "never")
INTENSIFIERS = ("really", "very", "truly", "so", "quite", "rather", "pretty")
EXPERIENCES = ("surprise", "experience", "ride", "evening", "watch")
POSITIVE_CLAUSES = (
    "I loved every minute of it", "I loved the {aspect}", "I laughed a lot", "I enjoyed the {aspect}",
    "I would recommend it to anyone", "I adored the {aspect}", "it was the best {noun} this year",
    "we had a lot of fun",
)
NEGATIVE_CLAUSES = (
    "I hated the {aspect}", "I fell asleep halfway through", "I regret buying a ticket",
    "I disliked the {aspect}", "I would not recommend it", "it was a waste of time",
    "it was the worst {noun} this year", "the {aspect} was not memorable",
)
NEUTRAL_CLAUSES = (
    "I have mixed feelings", "it was about what I expected", "I watched it with my family",
    "the {aspect} reminded me of an older {noun}", "I will think about it",
)
RUDE_PREDICATES = (
    "complete garbage", "utter trash", "stupid", "total crap", "idiotic", "dumb and {negative}",
    "a load of rubbish", "moronic", "a damn mess",
)
RUDE_CLAUSES = (
    "the idiots who made it should quit", "it sucked", "it was made by morons",
    "what a load of crap", "the damn thing was stupid", "the {aspect} was garbage",
)
CLOSERS = (" from start to finish", " overall", " in the end", " if you ask me")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (letters and apostrophes), as the gold scorer sees them."""
    return re.findall(r"[a-z']+", text.lower())


def _vocabulary() -> frozenset[str]:
    pieces = (
        POSITIVE + NEGATIVE + RUDE + NEGATORS + COPULA_OPENINGS + CLAUSE_OPENINGS + GENRES + MODIFIERS
        + NOUNS + ASPECTS + WHEN + PEOPLE + POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES
        + CLAUSE_SUBJECTS + NEGATIONS + INTENSIFIERS + EXPERIENCES + POSITIVE_CLAUSES + NEGATIVE_CLAUSES + NEUTRAL_CLAUSES
        + RUDE_PREDICATES + RUDE_CLAUSES + CLOSERS + ("a", "an", "and", "but", "it", "i", "the", "was")
    )
    vocabulary = {word for piece in pieces for word in words(piece.replace("{", " ").replace("}", " "))}
    # Slot names are not words of the domain.
    return frozenset(vocabulary - {"modifier", "genre", "when", "aspect", "noun", "people", "negative"})


VOCABULARY = _vocabulary()
