"""Dataset SPECs (folder, csv, wds, fashion-mnist), templates, and the bad-input paths."""

import gzip
import json

import numpy as np
import pytest
import torch

from clipkit.eval.datasets import build_dataset, parse_spec
from clipkit.eval.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist, read_idx, write_idx
from clipkit.eval.features import extract_features
from clipkit.eval.templates import load_templates
from clipkit.eval.zeroshot import run_zeroshot
from tests.eval_helpers import (
    ColorModel,
    ColorTokenizer,
    bomb_png,
    color_image,
    color_wds_samples,
    png_bytes,
    to_tensor,
    write_color_folder,
    write_fashion_idx,
    write_wds,
)


def batches(ds, bs=4):
    return list(ds.loader(to_tensor, batch_size=bs))


def test_parse_spec():
    assert parse_spec("folder:/a/b") == ("folder", "/a/b", None)
    assert parse_spec("fashion-mnist:/usr/share/x:train") == ("fashion-mnist", "/usr/share/x", "train")
    assert parse_spec("wds:/data/set") == ("wds", "/data/set", None)
    assert parse_spec("wds:rel/dir:val") == ("wds", "rel/dir", "val")
    for bad in ("imagenet", "cifar:/x", "folder:", "/just/a/path"):
        with pytest.raises(ValueError, match="unknown dataset spec"):
            parse_spec(bad)


def test_idx_roundtrip_and_fashion_mnist(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, arr)
        assert (read_idx(tmp_path / name) == arr).all()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\0" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.gz")

    for gz in (True, False):
        root = write_fashion_idx(tmp_path / f"fm{gz}", n_train=30, n_test=20, gz=gz)
        images, labels = load_fashion_mnist(str(root), "train")
        assert images.shape == (30, 28, 28) and labels.tolist() == [i % 10 for i in range(30)]
        ds = build_dataset(f"fashion-mnist:{root}:train")
        assert ds.num_samples == 30 and ds.classnames == list(FASHION_MNIST_CLASSNAMES)
        assert build_dataset(f"fashion-mnist:{root}").num_samples == 20  # default split: test
        img = ds.source.load(3)
        assert img.mode == "RGB" and img.size == (28, 28)
        px = np.asarray(img)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == images[3]).all()  # grey -> RGB
    with pytest.raises(ValueError, match="train' or 'test"):
        build_dataset(f"fashion-mnist:{root}:val")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset(f"fashion-mnist:{tmp_path}")


def test_folder_and_classnames_file(tmp_path):
    root = write_color_folder(tmp_path / "c", per_class=2, misplaced=0)
    ds = build_dataset(f"folder:{root}")
    assert ds.num_samples == 6 and ds.classnames == ["blue", "green", "red"]
    assert sum(len(b.images) for b in batches(ds)) == 6
    names = tmp_path / "names.txt"
    names.write_text("navy\nlime\ncrimson\n")
    assert build_dataset(f"folder:{root}", str(names)).classnames == ["navy", "lime", "crimson"]
    names.write_text("navy\nlime\n")
    with pytest.raises(ValueError, match="do not match"):
        build_dataset(f"folder:{root}", str(names))
    with pytest.raises(FileNotFoundError):
        build_dataset(f"folder:{tmp_path / 'missing'}")


