"""Training batches from WebDataset shards: deterministic, robust to bad samples, exactly resumable mid-epoch.

Every process has `num_workers` logical workers (1 when num_workers=0); logical worker w of rank r owns the global
slot `s = r * W + w` of `S = world_size * W` slots. Per epoch, slot s reads:
  - epoch mode: `shards[s::S]` of the shard list shuffled by a RNG seeded from (seed, epoch);
  - resampled mode: shards drawn with replacement, forever, by a RNG seeded from (seed, epoch, s).
Its raw samples (undecoded bytes, see `tar_stream`) pass through a shuffle buffer seeded from (seed, epoch, s):
that is the worker's post-shuffle stream. Samples are decoded and batched inside the worker; the image transform
runs under RNGs seeded from (seed, epoch, s, index in the stream), so augmentations do not depend on timing either.

In epoch mode a worker's stream ends with an end record (no image): its final `consumed` and `counts`, so the bad
samples read after its last full batch are counted too, and its dropped partial batch is counted as "partial_batch".
`TrainLoader` folds end records into its position and yields only batches.

Resume: a worker skips `consumed[w]` raw samples of its post-shuffle stream without decoding them (the shards are
re-read and the shuffle buffer replayed, which costs I/O but no image decode) and carries on with `counts[w]`.
A worker whose end record was consumed yields nothing (and reads nothing).
PyTorch's DataLoader hands out items round-robin over physical workers starting at worker 0 and skips workers
whose stream has ended, so physical worker p runs logical worker (first + p) % W, where `first` is the logical
worker whose batch came next in the interrupted pass (see `DataPosition.next_worker`).
"""

import contextlib
import hashlib
import itertools
import json
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from .tar_stream import ERROR_KEY, RawSample, ShardPiece, iter_pieces, iter_shard, shard_warnings, shuffle_buffer
from .urls import expand_urls, shard_sizes

# Every reason a raw sample can be counted under; batch["counts"] always has all of them. "ok": decoded into a batch;
# "partial_batch": decoded, but in a worker's last, incomplete batch of an epoch, which is dropped. The rest are bad.
REASONS = (
    "ok", "partial_batch", "missing_image", "missing_caption", "bad_caption", "empty_image", "not_an_image",
    "corrupt_image", "too_many_pixels", "bad_size", "truncated_tar", "corrupt_tar", "unreadable_shard",
)
GOOD_REASONS = ("ok", "partial_batch")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_MAX_CHARS = 1000
# Characters that change a caption's tokens without changing what it says: NUL (C-string bugs), zero-width
# space/non-joiner/joiner, word joiner and BOMs pasted from web pages. open_clip's tokenizer keeps them as tokens.
INVISIBLE_CHARS = re.compile("[\x00\u200b\u200c\u200d\u2060\ufeff]")


def mix_seed(*parts: Union[int, str]) -> int:
    """A 64-bit seed from ints/strings; stable across processes and runs (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def epoch_shard_order(shards: Sequence[Any], seed: int, epoch: int) -> List[Any]:
    """The epoch's shuffled shard list (the same permutation for any list of the same length)."""
    order = list(shards)
    random.Random(mix_seed("shard_order", seed, epoch)).shuffle(order)
    return order


def epoch_pieces(shards: Sequence[str], sizes: Sequence[int] | None, seed: int, epoch: int, num_slots: int,
                 slot: int) -> List[ShardPiece]:
    """What slot `slot` of `num_slots` reads in epoch mode: (url, start, stop) pieces of the epoch's shard order.

    With `sizes` (samples per shard, in `shards` order), the split is by samples: the epoch's shards, in order, form
    one sequence of N items and slot s reads items [s*N//S, (s+1)*N//S), so every slot gets N/S items (+-1) however
    unequal the shards are. Items past a shard's listed size (a stale sizes.json) belong to the slot holding its last
    listed item, an empty shard to the slot holding its position, so every item is read by exactly one slot.
    Without sizes, slot s reads the whole shards `order[s::S]` (equal only if the shards are).
    """
    order = epoch_shard_order(list(range(len(shards))), seed, epoch)
    if sizes is None:
        return [(shards[i], 0, None) for i in order[slot::num_slots]]
    total = sum(sizes)
    lo, hi = slot * total // num_slots, (slot + 1) * total // num_slots
    pieces: List[ShardPiece] = []
    offset = 0
    for i in order:
        n = sizes[i]
        if n == 0:
            owner = _owner(min(offset, total - 1), total, num_slots) if total else 0
            if owner == slot:
                pieces.append((shards[i], 0, None))
        elif offset < hi and offset + n > lo:
            start, stop = max(lo - offset, 0), min(hi - offset, n)
            pieces.append((shards[i], start, None if offset + n <= hi else stop))
        offset += n
    return pieces


