"""The training data pipeline: determinism, exact mid-epoch resume, each sample once, bad samples, URL safety."""

import json
import os
import time
import warnings

import pytest
import torch
from PIL import ImageFile

from clipkit.data import GOOD_REASONS, REASONS, DataPosition, build_train_loader, count_samples, expand_urls
from clipkit.data.wds import epoch_shard_order
from tests._shards import DEFECTS, make_shards


@pytest.fixture(scope="module")
def shards7(tmp_path_factory):
    """7 shards, so worker slots get unequal shard counts; shard 0 holds bad samples and is cut short."""
    return make_shards(str(tmp_path_factory.mktemp("s7")), 7, 5, bad=("html_image", "bad_caption", "truncated_tar"))


def build(shards, preprocess, tokenizer, **kw):
    # whole-shard split: these tests place shards on workers on purpose (unequal workers, a defect shard last)
    args = dict(batch_size=3, num_workers=2, seed=0, rank=0, world_size=1, shuffle_buffer=6, split="shards")
    args.update(kw)
    return build_train_loader(shards.spec if hasattr(shards, "spec") else shards, preprocess, tokenizer, **args)


def run(loader, last_epoch, limit=None):
    """Batches of consecutive passes until the pass of `last_epoch` has ended, or `limit` batches."""
    out = []
    while True:
        for batch in loader:
            out.append(batch)
            if limit is not None and len(out) == limit:
                return out
        if loader.epoch >= last_epoch:
            return out


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a["keys"] == b["keys"], i
        assert torch.equal(a["image"], b["image"]), i
        assert torch.equal(a["text"], b["text"]), i
        assert (a["worker"], a["consumed"], a["counts"], a["epoch"]) == (
            b["worker"], b["consumed"], b["counts"], b["epoch"]), i


def position_after(batches):
    """Per logical worker, the latest batch; a new epoch starts fresh. Unlike `TrainLoader.position` it knows
    nothing of the workers' end records (what a checkpoint written before they existed holds)."""
    position = DataPosition(epoch=0)
    for batch in batches:
        if batch["epoch"] != position.epoch:
            position = DataPosition(epoch=batch["epoch"])
        position.consumed[batch["worker"]] = batch["consumed"]
        position.counts[batch["worker"]] = batch["counts"]
    return position


def assert_position_agrees(position, batches):
    """`position` (a loader's) holds the latest batch of every worker that has not ended since."""
    from_batches = position_after(batches)
    assert position.epoch == from_batches.epoch
    for w, consumed in from_batches.consumed.items():
        if w not in position.ended:
            assert (position.consumed[w], position.counts[w]) == (consumed, from_batches.counts[w]), w


