"""uint8 images from the workers + normalisation on the batch == open_clip's per-image train transform, bit for bit."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipkit.data import build_train_loader
from clipkit.models import create_model
from clipkit.transforms import DeviceNormalize, split_uint8
from tests._shards import make_shards


def images(n=6):
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 40 + 17 * i, 90 - 7 * i
        yield Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("transform", [
    create_model("clipkit-tiny")[2],  # what train/main.py uses for clipkit-tiny (64 px)
    open_clip.image_transform(224, is_train=True),  # ViT-B-32's
    open_clip.image_transform(32, is_train=True, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125)),
], ids=["clipkit-tiny", "224", "custom-stats"])
def test_split_transform_is_bit_identical(transform):
    loader_side, normalize = split_uint8(transform)
    assert isinstance(normalize, DeviceNormalize)
    for i, img in enumerate(images()):
        torch.manual_seed(i)
        want = transform(img)
        torch.manual_seed(i)
        got = loader_side(img)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert torch.equal(normalize(got[None])[0], want), i


def test_loader_batches_match_the_float_path(tmp_path):
    shards = make_shards(str(tmp_path), 2, 9)
    transform = open_clip.image_transform(24, is_train=True)
    loader_side, normalize = split_uint8(transform)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=8)
    make = lambda pre: build_train_loader(shards.spec, pre, tok, batch_size=4, num_workers=2, shuffle_buffer=4)
    floats, uint8s = list(make(transform)), list(make(loader_side))
    assert len(floats) == len(uint8s) == 4
    for a, b in zip(floats, uint8s):
        assert b["image"].dtype == torch.uint8 and a["keys"] == b["keys"]
        assert torch.equal(normalize(b["image"]), a["image"])


def test_other_transforms_are_left_alone():
    no_normalize = T.Compose([T.Resize(8), T.ToTensor()])
    assert split_uint8(no_normalize) == (no_normalize, None)
    plain = lambda img: img  # noqa: E731
    assert split_uint8(plain) == (plain, None)
    with pytest.raises(TypeError, match="uint8"):
        DeviceNormalize((0.5,), (0.5,))(torch.zeros(1, 1, 2, 2))