def _owner(position: int, total: int, num_slots: int) -> int:
    """The slot whose range [s*N//S, (s+1)*N//S) holds `position`."""
    slot = position * num_slots // total
    while (slot + 1) * total // num_slots <= position:
        slot += 1
    while slot * total // num_slots > position:
        slot -= 1
    return slot


@dataclass
class DataPosition:
    """Where a pass over the data stands, per logical worker of this rank. JSON-friendly via to_dict/from_dict.

    epoch: the epoch being read.
    consumed: logical worker -> raw samples it pulled from its post-shuffle stream (bad ones included), up to and
        including the last sample of its last batch that was trained on.
    counts: logical worker -> {reason: cumulative count in this epoch} at that same point (see REASONS).
    ended: logical workers whose whole stream was consumed, end record included (epoch mode only).
    Resuming needs the same urls, seed, rank, world_size, num_workers and batch_size.
    """

    epoch: int = 0
    consumed: Dict[int, int] = field(default_factory=dict)
    counts: Dict[int, Dict[str, int]] = field(default_factory=dict)
    ended: List[int] = field(default_factory=list)

    def __post_init__(self):
        # keys come back as strings from JSON
        self.epoch = int(self.epoch)
        self.consumed = {int(w): int(n) for w, n in self.consumed.items()}
        self.counts = {int(w): {str(r): int(n) for r, n in c.items()} for w, c in self.counts.items()}
        self.ended = sorted({int(w) for w in self.ended})

    def advance(self, item: Dict[str, Any]) -> None:
        """Records that `item` (a batch or a worker's end record, from this pass) was consumed."""
        worker = int(item["worker"])
        self.consumed[worker] = int(item["consumed"])
        self.counts[worker] = dict(item["counts"])
        if item.get("end") and worker not in self.ended:
            self.ended = sorted(self.ended + [worker])

    def totals(self) -> Dict[str, int]:
        """Counts by reason, summed over workers."""
        out: Dict[str, int] = {}
        for counts in self.counts.values():
            for reason, n in counts.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def batches(self, num_workers: int, batch_size: int) -> List[int]:
        """Batches each logical worker has produced in this epoch: its "ok" count / batch_size (exact, since a worker
        emits a batch exactly when its ok count reaches a multiple of batch_size)."""
        workers = max(num_workers, 1)
        unknown = sorted((set(self.consumed) | set(self.ended)) - set(range(workers)))
        if unknown:
            raise ValueError(f"DataPosition has workers {unknown} but the loader has {workers} logical workers: "
                             "resume with the same num_workers")
        done = []
        for w in range(workers):
            ok = self.counts.get(w, {}).get("ok", 0)
            if self.consumed.get(w, 0) and w not in self.counts:
                raise ValueError(f"DataPosition.consumed has worker {w} but counts does not; save both")
            if ok % batch_size:
                raise ValueError(f"DataPosition: worker {w} has ok={ok}, not a multiple of batch_size={batch_size}; "
                                 "resume with the same batch_size")
            done.append(ok // batch_size)
        return done

    def next_worker(self, num_workers: int, batch_size: int) -> int:
        """The logical worker whose batch comes next: the one after the last worker that has done the most batches.

        DataLoader's order is rounds 0, 1, ... over workers 0..W-1, each worker in a round while it has items (batches,
        then its end record). A worker with the maximal count m finished round m-1; the next batch is that round's
        next live worker's, or the next round's first one. Workers after the last m-worker that have fewer batches are
        either waiting in round m-1 (they come next), or have only their end record left (it is folded in, not
        yielded) or have ended (they yield nothing on resume), so starting there is exact in all cases. A position is
        only ever taken just after a batch, so end records need not be counted here.
        """
        done = self.batches(num_workers, batch_size)
        last_max = max(w for w, n in enumerate(done) if n == max(done))
        return (last_max + 1) % len(done)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": {str(w): n for w, n in sorted(self.consumed.items())},
            "counts": {str(w): dict(c) for w, c in sorted(self.counts.items())},
            "ended": list(self.ended),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataPosition":
        return cls(epoch=d["epoch"], consumed=dict(d.get("consumed", {})), counts=dict(d.get("counts", {})),
                   ended=list(d.get("ended", [])))

    def copy(self) -> "DataPosition":
        return DataPosition.from_dict(self.to_dict())


def default_stall_samples(batch_size: int) -> int:
    """Raw samples a worker may read in a row without completing a batch before it stalls (see LoaderStalled): far
    past what --max-skip-rate would allow on real data, and reached in seconds on a stream of only bad samples."""
    return max(10_000, 20 * batch_size)


class LoaderStalled(Exception):
    """A loader worker read `stall_samples` raw samples in a row without completing a batch (e.g. shards of captions
    without images in resampled mode, whose stream never ends). `counts`: that worker's counts by reason."""

    def __init__(self, worker: int, rank: int, read: int, counts: Dict[str, int]):
        bad = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()) if v and k not in GOOD_REASONS) or "none"
        super().__init__(f"loader worker {worker} of rank {rank} read {read:,} samples in a row without completing a "
                         f"batch (bad samples by reason: {bad})")
        self.worker, self.rank, self.read, self.counts = worker, rank, read, dict(counts)


