"""Epochs split by samples (issue 9.1): unequal shards give every rank and worker an equal share, each item once.

The loader-level tests build every rank's loader in this process (rank and world_size are explicit arguments), so
"every sample once per epoch over 2 ranks x 2 workers" is checked without launching processes; the trainer's padding
of a short rank is tested through train/main.py in tests/reliability/test_uneven_ranks.py.
"""

import collections
import json
import random

import pytest

from clipkit.data import build_train_loader, epoch_pieces, shard_sizes
from clipkit.data.tar_stream import ERROR_KEY, iter_shard
from tests._shards import make_shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Shards of 96, 64 and 32 samples (issue 9's example): 192 samples."""
    d = tmp_path_factory.mktemp("uneven")
    for i, n in enumerate((96, 64, 32)):
        make_shards(str(d), 1, n, seed=i, first_index=i, image_size=16)
    return str(d / "{00000..00002}.tar")


def epoch_batches(spec, preprocess, tokenizer, world_size, workers, batch, epoch=0, split="auto", **kw):
    """rank -> the batches of one epoch of that rank's loader."""
    out = {}
    for rank in range(world_size):
        loader = build_train_loader(spec, preprocess, tokenizer, batch_size=batch, num_workers=workers, seed=0,
                                    rank=rank, world_size=world_size, shuffle_buffer=8, split=split, **kw)
        from clipkit.data import DataPosition
        loader.set_position(DataPosition(epoch=epoch))
        out[rank] = list(loader)
    return out


@pytest.mark.parametrize("epoch", [0, 1])
def test_unequal_shards_split_by_samples_every_key_once(uneven, preprocess, tokenizer, epoch):
    """192 samples over 2 ranks x 2 workers: 48 per worker slot, 6 batches of 8 each, every key exactly once. The
    whole-shard split (the old behaviour) gives the ranks 96+32 and 64 samples: 16 and 8 batches."""
    by_rank = epoch_batches(uneven, preprocess, tokenizer, world_size=2, workers=2, batch=8, epoch=epoch)
    assert [len(b) for b in by_rank.values()] == [12, 12]
    keys = [k for batches in by_rank.values() for b in batches for k in b["keys"]]
    assert len(keys) == 192 and len(set(keys)) == 192
    per_worker = collections.Counter((r, b["worker"]) for r, bs in by_rank.items() for b in bs)
    assert set(per_worker.values()) == {6}

    old = epoch_batches(uneven, preprocess, tokenizer, world_size=2, workers=1, batch=8, epoch=epoch, split="shards")
    assert sorted(len(b) for b in old.values()) == [8, 16]  # what issue 9 found: ranks with unequal data


def test_more_worker_slots_than_shards(tmp_path, preprocess, tokenizer):
    """One shard of 40 samples over 2 ranks x 2 workers (whole-shard split refuses: 1 shard for 4 slots)."""
    shards = make_shards(str(tmp_path), 1, 40, image_size=16)
    by_rank = epoch_batches(shards.spec, preprocess, tokenizer, world_size=2, workers=2, batch=5)
    keys = [k for bs in by_rank.values() for b in bs for k in b["keys"]]
    assert sorted(keys) == sorted(shards.good_keys)
    with pytest.raises(ValueError, match="unknown size cannot be split over 4 worker slots"):
        build_train_loader(shards.spec, preprocess, tokenizer, batch_size=5, num_workers=2, rank=0, world_size=2,
                           split="shards")


def test_iter_shard_start_stop_and_markers(tmp_path):
    """Pieces read exactly their items; a cut tar's marker belongs to the piece holding the sample it replaces."""
    shards = make_shards(str(tmp_path), 1, 10, bad=("corrupt_image", "truncated_tar"), image_size=16)
    whole = list(iter_shard(shards.paths[0]))
    assert whole[-1][ERROR_KEY] == "truncated_tar" and len(whole) == 12  # 10 good + 1 corrupt + marker
    for cut in range(len(whole) + 1):
        head = list(iter_shard(shards.paths[0], 0, cut))
        tail = list(iter_shard(shards.paths[0], cut, None))
        assert [x.get("__key__", x.get(ERROR_KEY)) for x in head + tail] == [
            x.get("__key__", x.get(ERROR_KEY)) for x in whole], cut
        assert all(a == b for a, b in zip(head + tail, whole))
    assert list(iter_shard(str(tmp_path / "missing.tar"), 3, None)) == []  # the marker is the start-0 piece's
    assert list(iter_shard(str(tmp_path / "missing.tar")))[0][ERROR_KEY] == "unreadable_shard"


def test_pieces_cover_every_item_once_even_with_stale_sizes():
    """Random shard sizes, slot counts and epochs; shards holding more items than listed (a stale sizes.json)."""
    rng = random.Random(0)
    for trial in range(500):
        sizes = [rng.choice([0, 1, 2, 5, 16, 40]) for _ in range(rng.randint(1, 6))]
        actual = [n + rng.choice([0, 0, 3]) for n in sizes]
        slots = rng.randint(1, 9)
        shards = [f"s{i}" for i in range(len(sizes))]
        owner = {}
        listed = collections.Counter()
        for slot in range(slots):
            for url, start, stop in epoch_pieces(shards, sizes, 0, trial, slots, slot):
                i = int(url[1:])
                for j in range(start, actual[i] if stop is None else stop):
                    assert (i, j) not in owner
                    owner[i, j] = slot
                    listed[slot] += j < sizes[i]
        assert len(owner) == sum(actual)
        counts = [listed[s] for s in range(slots)]
        assert max(counts) - min(counts) <= 1, (sizes, slots, counts)


def test_sizes_from_sizes_json_stats_or_headers(tmp_path):
    a = make_shards(str(tmp_path / "a"), 2, 7, image_size=16)
    assert shard_sizes(a.spec) == [7, 7]  # tar headers
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"00000.tar": 5}))
    assert shard_sizes(a.spec) == [5, 7]  # sizes.json where it lists the shard
    assert shard_sizes(["https://example.invalid/x.tar"], read_remote=False) == [None]


def test_exact_resume_with_the_sample_split(uneven, preprocess, tokenizer):
    """Breaking off mid-epoch and resuming from the position gives the same remaining batches (rank 1 of 2)."""
    from clipkit.data import DataPosition

    def make(position=None):
        loader = build_train_loader(uneven, preprocess, tokenizer, batch_size=8, num_workers=2, seed=0, rank=1,
                                    world_size=2, shuffle_buffer=8)
        loader.set_position(position or DataPosition(epoch=0))
        return loader

    full = list(make())
    loader = make()
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 5:
            break
    rest = list(make(loader.position))
    assert [b["keys"] for b in first + rest] == [b["keys"] for b in full]
