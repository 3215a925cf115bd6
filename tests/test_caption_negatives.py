"""Caption negatives: deterministic per (caption, seed, key, n), always different, each rule doing what it says."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from clipkit.data.caption_negatives import COLOURS, SHAPES, caption_negatives
from clipkit.synthetic import CAPTION_TEMPLATES as DEMO_TEMPLATES
from clipkit.synthetic import CLASSES as DEMO_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def _fashion_captions() -> list[str]:
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "examples/fashion_mnist/make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [t.format(v) for t in module.CAPTION_TEMPLATES for names in module.NAME_VARIANTS.values() for v in names]


DEMO_CAPTIONS = [t.format(c=cls.split()[0], s=cls.split()[1]) for t in DEMO_TEMPLATES for cls in DEMO_CLASSES]
FASHION_CAPTIONS = _fashion_captions()
COLOUR_WORDS = {w for meaning in COLOURS for w in meaning}
SHAPE_WORDS = {w for meaning in SHAPES for w in meaning}


def test_negatives_depend_only_on_caption_seed_key_and_n():
    first = caption_negatives("a red square and a blue circle", 4, seed=3, key="s000017")
    random.seed(123)  # the global random state plays no part
    assert caption_negatives("a red square and a blue circle", 4, seed=3, key="s000017") == first
    by_key = {tuple(caption_negatives("a red square and a blue circle", 4, seed=3, key=k)) for k in range(20)}
    by_seed = {tuple(caption_negatives("a red square and a blue circle", 4, seed=s, key="s1")) for s in range(20)}
    assert len(by_key) > 1 and len(by_seed) > 1  # the seed and the key do reach the choice
    assert caption_negatives("a red square", 0, seed=0, key=0) == []
    with pytest.raises(ValueError, match=">= 0"):
        caption_negatives("a red square", -1, seed=0, key=0)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_negative_differs_from_its_caption_on_the_demo_and_fashion_mnist(n):
    captions = DEMO_CAPTIONS + FASHION_CAPTIONS
    assert len(captions) > 300
    for i, caption in enumerate(captions):
        negatives = caption_negatives(caption, n, seed=0, key=i)
        assert len(negatives) == n and caption not in negatives, caption


def test_attribute_swap_between_noun_phrases():
    # The first negative uses the first rule that applies: here the only possible swap.
    for key in range(10):
        negatives = caption_negatives("a red square and a blue circle", 3, seed=0, key=key)
        assert negatives[0] == "a blue square and a red circle"
    assert caption_negatives("Two stars next to one circle", 1, seed=0, key=0) == ["One stars next to two circle"]
    # Coordinated attributes of ONE phrase are not swapped: "black and white" stays (only replaced or reordered).
    for key in range(50):
        for negative in caption_negatives("a black and white photo of a coat.", 4, seed=0, key=key):
            assert not negative.startswith("a white and black photo")


def test_replacement_of_colour_and_shape_words_on_demo_captions():
    changed = set()
    for key in range(200):
        negative = caption_negatives("a red square", 1, seed=1, key=key)[0]
        article, colour, shape = negative.split()
        assert article == "a" and colour in COLOUR_WORDS and shape in SHAPE_WORDS
        assert (colour == "red") != (shape == "square")  # exactly one of the two replaced
        changed.add("colour" if colour != "red" else "shape")
    assert changed == {"colour", "shape"}
    assert caption_negatives("A Red square", 1, seed=0, key=5)[0].split()[1][0].isupper()  # case kept
    assert caption_negatives("a grey star", 1, seed=0, key=0)[0] != "a gray star"  # synonyms are one colour


def test_adjacent_swap_and_shuffle_keep_the_words_and_the_punctuation():
    negatives = caption_negatives("a photo of a coat.", 3, seed=0, key=0)
    # No attribute or shape word: rule 3 (adjacent swap) then rule 4 (shuffle), cycling.
    swaps = {"photo a of a coat.", "a of photo a coat.", "a photo a of coat.", "a photo of coat a."}
    assert negatives[0] in swaps and negatives[2] in swaps
    for negative in negatives:
        assert negative.endswith(".") and sorted(negative[:-1].split()) == sorted("a photo of a coat".split())
    demo = caption_negatives("a picture of a blue star", 3, seed=0, key=0)
    assert demo[1] in {"picture a of a blue star", "a of picture a blue star", "a picture a of blue star",
                       "a picture of blue a star", "a picture of a star blue"}  # fmt: skip
    assert sorted(demo[2].split()) == sorted("a picture of a blue star".split())


def test_captions_no_rule_can_change_fall_back_to_negation():
    assert caption_negatives("dress", 2, seed=0, key=0) == ["no dress", "no dress"]
    assert caption_negatives("bag bag", 1, seed=0, key=0) == ["no bag bag"]
    assert caption_negatives("ankle boot", 1, seed=0, key=0) == ["boot ankle"]