class SampleSkipped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def sample_caption(raw: RawSample, max_chars: int = CAPTION_MAX_CHARS) -> str:
    """The caption of a raw sample: `txt`, else `caption`, else the "caption" field of `json`.

    UTF-8 only (invalid bytes -> SampleSkipped("bad_caption")); NULs and zero-width characters removed, whitespace
    stripped, then cut to `max_chars` characters. No or empty caption -> SampleSkipped("missing_caption").
    """
    data = raw.get("txt", raw.get("caption"))
    if data is None and "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:  # includes UnicodeDecodeError
            meta = None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        data = caption if isinstance(caption, str) else None
    if data is None:
        raise SampleSkipped("missing_caption")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleSkipped("bad_caption") from e
    text = INVISIBLE_CHARS.sub("", data).strip()[:max_chars]
    if not text:
        raise SampleSkipped("missing_caption")
    return text


def sample_image_bytes(raw: RawSample) -> bytes:
    for key in IMAGE_KEYS:
        if key in raw:
            return raw[key]
    raise SampleSkipped("missing_image")


@contextlib.contextmanager
def seeded_augmentation(seed: int, restore: bool) -> Iterator[None]:
    """Seeds Python's, NumPy's and torch's CPU RNGs for one sample's transform; CUDA RNGs are not touched.

    restore=True puts the previous states back: needed in the main process (num_workers=0) so the training's own
    RNG streams (dropout, init) stay untouched; skipped in DataLoader workers, where saving NumPy's state alone
    would cost ~150 us per sample.
    """
    if restore:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


@dataclass(frozen=True)
class SampleExtras:
    """What the loader workers make per sample beyond (image, caption), for the recipes of issue 11; each is seeded
    from the sample's augmentation seed, so a resumed worker makes the same ones.

    views: a transform (PIL image -> uint8 [3, H, W]) applied twice with their own seeds: two augmented views of the
        image for SLIP's image-image term (batch["views"]: uint8 [B, 2, 3, H, W]).
    caption_negatives: structured negatives per caption (clipkit.data.caption_negatives; batch["neg_text"]: long
        [B, N, L]), made from the caption itself.
    """

    views: Callable[[Any], torch.Tensor] | None = None
    caption_negatives: int = 0

    def __bool__(self) -> bool:
        return self.views is not None or self.caption_negatives > 0


