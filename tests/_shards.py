"""Tiny synthetic WebDataset shards for tests, in img2dataset's layout (NNNNNNNNN.jpg / .txt / .json).

`make_shards(dir, n_shards, per_shard, bad=(...))` writes `per_shard` good samples into every shard and, when
asked, one sample of each defect kind into shard 0 (after its first good sample), so the good samples are always
exactly n_shards * per_shard and each defect is expected to be counted exactly once per epoch.
"""

import functools
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

# Defect kind -> the reason the loader counts it under.
DEFECTS = {
    "corrupt_image": "corrupt_image",  # a JPEG cut inside its scan data
    "empty_image": "empty_image",  # 0-byte .jpg
    "html_image": "not_an_image",  # an HTML error page saved as .jpg
    "missing_caption": "missing_caption",  # no .txt (and no caption in .json)
    "bad_caption": "bad_caption",  # .txt that is not UTF-8
    "missing_image": "missing_image",  # .txt and .json only
    "bomb": "too_many_pixels",  # PNG whose header says 20000 x 20000, a few KB of zlib data
    "truncated_tar": "truncated_tar",  # shard 0 is cut in the middle of an extra last member
}


@dataclass
class ShardSet:
    paths: List[str]
    spec: str  # brace-expansion spec matching exactly `paths`
    good_keys: List[str]  # keys of the samples that decode, in write order
    captions: Dict[str, str]  # key -> caption of every good sample
    expected: Dict[str, int] = field(default_factory=dict)  # reason -> count per epoch ("ok" included)


def jpeg_bytes(rng: np.random.Generator, size: int) -> bytes:
    # smooth random colours (upsampled 4x4 noise) compress to a few hundred bytes, unlike pixel noise
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 MP for 20000) that is a few KB: rows of zeros compress ~1000:1."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_chunk = 1000
    chunks = [comp.compress(row * rows_per_chunk) for _ in range(side // rows_per_chunk)]
    chunks.append(comp.compress(row * (side % rows_per_chunk)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(chunks)) + _png_chunk(
        b"IEND", b"")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    return info


def _sample_members(key: str, kind: str, rng: np.random.Generator, image_size: int) -> List[tuple]:
    caption = f"a synthetic photo number {key}"
    meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
    good_jpg = jpeg_bytes(rng, image_size)
    members = {
        "good": [("jpg", good_jpg), ("txt", caption.encode()), ("json", meta)],
        "corrupt_image": [("jpg", good_jpg[:-40]), ("txt", caption.encode())],
        "empty_image": [("jpg", b""), ("txt", caption.encode())],
        "html_image": [("jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>"), ("txt", b"x")],
        "missing_caption": [("jpg", good_jpg), ("json", json.dumps({"key": key}).encode())],
        "bad_caption": [("jpg", good_jpg), ("txt", b"caf\xe9 \xff\xfe")],
        "missing_image": [("txt", caption.encode()), ("json", meta)],
        "bomb": [("png", bomb_png()), ("txt", caption.encode())],
    }[kind]
    return [(f"{key}.{ext}", data) for ext, data in members]


def make_shards(
    directory: str,
    n_shards: int,
    per_shard: int,
    image_size: int = 32,
    seed: int = 0,
    bad: Sequence[str] = (),
    first_index: int = 0,
) -> ShardSet:
    """Writes shards `{first_index:05d}.tar`, ... into `directory`. `bad`: defect kinds from DEFECTS (shard 0)."""
    unknown = set(bad) - set(DEFECTS)
    if unknown:
        raise ValueError(f"unknown defect kinds {sorted(unknown)}; known: {sorted(DEFECTS)}")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, good_keys, captions = [], [], {}
    for s in range(n_shards):
        index = first_index + s
        kinds = ["good"] * per_shard
        if s == 0:
            kinds[1:1] = [k for k in bad if k != "truncated_tar"]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, kind in enumerate(kinds):
                key = f"{index:05d}{i:04d}"
                for name, data in _sample_members(key, kind, rng, image_size):
                    _add(tar, name, data)
                if kind == "good":
                    good_keys.append(key)
                    captions[key] = f"a synthetic photo number {key}"
            if s == 0 and "truncated_tar" in bad:
                header_at = buf.tell()  # USTAR with a short name: one 512-byte header, then the data
                last = _add(tar, f"{index:05d}{len(kinds):04d}.jpg", jpeg_bytes(rng, image_size))
                cut = header_at + tarfile.BLOCKSIZE + last.size // 2
        data = buf.getvalue()
        if s == 0 and "truncated_tar" in bad:
            data = data[:cut]
        path = os.path.join(directory, f"{index:05d}.tar")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    spec = os.path.join(directory, f"{{{first_index:05d}..{first_index + n_shards - 1:05d}}}.tar")
    if n_shards == 1:
        spec = paths[0]
    expected = {"ok": len(good_keys)}
    for kind in bad:
        expected[DEFECTS[kind]] = expected.get(DEFECTS[kind], 0) + 1
    return ShardSet(paths=paths, spec=spec, good_keys=good_keys, captions=captions, expected=expected)