class JitteryTransform:
    """Sleeps a random 0-5 ms before the real transform, to shake the workers' relative timing."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, image):
        time.sleep(os.urandom(1)[0] / 50000)  # not from the seeded RNGs
        return self.inner(image)


def test_batches_shapes_and_determinism(shards7, preprocess, tokenizer):
    first = run(build(shards7, preprocess, tokenizer), last_epoch=1)
    again = run(build(shards7, JitteryTransform(preprocess), tokenizer), last_epoch=1)
    assert_same_batches(again, first)

    b = first[0]
    assert b["image"].shape == (3, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (3, 16) and b["text"].dtype == torch.long
    assert set(b["counts"]) == set(REASONS)
    assert torch.equal(b["text"], tokenizer([shards7.captions[k] for k in b["keys"]]))
    # epochs differ in order and in augmentation of the same sample
    epoch0 = [b for b in first if b["epoch"] == 0]
    epoch1 = [b for b in first if b["epoch"] == 1]
    assert [b["keys"] for b in epoch0] != [b["keys"] for b in epoch1]
    image_of = {}
    for b in epoch0:
        image_of.update(zip(b["keys"], b["image"]))
    repeated = [(k, im) for b in epoch1 for k, im in zip(b["keys"], b["image"]) if k in image_of]
    same = sum(torch.equal(im, image_of[k]) for k, im in repeated)  # a crop can repeat by chance, not mostly
    assert len(repeated) >= 10 and same <= len(repeated) // 3
    other_seed = run(build(shards7, preprocess, tokenizer, seed=1), last_epoch=0)
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in epoch0]


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (0, 2), (2, 1), (2, 2)])
def test_exact_resume(shards7, preprocess, tokenizer, num_workers, world_size):
    rank = world_size - 1
    make = lambda **kw: build(shards7, preprocess, tokenizer, num_workers=num_workers, world_size=world_size,
                              rank=rank, **kw)
    full = run(make(), last_epoch=1)
    n0 = sum(b["epoch"] == 0 for b in full)
    assert 4 <= n0 < len(full)
    for k in sorted({1, 3, n0 - 1, n0, n0 + 1, len(full) - 2}):
        interrupted = make()
        head = run(interrupted, last_epoch=1, limit=k)
        position = interrupted.position
        assert_position_agrees(position, head)
        saved = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
        assert saved == position
        tail = run(make(position=saved), last_epoch=1)
        assert_same_batches(head + tail, full)
        # a position without end records resumes exactly too (ended workers re-read, then end again)
        tail = run(make(position=position_after(head)), last_epoch=1)
        assert_same_batches(head + tail, full)


def test_resume_when_a_middle_worker_runs_out_first(tmp_path, preprocess, tokenizer):
    """3 workers, one shard each, of 9, 3 and 9 samples: the short worker stops early; resume must skip it right."""
    make_shards(str(tmp_path), 1, 9, seed=1)
    make_shards(str(tmp_path), 1, 3, seed=2, first_index=1)
    make_shards(str(tmp_path), 1, 9, seed=3, first_index=2)
    spec = str(tmp_path / "{00000..00002}.tar")
    small = str(tmp_path / "00001.tar")
    epoch = next(e for e in range(20) if epoch_shard_order(expand_urls(spec), 0, e).index(small) == 1)
    make = lambda **kw: build(spec, preprocess, tokenizer, num_workers=3, shuffle_buffer=0, **kw)
    full = run(make(position=DataPosition(epoch)), last_epoch=epoch)
    assert [b["worker"] for b in full] == [0, 1, 2, 0, 2, 0, 2]
    for k in range(1, len(full)):
        interrupted = make(position=DataPosition(epoch))
        head = run(interrupted, last_epoch=epoch, limit=k)
        assert_same_batches(head, full[:k])
        assert interrupted.position.ended == ([1] if k >= 5 else [])  # worker 1's end record comes before batch 5
        for position in (interrupted.position, position_after(head)):
            tail = run(make(position=position), last_epoch=epoch)
            assert_same_batches(head + tail, full)


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_sample_once_per_epoch(tmp_path, preprocess, tokenizer, world_size):
    even = make_shards(str(tmp_path / "even"), 8, 6)  # 48 samples: every worker slot gets whole batches
    keys = [k for rank in range(world_size) for b in run(build(
        even, preprocess, tokenizer, batch_size=4, rank=rank, world_size=world_size), last_epoch=0) for k in b["keys"]]
    assert sorted(keys) == sorted(even.good_keys)
    uneven = make_shards(str(tmp_path / "uneven"), 5, 5, seed=1)  # partial last batches are dropped
    keys = [k for rank in range(world_size) for b in run(build(
        uneven, preprocess, tokenizer, batch_size=4, rank=rank, world_size=world_size), 0) for k in b["keys"]]
    assert len(keys) == len(set(keys)) and set(keys) <= set(uneven.good_keys) and len(keys) >= 25 - 4 * 2 * world_size


def test_bad_samples_are_skipped_and_counted(tmp_path, preprocess, tokenizer):
    shards = make_shards(str(tmp_path), 2, 4, bad=tuple(DEFECTS))
    want = dict.fromkeys(REASONS, 0)
    want.update(shards.expected)
    assert want["ok"] == 8 and all(want[DEFECTS[d]] == 1 for d in DEFECTS)
    # shard 0 (all defects, cut short) first, then last: its bad samples come after the last batch in the second case
    first = [e for e in range(40) if epoch_shard_order(shards.paths, 0, e)[0] == shards.paths[0]][:1]
    last = [e for e in range(40) if epoch_shard_order(shards.paths, 0, e)[-1] == shards.paths[0]][:1]
    for epoch in first + last:
        loader = build(shards, preprocess, tokenizer, batch_size=1, num_workers=0, shuffle_buffer=0,
                       position=DataPosition(epoch))
        batches = run(loader, last_epoch=epoch)
        assert sorted(k for b in batches for k in b["keys"]) == sorted(shards.good_keys)
        assert loader.position.counts == {0: want} and loader.position.ended == [0], epoch
        assert loader.position.consumed[0] == sum(want.values())  # the truncation marker is one raw item
    assert len(first + last) == 2 and sum(batches[-1]["counts"].values()) < sum(want.values())  # defects came last
    # with shuffling, 2 workers and partial last batches: every sample decodes or is counted exactly once
    loader = build(shards, preprocess, tokenizer, batch_size=3, num_workers=2)
    batches = run(loader, last_epoch=0)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) and set(keys) <= set(shards.good_keys)
    totals = loader.position.totals()
    assert totals["ok"] == len(keys) and totals["ok"] + totals["partial_batch"] == 8 and totals["partial_batch"] > 0
    assert {r: n for r, n in totals.items() if r not in GOOD_REASONS} == {
        r: n for r, n in want.items() if r not in GOOD_REASONS}


def test_bomb_rejected_from_header(tmp_path, preprocess, tokenizer, monkeypatch):
    shards = make_shards(str(tmp_path), 1, 3, bad=("bomb",))
    assert os.path.getsize(shards.paths[0]) < 100_000
    loaded_sizes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loaded_sizes.append(self.size), real_load(self))[1])
    batches = run(build(shards, preprocess, tokenizer, batch_size=1, num_workers=0, shuffle_buffer=0), 0)
    want = dict.fromkeys(REASONS, 0)
    want.update(ok=3, too_many_pixels=1)
    assert len(batches) == 3 and batches[-1]["counts"] == want
    assert loaded_sizes and all(w * h <= 32 * 32 for w, h in loaded_sizes)  # the 20000 x 20000 one never decoded
    # max_pixels applies to ordinary images too
    small = run(build(shards, preprocess, tokenizer, batch_size=1, num_workers=0, max_pixels=32 * 32 - 1), 0)
    assert small == []


def test_url_schemes(shards7, preprocess, tokenizer, tmp_path):
    path = shards7.paths[1]
    for spec in (f"pipe:cat {path}", "s3://bucket/00000.tar", "ftp://host/00000.tar", f"{path}::gs://b/x.tar"):
        with pytest.raises(ValueError, match="allow_unsafe_urls"):
            build_train_loader(spec, preprocess, tokenizer, batch_size=2)
    assert expand_urls("http://example.invalid/{000..002}.tar::https://h/a.tar") == [
        "http://example.invalid/000.tar", "http://example.invalid/001.tar", "http://example.invalid/002.tar",
        "https://h/a.tar"]
    with pytest.raises(ValueError, match="nothing-here"):
        expand_urls(str(tmp_path / "nothing-here" / "*.tar"))
    with pytest.raises(ValueError, match=r"00007.tar. does not exist \(and 92 more\)"):
        expand_urls(os.path.dirname(path) + "/{00005..00099}.tar")
    local = run(build(path, preprocess, tokenizer, num_workers=0, batch_size=2), 0)
    via_file = run(build("file://" + path, preprocess, tokenizer, num_workers=0, batch_size=2), 0)
    via_pipe = run(build(f"pipe:cat {path}", preprocess, tokenizer, num_workers=0, batch_size=2,
                         allow_unsafe_urls=True), 0)
    assert len(local) == 2
    assert_same_batches(via_file, local)
    assert [b["keys"] for b in via_pipe] == [b["keys"] for b in local]


def test_multiple_sources(tmp_path, preprocess, tokenizer):
    a = make_shards(str(tmp_path / "a"), 2, 4)
    b = make_shards(str(tmp_path / "b"), 2, 4, seed=1, first_index=10)
    spec = f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b/*.tar"
    loader = build(spec, preprocess, tokenizer, batch_size=2)
    assert loader.num_shards == 4
    keys = [k for batch in run(loader, 0) for k in batch["keys"]]
    assert sorted(keys) == sorted(a.good_keys + b.good_keys)


def test_resampled(shards7, preprocess, tokenizer):
    make = lambda **kw: build(shards7, preprocess, tokenizer, resampled=True, world_size=4, rank=3,
                              batches_per_epoch=7, **kw)  # 8 slots > 7 shards is fine when resampling
    full = run(make(), last_epoch=1)
    assert [sum(b["epoch"] == e for b in full) for e in (0, 1)] == [7, 7]
    assert_same_batches(run(make(), last_epoch=1), full)
    for k in (3, 7, 8):
        head = full[:k]
        assert_same_batches(head + run(make(position=position_after(head)), last_epoch=1), full)
    keys = [k for b in full for k in b["keys"]]
    assert len(set(keys)) < len(keys)  # drawn with replacement: 42 samples from 2 slots' draws of 5-sample shards
    with pytest.raises(ValueError, match="resampled=True"):
        build(shards7, preprocess, tokenizer, world_size=4)


def test_position_checks_and_json(shards7, preprocess, tokenizer):
    position = DataPosition(epoch=2, consumed={"0": 7, 1: 5}, counts={0: {"ok": 6, "bad_caption": 1}, "1": {"ok": 3}})
    assert position.consumed == {0: 7, 1: 5} and position.counts[1] == {"ok": 3}
    assert DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position
    assert position.next_worker(num_workers=2, batch_size=3) == 1
    loader = build(shards7, preprocess, tokenizer, position=position)
    assert loader.epoch == 2 and loader.position == position
    with pytest.raises(ValueError, match="num_workers"):
        build(shards7, preprocess, tokenizer, num_workers=1, position=position)
    with pytest.raises(ValueError, match="batch_size"):
        build(shards7, preprocess, tokenizer, batch_size=4, position=position)


def test_count_samples(tmp_path):
    shards = make_shards(str(tmp_path), 3, 4)
    assert count_samples(shards.spec) == 12
    with open(tmp_path / "00001_stats.json", "w") as f:
        json.dump({"successes": 40, "count": 50}, f)
    assert count_samples(shards.spec) == 4 + 40 + 4
    with open(tmp_path / "sizes.json", "w") as f:
        json.dump({"00000.tar": 100, "00002.tar": 7}, f)
    assert count_samples(shards.spec) == 100 + 40 + 7


def test_resume_skips_without_decoding(shards7, preprocess, tokenizer, monkeypatch):
    import clipkit.data.wds as wds

    decoded = []
    real_decode = wds.decode_image
    monkeypatch.setattr(wds, "decode_image", lambda data, max_pixels: (decoded.append(1), real_decode(
        data, max_pixels=max_pixels))[1])
    make = lambda **kw: build(shards7, preprocess, tokenizer, num_workers=0, **kw)
    full = run(make(), last_epoch=0)
    full_decodes = len(decoded)
    decoded.clear()
    head = run(make(), last_epoch=0, limit=5)  # num_workers=0 is lazy: nothing is decoded past batch 5
    head_decodes = len(decoded)
    decoded.clear()
    tail = run(make(position=position_after(head)), last_epoch=0)
    assert_same_batches(head + tail, full)
    assert head_decodes >= 15 and len(decoded) == full_decodes - head_decodes


def test_main_process_rngs_untouched(shards7, preprocess, tokenizer):
    import random

    torch.manual_seed(123)
    random.seed(123)
    want = torch.rand(4), random.random()
    torch.manual_seed(123)
    random.seed(123)
    assert run(build(shards7, preprocess, tokenizer, num_workers=0), last_epoch=0)
    got = torch.rand(4), random.random()
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_ended_worker_reads_nothing_on_resume(tmp_path, preprocess, tokenizer):
    shards = make_shards(str(tmp_path), 2, 5)
    loader = build(shards, preprocess, tokenizer, batch_size=2, num_workers=0, shuffle_buffer=0)
    assert len(run(loader, last_epoch=0)) == 5  # 10 samples, 2 per batch: the end record follows the last batch
    position = loader.position
    assert position.ended == [0] and position.totals()["ok"] == 10
    for path in shards.paths:  # a worker that re-read its shards would now find them empty (and warn)
        open(path, "wb").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = build(shards, preprocess, tokenizer, batch_size=2, num_workers=0, position=position)
        assert list(resumed) == [] and resumed.position == position