class WorkerStreams(IterableDataset):
    """The per-logical-worker batch streams of one rank; `set_pass` chooses the epoch and where each worker starts."""

    def __init__(
        self,
        shards: Sequence[str],
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[List[str]], torch.Tensor],
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        resampled: bool,
        shuffle_buffer: int,
        max_pixels: int | None,
        caption_max_chars: int = CAPTION_MAX_CHARS,
        sizes: Sequence[int] | None = None,
        stall_samples: int | None = None,
        extras: SampleExtras | None = None,
    ):
        self.shards = list(shards)
        self.extras = extras or SampleExtras()
        self.stall_samples = stall_samples or default_stall_samples(batch_size)
        self.sizes = list(sizes) if sizes is not None else None
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_logical = max(num_workers, 1)
        self.num_slots = world_size * self.num_logical
        self.seed = seed
        self.rank = rank
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.max_pixels = max_pixels
        self.caption_max_chars = caption_max_chars
        self.set_pass(DataPosition(), first_logical=0)

    def set_pass(self, position: DataPosition, first_logical: int) -> None:
        self.epoch = position.epoch
        self.start_consumed = dict(position.consumed)
        self.start_counts = {w: dict(c) for w, c in position.counts.items()}
        self.start_ended = set(position.ended)
        self.first_logical = first_logical

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return self.logical_worker_batches((self.first_logical + physical) % self.num_logical)

    def _resampled_shards(self, slot: int) -> Iterator[RawSample]:
        rng = random.Random(mix_seed("resample", self.seed, self.epoch, slot))
        barren = 0  # consecutive draws without a single sample: a dataset of only broken shards would spin forever
        while True:
            url = rng.choice(self.shards)
            got_sample = False
            for raw in iter_shard(url):
                got_sample = got_sample or ERROR_KEY not in raw
                yield raw
            barren = 0 if got_sample else barren + 1
            if barren > 10 * len(self.shards) + 10:
                raise RuntimeError(f"resampled loader: {barren} shard draws in a row gave no sample; are all "
                                   f"{len(self.shards)} shards broken or empty? (last: {url})")

    def raw_stream(self, slot: int) -> Iterator[RawSample]:
        """The post-shuffle raw stream of global slot `slot` in this epoch."""
        if self.resampled:
            raw = self._resampled_shards(slot)
        else:
            raw = iter_pieces(epoch_pieces(self.shards, self.sizes, self.seed, self.epoch, self.num_slots, slot))
        rng = random.Random(mix_seed("shuffle_buffer", self.seed, self.epoch, slot))
        return shuffle_buffer(raw, self.shuffle_buffer, rng)

    def decode(self, raw: RawSample, augment_seed: int) -> Tuple[torch.Tensor, str, Dict[str, Any]]:
        """(image tensor, caption, extras) of a raw sample, or SampleSkipped(reason). The caption is checked first:
        cheap. extras: "views" ([2, 3, H, W] uint8) and "negatives" (list of str) as `self.extras` asks."""
        if ERROR_KEY in raw:
            raise SampleSkipped(raw[ERROR_KEY])
        data = sample_image_bytes(raw)
        caption = sample_caption(raw, self.caption_max_chars)
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
        except ImageRejected as e:
            shard_warnings.warn(e.reason, f"{raw.get('__url__')} {raw.get('__key__')}: {e}")
            raise SampleSkipped(e.reason) from e
        restore = get_worker_info() is None
        with seeded_augmentation(augment_seed, restore=restore):
            tensor = self.preprocess(image)
        extras: Dict[str, Any] = {}
        if self.extras.views is not None:
            views = []
            for v in (1, 2):
                with seeded_augmentation(mix_seed("view", augment_seed, v), restore=restore):
                    views.append(self.extras.views(image))
            extras["views"] = torch.stack(views)
        if self.extras.caption_negatives:
            from .caption_negatives import caption_negatives

            extras["negatives"] = caption_negatives(caption, self.extras.caption_negatives, augment_seed,
                                                    raw["__key__"])
        return tensor, caption, extras

    def logical_worker_batches(self, logical: int) -> Iterator[Dict[str, Any]]:
        """Batches of one logical worker, then (epoch mode) its end record: `image` None, `end` True, final counts."""
        if logical in self.start_ended:
            return
        slot = self.rank * self.num_logical + logical
        consumed = self.start_consumed.get(logical, 0)
        counts = dict.fromkeys(REASONS, 0)
        counts.update(self.start_counts.get(logical, {}))
        stream = self.raw_stream(slot)
        # resume: replay the stream up to where the position left off, without decoding anything
        replayed = sum(1 for _ in itertools.islice(stream, consumed))
        if replayed < consumed:  # the shards changed, or one could not be read this time
            warnings.warn(f"resume: worker {logical} of rank {self.rank} was at raw sample {consumed} of epoch "
                          f"{self.epoch}, but its shards now hold only {replayed}; it ends here",
                          stacklevel=2)
        images: List[torch.Tensor] = []
        captions: List[str] = []
        keys: List[str] = []
        extras: List[Dict[str, Any]] = []
        since_batch = 0
        for raw in stream:
            consumed += 1
            since_batch += 1
            if since_batch > self.stall_samples:
                yield {"image": None, "stalled": True, "worker": logical, "consumed": consumed - 1, "counts": counts,
                       "epoch": self.epoch, "read": since_batch - 1}
                return
            try:
                image, caption, extra = self.decode(raw, mix_seed("augment", self.seed, self.epoch, slot, consumed))
            except SampleSkipped as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            counts["ok"] += 1
            images.append(image)
            captions.append(caption)
            keys.append(raw["__key__"])
            extras.append(extra)
            if len(images) == self.batch_size:
                batch = {
                    "image": torch.stack(images),
                    "text": self.tokenizer(captions),
                    "worker": logical,
                    "consumed": consumed,
                    "counts": dict(counts),
                    "keys": keys,
                    "epoch": self.epoch,
                }
                yield self._with_extras(batch, extras)
                images, captions, keys, extras = [], [], [], []
                since_batch = 0
        # epoch mode (resampled streams never end): the last partial batch is dropped, and counted as such
        counts["ok"] -= len(images)
        counts["partial_batch"] += len(images)
        yield {"image": None, "end": True, "worker": logical, "consumed": consumed, "counts": counts,
               "epoch": self.epoch}


    def _with_extras(self, batch: Dict[str, Any], extras: List[Dict[str, Any]]) -> Dict[str, Any]:
        if self.extras.views is not None:
            batch["views"] = torch.stack([e["views"] for e in extras])  # [B, 2, 3, H, W]
        if self.extras.caption_negatives:
            n = self.extras.caption_negatives
            tokens = self.tokenizer([t for e in extras for t in e["negatives"]])
            batch["neg_text"] = tokens.view(len(extras), n, -1)  # [B, N, L]
        return batch


