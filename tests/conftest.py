"""Fixtures shared by the training-data tests."""

import open_clip
import pytest


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.tokenizer.SimpleTokenizer(context_length=16)


@pytest.fixture(scope="module")
def preprocess():
    # open_clip's real train transform (RandomResizedCrop draws from torch's RNG), small for speed
    return open_clip.image_transform(16, is_train=True)
