"""Reading input shards member by member, keeping every member's name and bytes, so kept samples can be written
back unchanged (the training loader's reader, clipkit.data.tar_stream, groups members but does not keep names).

Members are grouped by key as webdataset groups them (`base_plus_ext`: `dir/000042.jpg` -> `dir/000042`, `jpg`);
links, metadata members (`__meta__`) and unsafe names (`/abs`, `../x`) are skipped, as the loader skips them.
"""

import hashlib
import json
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, List, Tuple

from webdataset.tariterators import base_plus_ext

from clipkit.data.tar_stream import META_MEMBER, unsafe_member_name

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarSample:
    key: str
    members: List[Tuple[str, bytes]]  # (member name, bytes) in tar order

    def member(self, *exts: str) -> bytes | None:
        """The first member whose extension (lower-cased) is one of `exts`."""
        for name, data in self.members:
            if base_plus_ext(name)[1].lower() in exts:
                return data
        return None

    @property
    def image(self) -> bytes | None:
        return self.member(*IMAGE_EXTS)

    @property
    def caption(self) -> str | None:
        """The .txt member (UTF-8, undecodable bytes replaced), else the json's "caption"."""
        text = self.member("txt")
        if text is not None:
            return text.decode("utf-8", "replace").strip()
        meta = self.member("json")
        if meta is not None:
            try:
                caption = json.loads(meta).get("caption")
            except (ValueError, AttributeError):
                return None
            return caption.strip() if isinstance(caption, str) else None
        return None


class HashingReader:
    """A file object that hashes (sha256) what is read through it."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Reads what is left (tar padding) and returns the sha256 of the whole file."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def iter_samples(file: BinaryIO) -> Iterator[TarSample]:
    """Samples of one tar in order. Raises tarfile.TarError / EOFError for a broken tar (the caller names the
    shard): a filtered copy of a shard that cannot be read to its end would silently lose its tail."""
    current: TarSample | None = None
    with tarfile.open(fileobj=file, mode="r|") as tar:
        for info in tar:
            tar.members = []  # stream mode would keep every TarInfo of the shard
            if not info.isreg() or META_MEMBER.match(info.name) or unsafe_member_name(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = TarSample(key, [])
            current.members.append((info.name, tar.extractfile(info).read()))
    if current is not None:
        yield current


def shard_digest(path: str) -> str:
    """sha256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