class TrainLoader:
    """Iterating runs one pass: the rest of epoch `loader.epoch` from `loader.position`.

    `loader.position` follows the batches handed out, so breaking out of a pass and iterating again continues
    where it stopped. After a pass has run to its end, the next iteration starts epoch + 1 from scratch.
    `set_position` overrides both (e.g. from a checkpoint).
    """

    def __init__(
        self,
        streams: WorkerStreams,
        *,
        num_workers: int,
        world_size: int,
        position: DataPosition | None,
        batches_per_epoch: int | None,
        pin_memory: bool,
        prefetch_factor: int,
    ):
        self.streams = streams
        self.num_workers = num_workers
        self.world_size = world_size
        self.batch_size = streams.batch_size
        self.batches_per_epoch = batches_per_epoch
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.set_position(position or DataPosition())

    @property
    def num_shards(self) -> int:
        return len(self.streams.shards)

    @property
    def epoch(self) -> int:
        """The epoch of the current pass (or of the next one, before the first pass)."""
        return self._position.epoch

    @property
    def position(self) -> DataPosition:
        """A copy of the position after the last batch handed out."""
        return self._position.copy()

    def set_position(self, position: DataPosition) -> None:
        position = position.copy()
        position.next_worker(self.num_workers, self.batch_size)  # validates against this loader's shape
        self._position = position
        self._pass_complete = False

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self._pass_complete:
            self.set_position(DataPosition(self._position.epoch + 1))
        first = self._position.next_worker(self.num_workers, self.batch_size)
        done = sum(self._position.batches(self.num_workers, self.batch_size))
        cap = self.batches_per_epoch
        if cap is not None and done >= cap:
            self._pass_complete = True
            return
        self.streams.set_pass(self._position, first_logical=first)
        loader = DataLoader(
            self.streams,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
            # DataLoader draws worker base seeds from this instead of the global RNG, which it would advance
            generator=torch.Generator().manual_seed(mix_seed("dataloader", self.streams.seed, self.epoch) >> 1),
            worker_init_fn=_one_thread,
        )
        for batch in loader:
            self._position.advance(batch)
            if batch.get("stalled"):  # its counts are in the position, for the error message
                raise LoaderStalled(batch["worker"], self.streams.rank, batch["read"], batch["counts"])
            if batch.get("end"):
                continue  # a worker's end record: counts only
            yield batch
            done += 1
            if cap is not None and done >= cap:
                break
        self._pass_complete = True