def test_csv_labels_and_captions(tmp_path):
    for i, c in enumerate(["red", "green", "blue", "red"]):
        color_image(c, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "named.csv").write_text("path,label\n0.png,red\n1.png,green\n2.png,blue\n3.png,red\n")
    ds = build_dataset(f"csv:{tmp_path / 'named.csv'}")
    assert ds.classnames == ["blue", "green", "red"] and ds.source.labels == [2, 1, 0, 2]
    (tmp_path / "ids.csv").write_text("path,label\n0.png,0\n1.png,3\n")
    (tmp_path / "classnames.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="label 3 but only 3 class names"):
        build_dataset(f"csv:{tmp_path / 'ids.csv'}")
    (tmp_path / "caps.csv").write_text(
        "path,caption\n0.png,a red square\n1.png,a green square\n0.png,\"red, again\"\n2.png,blue\n")
    ds = build_dataset(f"csv:{tmp_path / 'caps.csv'}")
    assert ds.has_captions and not ds.has_labels
    got = [c for b in batches(ds) for c in b.captions]
    assert got == [["a red square", "red, again"], ["a green square"], ["blue"]]
    (tmp_path / "bad.csv").write_text("file,text\n0.png,x\n")
    with pytest.raises(ValueError, match="'path' column"):
        build_dataset(f"csv:{tmp_path / 'bad.csv'}")


def test_wds_clip_benchmark_layout(tmp_path):
    root = write_wds(tmp_path / "w", color_wds_samples(per_class=3), per_shard=4,
                     classnames=["blue", "green", "red"], templates=["a photo of a {c}.", "{c}"])
    ds = build_dataset(f"wds:{root}")
    assert ds.classnames == ["blue", "green", "red"] and ds.templates == ["a photo of a {c}.", "{c}"]
    assert len(ds.source.shards) == 3
    labels = torch.cat([b.labels for b in batches(ds)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    m = run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, ds, "auto", batch_size=4, workers=2, progress=False)
    assert m["acc1"] == 1.0 and m["n"] == 9
    # captions (retrieval layout): several per image, one per line
    ret = write_wds(tmp_path / "r", [{"png": png_bytes(color_image("red")), "txt": b"red\na red square"}],
                    dataset_type="retrieval")
    ds = build_dataset(f"wds:{ret}:test")
    assert ds.has_captions and not ds.has_labels
    assert batches(ds)[0].captions == [["red", "a red square"]]
    with pytest.raises(ValueError, match="no class labels"):
        run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, ds, "simple", progress=False)
    with pytest.raises(FileNotFoundError, match="no split directory"):
        build_dataset(f"wds:{root}:train")


def test_wds_labels_beyond_classnames(tmp_path):
    root = write_wds(tmp_path / "w", color_wds_samples(per_class=2), classnames=["blue", "green"])
    with pytest.raises(ValueError, match="out of range"):
        run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, build_dataset(f"wds:{root}"), "simple",
                     progress=False)


def test_unreadable_images_are_counted_not_fatal(tmp_path):
    root = write_color_folder(tmp_path / "c", per_class=3, misplaced=0)
    (root / "red" / "page.jpg").write_bytes(b"<html><body>404 not found</body></html>")
    (root / "green" / "bomb.png").write_bytes(bomb_png())
    good = png_bytes(color_image("blue"))
    (root / "blue" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "blue" / "empty.jpg").write_bytes(b"")
    ds = build_dataset(f"folder:{root}")
    m = run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, ds, "simple", batch_size=4, progress=False)
    assert m["n"] == 9 and m["acc1"] == 1.0
    assert m["rejected"] == {"corrupt_image": 1, "empty_image": 1, "not_an_image": 1, "too_many_pixels": 1}


def test_corrupt_wds_shard_is_counted(tmp_path):
    root = write_wds(tmp_path / "w", color_wds_samples(per_class=4), per_shard=6, classnames=["blue", "green", "red"])
    shard = root / "test" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated mid-member
    feats = extract_features(ColorModel(), build_dataset(f"wds:{root}"), to_tensor, batch_size=4, progress=False)
    assert 6 <= len(feats.features) < 12
    assert feats.rejects.as_dict() == {"truncated_tar": 1}


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nan {c} again\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}.", "an {c} again"]
    (tmp_path / "bad.txt").write_text("a photo of a {c}.\na photo of a thing.\n")
    with pytest.raises(ValueError, match="no \\{c\\} placeholder"):
        load_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "brace.txt").write_text("a {c} in {a set}\n")
    with pytest.raises(ValueError, match="not a valid format string"):
        load_templates(str(tmp_path / "brace.txt"))
    (tmp_path / "cupl.json").write_text(json.dumps({"red": ["a red thing"], "blue": ["blue", "a blue sky"]}))
    assert load_templates(str(tmp_path / "cupl.json"))["blue"] == ["blue", "a blue sky"]
    (tmp_path / "list.json").write_text(json.dumps(["{c}", "a {c}"]))
    assert load_templates(str(tmp_path / "list.json")) == ["{c}", "a {c}"]
    with pytest.raises(ValueError, match="not one of"):
        load_templates("imagenet-fancy")
    with pytest.raises(ValueError, match="no templates of its own"):
        load_templates("dataset", None)
    assert load_templates("auto", ["x {c}"]) == ["x {c}"] and len(load_templates("auto", None)) == 80
    root = write_color_folder(tmp_path / "c", per_class=1, misplaced=0)
    with pytest.raises(ValueError, match="lack 1 class"):
        run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, build_dataset(f"folder:{root}"),
                     str(tmp_path / "cupl.json"), progress=False)
