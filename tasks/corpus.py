"""The built-in corpus: short review sentences generated from templates, offline and reproducibly.

The tiny demo model is pretrained on these sentences, and the demo prompts are their openings
("the movie was", "honestly this phone is"). Sentences are positive, negative or neutral in
about equal parts, so a pretrained model continues a review prompt either way and the sentiment
reward starts near zero with room for PPO to raise it.

``examples/demo_prompts.jsonl`` is ``write_demo_prompts``'s output, committed (a test keeps the
two in step): ``python -c "import rlfleet.tasks.corpus as c; c.write_demo_prompts(PATH)"``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# (subject, is_plural) per domain; the subject is the thing a review sentence talks about.
SUBJECTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "movie": (
        ("movie", False),
        ("film", False),
        ("plot", False),
        ("acting", False),
        ("ending", False),
        ("story", False),
        ("music", False),
        ("actors", True),
    ),
    "product": (
        ("phone", False),
        ("laptop", False),
        ("camera", False),
        ("battery", False),
        ("screen", False),
        ("price", False),
        ("headphones", True),
        ("shoes", True),
    ),
    "food": (
        ("food", False),
        ("pizza", False),
        ("coffee", False),
        ("service", False),
        ("restaurant", False),
        ("burgers", True),
    ),
    "place": (
        ("hotel", False),
        ("room", False),
        ("staff", False),
        ("trip", False),
        ("beds", True),
    ),
    "book": (
        ("book", False),
        ("writing", False),
        ("game", False),
        ("show", False),
    ),
}

DETERMINERS = ("the", "this", "the", "this", "my")
OPENERS = ("", "", "", "honestly", "overall", "i think", "frankly", "personally", "in the end")
INTENSIFIERS = ("", "", "really", "very", "so", "quite", "extremely", "totally")

ADJECTIVES: dict[str, tuple[str, ...]] = {
    "positive": (
        "great",
        "good",
        "amazing",
        "wonderful",
        "excellent",
        "fun",
        "beautiful",
        "lovely",
        "perfect",
        "brilliant",
        "fantastic",
        "nice",
        "awesome",
        "enjoyable",
    ),
    "negative": (
        "bad",
        "terrible",
        "awful",
        "boring",
        "horrible",
        "disappointing",
        "poor",
        "ugly",
        "annoying",
        "sad",
        "dull",
        "weak",
        "stupid",
        "painful",
    ),
    "neutral": (
        "long",
        "short",
        "simple",
        "small",
        "big",
        "new",
        "old",
        "quiet",
        "loud",
        "different",
        "strange",
        "normal",
        "slow",
        "fast",
    ),
}

# Closing clauses; "{noun}" is the subject's domain word ("movie", "phone", ...).
CLOSINGS: dict[str, tuple[str, ...]] = {
    "positive": (
        "i loved it",
        "i really enjoyed it",
        "i would recommend it to anyone",
        "what a great {noun}",
        "it made me happy",
        "i will buy it again",
        "best {noun} in years",
        "thank you so much",
        "i am glad i tried it",
        "a real pleasure",
    ),
    "negative": (
        "i hated it",
        "what a waste of money",
        "i want my money back",
        "worst {noun} ever",
        "i regret it",
        "it made me angry",
        "never again",
        "such a disappointment",
        "i would not recommend it",
        "a total failure",
    ),
    "neutral": (
        "that is all",
        "i saw it last week",
        "i used it for two days",
        "it came in a box",
        "my brother told me about it",
        "i bought it on monday",
        "we went there on friday",
        "it was my first time",
        "it is what it is",
        "nothing more to say",
    ),
}

SENTIMENTS = ("positive", "negative", "neutral")


@dataclass(frozen=True)
class _Subject:
    noun: str
    plural: bool


def _all_subjects() -> list[_Subject]:
    return [_Subject(noun, plural) for subjects in SUBJECTS.values() for noun, plural in subjects]


def _domain_word(subject: _Subject) -> str:
    """The word a closing clause uses for the reviewed thing ("worst phone ever")."""
    return subject.noun if not subject.plural else subject.noun[:-1]


def _verbs(subject: _Subject) -> tuple[str, str]:
    return ("are", "were") if subject.plural else ("is", "was")


def _join_opening(opener: str, determiner: str, subject: _Subject, verb: str) -> str:
    if subject.plural and determiner == "this":
        determiner = "these"
    return " ".join(word for word in (opener, determiner, subject.noun, verb) if word)


def _opening(rng: random.Random, subject: _Subject) -> str:
    """The prompt part of a sentence: opener, determiner, noun, verb ("honestly the film was")."""
    opener, determiner = rng.choice(OPENERS), rng.choice(DETERMINERS)
    return _join_opening(opener, determiner, subject, rng.choice(_verbs(subject)))


def _adjective_phrase(rng: random.Random, adjective: str) -> str:
    return f"{rng.choice(INTENSIFIERS)} {adjective}".strip()


def _continuation(rng: random.Random, subject: _Subject, sentiment: str) -> str:
    """What follows the opening: adjectives, maybe a second one, maybe a closing clause."""
    first, second = rng.sample(ADJECTIVES[sentiment], 2)
    parts = [_adjective_phrase(rng, first)]
    shape = rng.random()
    if shape < 0.3:
        parts.append("and " + second)
    elif shape < 0.4:
        other = rng.choice([s for s in SENTIMENTS if s != sentiment])
        parts.append("but " + rng.choice(ADJECTIVES[other]))
    text = " ".join(parts)
    if rng.random() < 0.6:
        closing = rng.choice(CLOSINGS[sentiment]).format(noun=_domain_word(subject))
        text += ". " + closing
    return text + rng.choice((".", ".", ".", "!"))


def review_sentences(n: int = 6000, seed: int = 0) -> list[str]:
    """``n`` review sentences, the same list for the same ``seed``."""
    rng = random.Random(seed)
    subjects = _all_subjects()
    sentences = []
    for _ in range(n):
        subject = rng.choice(subjects)
        sentiment = rng.choice(SENTIMENTS)
        sentences.append(f"{_opening(rng, subject)} {_continuation(rng, subject, sentiment)}")
    return sentences


def all_openings() -> list[str]:
    """Every distinct review opening the corpus uses, sorted."""
    openings = {
        _join_opening(opener, determiner, subject, verb)
        for opener in OPENERS
        for determiner in DETERMINERS
        for subject in _all_subjects()
        for verb in _verbs(subject)
    }
    return sorted(openings)


def demo_prompts(n: int = 300, seed: int = 1) -> list[str]:
    """``n`` distinct review openings ("the movie was"), the same list for the same ``seed``."""
    openings = all_openings()
    if not 1 <= n <= len(openings):
        raise ValueError(f"n must be between 1 and {len(openings)} (distinct openings), got {n}")
    return random.Random(seed).sample(openings, n)


def write_demo_prompts(path: str | Path, n: int = 300, seed: int = 1) -> Path:
    """Write the demo prompts as JSONL, one ``{"prompt": ...}`` object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": prompt}) for prompt in demo_prompts(n, seed)]
    path.write_text("\n".join(lines) + "\n")
    return path
