"""Structured caption negatives (NegCLIP, Yuksekgonul et al. 2023, https://arxiv.org/abs/2210.01936).

A CLIP model can match "a red square and a blue circle" by its bag of words; a negative caption with the same words
in another order, or the attributes on the other objects, can only be told apart by binding. `caption_negatives`
makes N such negatives of one caption, the extra image->text columns of `ContrastiveLoss(text_negatives=...)`.

Rules (words are runs of letters/digits, with inner ' and -; the text between them, punctuation included, stays):
1. Attribute swap between noun phrases: two attribute words of the same kind (colour, number, size) in different
   noun phrases change places: "a red square and a blue circle" -> "a blue square and a red circle". Noun phrases
   are split at the words and, or, with, of, on, in, under, over, above, below, behind, beside, near, next, by, to,
   left, right, at and at commas, except an "and"/"or"/comma right after an attribute word, which joins attributes
   of one phrase: "a black and white photo" is one phrase, so it is never turned into "a white and black photo".
2. Replacement: one colour, number, size or shape word becomes another word of its kind (never a synonym: grey and
   gray are one colour): "a red square" -> "a green square", "two stars" -> "five stars", "a red square" -> "a red
   star". Replacement keeps a capital initial. Shape words are the common geometric ones (circle, square, ...), so
   on the demo's captions it teaches shape as well as colour.
3. Adjacent swap: two neighbouring, different words change places: "a red square" -> "a square red".
4. Shuffle: all words in a random order different from the caption's: "a photo of a coat" -> "coat a of photo a".
5. Fallback, when no rule above can change the caption (one word, or the same word repeated): "no " + caption.

Negative k uses the k-th applicable rule in that order, cycling (N = 2 on "a red square": a replacement, then an
adjacent swap); within a rule the candidate is drawn at random, without repeating an earlier negative while new ones
exist. Every negative differs from the caption. Negatives depend only on (caption, seed, key, n): a loader worker
that rebuilds sample `key` after a resume gets the same negatives, whatever it produced before.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from typing import Callable

WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")

# Kinds of words rules 1 and 2 act on. Each inner tuple is one meaning (synonyms are never swapped for each other).
COLOURS = (
    ("red",), ("green",), ("blue",), ("yellow",), ("purple",), ("orange",), ("black",), ("white",), ("grey", "gray"),
    ("pink",), ("brown",), ("cyan",), ("violet",), ("gold",), ("silver",),
)  # fmt: skip
NUMBERS = (
    ("one",), ("two",), ("three",), ("four",), ("five",), ("six",), ("seven",), ("eight",), ("nine",), ("ten",),
    ("1",), ("2",), ("3",), ("4",), ("5",), ("6",), ("7",), ("8",), ("9",), ("10",),
)  # fmt: skip
SIZES = (("small", "little", "tiny"), ("large", "big", "huge"))
SHAPES = (
    ("circle",), ("square",), ("triangle",), ("cross",), ("star",), ("rectangle",), ("oval",), ("diamond",),
    ("hexagon",), ("pentagon",), ("heart",),
)  # fmt: skip
ATTRIBUTE_KINDS = {"colour": COLOURS, "number": NUMBERS, "size": SIZES}
REPLACEABLE_KINDS = {**ATTRIBUTE_KINDS, "shape": SHAPES}
PHRASE_BREAKS = frozenset(
    "and or with of on in under over above below behind beside near next by to left right at".split()
)
COORDINATORS = frozenset({"and", "or"})


def _kind_table(kinds: dict) -> dict[str, tuple[str, int]]:
    """word -> (kind, meaning index)."""
    return {word: (kind, i) for kind, meanings in kinds.items() for i, words in enumerate(meanings) for word in words}


_REPLACEABLE = _kind_table(REPLACEABLE_KINDS)
_ATTRIBUTES = _kind_table(ATTRIBUTE_KINDS)


def _rng(seed: int, key: str | int, n: int) -> random.Random:
    # A stable digest (Python's hash() of a str changes per process) of exactly what the negatives may depend on.
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{n}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class _Caption:
    """A caption split into words and the text around them, rebuilt with other words in the word slots."""

    def __init__(self, text: str):
        self.text = text
        matches = list(WORD.finditer(text))
        self.words = [m.group() for m in matches]
        bounds = [0, *itertools.chain.from_iterable(m.span() for m in matches), len(text)]
        self.gaps = [text[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]  # len(words) + 1

    def build(self, words: list[str]) -> str:
        return "".join(g + w for g, w in zip(self.gaps, words)) + self.gaps[-1]

    def phrases(self) -> list[int]:
        """The noun-phrase index of every word (rule 1's split)."""
        index, out = 0, []
        for i, word in enumerate(self.words):
            lower = word.lower()
            joins_attributes = i > 0 and self.words[i - 1].lower() in _ATTRIBUTES
            if lower in PHRASE_BREAKS and not (lower in COORDINATORS and joins_attributes):
                index += 1
            elif "," in self.gaps[i] and i > 0 and not joins_attributes:
                index += 1
            out.append(index)
        return out


def _with_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _attribute_swaps(caption: _Caption) -> list[list[str]]:
    phrases, words = caption.phrases(), caption.words
    slots = [(i, _ATTRIBUTES[w.lower()]) for i, w in enumerate(words) if w.lower() in _ATTRIBUTES]
    out = []
    for (i, (kind_i, meaning_i)), (j, (kind_j, meaning_j)) in itertools.combinations(slots, 2):
        if kind_i == kind_j and meaning_i != meaning_j and phrases[i] != phrases[j]:
            swapped = list(words)
            swapped[i], swapped[j] = _with_case(words[j].lower(), words[i]), _with_case(words[i].lower(), words[j])
            out.append(swapped)
    return out


def _replacements(caption: _Caption) -> list[list[str]]:
    out = []
    for i, word in enumerate(caption.words):
        if word.lower() not in _REPLACEABLE:
            continue
        kind, meaning = _REPLACEABLE[word.lower()]
        for other, synonyms in enumerate(REPLACEABLE_KINDS[kind]):
            if other != meaning:
                out.append(caption.words[:i] + [_with_case(synonyms[0], word)] + caption.words[i + 1 :])
    return out


def _adjacent_swaps(caption: _Caption) -> list[list[str]]:
    words, out = caption.words, []
    for i in range(len(words) - 1):
        if words[i] != words[i + 1]:
            out.append(words[:i] + [words[i + 1], words[i]] + words[i + 2 :])
    return out


def _shuffles(caption: _Caption, rng: random.Random, avoid: set[str]) -> list[list[str]] | None:
    """None when no order differs from the caption's; else one random order (a new one when it finds one)."""
    if len(set(caption.words)) < 2:
        return None
    found = None
    for _ in range(20):
        order = rng.sample(caption.words, len(caption.words))
        if order != caption.words:
            found = order
            if caption.build(order) not in avoid:
                break
    return [found] if found is not None else None


_ENUMERATED_RULES: tuple[Callable[[_Caption], list[list[str]]], ...] = (
    _attribute_swaps,
    _replacements,
    _adjacent_swaps,
)


def caption_negatives(caption: str, n: int, seed: int, key: str | int) -> list[str]:
    """n structured negatives of `caption` (rules in the module docstring), each different from it.

    caption: the sample's text; n >= 0; seed: the run's seed; key: the sample's stable identity (its __key__ or
    index). The result depends on nothing else (no global random state), so it is reproducible across workers,
    processes and resumes.
    """
    if n < 0:
        raise ValueError(f"the number of caption negatives must be >= 0, got {n}")
    rng = _rng(seed, key, n)
    parsed = _Caption(caption)
    families = [rule(parsed) for rule in _ENUMERATED_RULES]
    out: list[str] = []
    while len(out) < n:
        applicable = [f for f in families if f]
        shuffled = _shuffles(parsed, rng, set(out))
        candidates_by_rule = applicable + ([shuffled] if shuffled else [])
        if not candidates_by_rule:
            out.append("no " + caption)
            continue
        for candidates in candidates_by_rule:  # one round: each applicable rule once, in order
            if len(out) == n:
                break
            texts = [parsed.build(c) for c in candidates]
            fresh = [t for t in texts if t not in out and t != caption]
            out.append(rng.choice(fresh or [t for t in texts if t != caption]))
    return out