def _one_thread(_worker_id: int) -> None:
    # A worker transforms one image at a time; more intra-op threads would only compete with the training processes.
    torch.set_num_threads(1)


def build_train_loader(
    urls: Union[str, Sequence[str]],
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[List[str]], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    position: DataPosition | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_unsafe_urls: bool = False,
    batches_per_epoch: int | None = None,
    caption_max_chars: int = CAPTION_MAX_CHARS,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    sizes: Sequence[int | None] | None = None,
    split: str = "auto",
    stall_samples: int | None = None,
    extras: SampleExtras | None = None,
) -> TrainLoader:
    """A deterministic, exactly resumable loader of training batches for one rank.

    urls: shard spec(s), sources joined with '::', brace expansion and globs (see `expand_urls`).
    preprocess: PIL RGB image -> float tensor [3, H, W] (e.g. open_clip's train transform).
    tokenizer: list of N captions -> long tensor [N, context_length].
    batch_size: samples per batch of this process. num_workers: DataLoader workers (0 = main process).
    rank, world_size: this process's place; passed explicitly, never read from torch.distributed.
    resampled: draw shards with replacement forever instead of epochs over the shard list.
    shuffle_buffer: raw samples in each worker's shuffle buffer (0 or 1 = no sample shuffle).
    position: where to resume (None = epoch 0 from the start).
    batches_per_epoch: end each pass after this many batches of this process (counted from the epoch's start,
        resumed ones included); required in practice with resampled=True, whose passes never end otherwise.
    sizes: samples per shard (see `clipkit.data.shard_sizes`; counted here when None). Epoch mode splits the epoch by
        samples when every size is known (so unequal shards give every slot an equal share), else by whole shards.
    split: "auto" (as just said), "samples" (sizes required: counted, remote shards included) or "shards".
    stall_samples: a worker that reads this many raw samples in a row without completing a batch makes iteration
        raise LoaderStalled (default max(10,000, 20 x batch_size)): a stream of only bad samples never ends otherwise.
    extras: SampleExtras (SLIP views, caption negatives): extra batch fields "views" and "neg_text".
    Yields dicts: image [B, 3, H, W] float, text [B, L] long, worker (logical id), consumed, counts (see
    DataPosition), keys (list of B sample keys), epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batches_per_epoch is not None and batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
    shards = expand_urls(urls, allow_unsafe_urls=allow_unsafe_urls)
    slots = world_size * max(num_workers, 1)
    if split not in ("auto", "samples", "shards"):
        raise ValueError(f"split must be auto, samples or shards, got {split!r}")
    if split == "shards":
        sizes = None
    elif not resampled and sizes is None:
        sizes = shard_sizes(shards, allow_unsafe_urls=allow_unsafe_urls, read_remote=split == "samples")
    if sizes is not None and len(sizes) != len(shards):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(shards)} shards")
    known = None if resampled or sizes is None or any(n is None for n in sizes) else [int(n) for n in sizes]
    if not resampled and known is None and len(shards) < slots:
        raise ValueError(
            f"{len(shards)} shards of unknown size cannot be split over {slots} worker slots (world_size="
            f"{world_size} x num_workers={max(num_workers, 1)}): add a sizes.json next to them, use more shards, "
            "fewer workers, or resampled=True"
        )
    streams = WorkerStreams(
        shards, preprocess, tokenizer, batch_size=batch_size, num_workers=num_workers, seed=seed, rank=rank,
        world_size=world_size, resampled=resampled, shuffle_buffer=shuffle_buffer, max_pixels=max_pixels,
        caption_max_chars=caption_max_chars, sizes=known, stall_samples=stall_samples, extras=extras,
    )
    return TrainLoader(
        streams, num_workers=num_workers, world_size=world_size, position=position,
        batches_per_epoch=batches_per_epoch, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )
