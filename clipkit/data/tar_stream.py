"""Raw sample streams from WebDataset tar shards: no decoding, problems become items instead of exceptions.

A shard is read member by member (webdataset's `gopen` opens it, so local paths, file:// and http(s):// work) and
files sharing a key (`000000042.jpg`, `000000042.txt`, `000000042.json`, as img2dataset writes them) are grouped
into one raw sample `{"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}`.

A shard that breaks off (a tar cut mid-member by an interrupted download or a full disk) ends its stream with one
marker item `{"__error__": "truncated_tar"}`; the sample being read when the tar broke is dropped with it. A shard
that cannot be opened at all gives `{"__error__": "unreadable_shard"}`. The markers travel through the shuffle
buffer like samples, so they are counted once per epoch and replayed identically on resume.
"""

import logging
import random
import re
import tarfile
import zlib
from typing import Any, Dict, Iterable, Iterator, Tuple

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

RawSample = Dict[str, Any]
ShardPiece = Tuple[str, int, int | None]  # (url, start, stop): the items of a shard with index in [start, stop)

ERROR_KEY = "__error__"
# webdataset's rule for metadata members (`__meta__`, `__index__/...`) that are not samples
META_MEMBER = re.compile(r"__[^/]*__($|/)")


class _TarBroken(Exception):
    """A tar header is cut short or fails its checksum after the first member (tarfile's stream mode ends silently)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that raises on a cut or garbled header instead of letting tarfile treat it as a clean end."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE:
            raise _TarBroken("truncated_tar", f"tar ends inside or before a header ({len(buf)} of 512 bytes)")
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError as e:
            raise _TarBroken("corrupt_tar", f"invalid tar header: {e}") from e


class _RateLimitedLog:
    """Logs the first few problems of each kind, then every power of ten, so a bad dataset cannot flood the log."""

    def __init__(self, first: int = 5):
        self.first = first
        self.seen: Dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        n = self.seen.get(kind, 0) + 1
        self.seen[kind] = n
        if n <= self.first or str(n).strip("0") == "1":
            log.warning("data: %s (%d so far in this process): %s", kind, n, message)


shard_warnings = _RateLimitedLog()


def unsafe_member_name(name: str) -> bool:
    """An absolute or parent-relative member name (`/etc/x.jpg`, `../x.jpg`): no shard writer makes one; it is how
    tar path-traversal attacks start (CVE-2007-4559). Readers skip such members even though nothing here extracts to
    disk, so a hostile shard cannot inject samples under names a later tool might write out."""
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def iter_shard(url: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Yields the raw samples of one shard, then at most one error marker. Never raises for bad data.

    `start`/`stop`: only the items whose index in the shard's stream (samples and the marker counted alike) is in
    [start, stop); samples before `start` are passed over without reading their data, and reading ends at `stop`.
    A marker's index is that of the sample it replaces (the one being read when the tar broke), or 0 for a shard
    that cannot be opened.
    """
    try:
        stream = gopen(url, "rb")
    except OSError as e:
        if start == 0:
            shard_warnings.warn("unreadable_shard", f"{url}: {e}")
            yield {ERROR_KEY: "unreadable_shard", "__url__": url}
        return
    members = 0
    current = None
    stopped_early = False
    index = -1  # index of `current` in the shard's stream
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo)
        for info in tar:
            members += 1
            if not info.isreg() or META_MEMBER.match(info.name):
                continue  # symlinks and hardlinks included: they are not regular members
            if unsafe_member_name(info.name):
                shard_warnings.warn("unsafe_member", f"{url}: skipped member {info.name!r}")
                continue
            tar.members = []  # stream mode would otherwise keep every TarInfo of the shard
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None:
                continue
            if current is None or prefix != current["__key__"]:
                if current is not None and index >= start:
                    yield current  # complete: a member of the next key has begun
                index += 1
                if stop is not None and index >= stop:
                    current = None
                    stopped_early = True
                    break
                current = {"__key__": prefix, "__url__": url}
            if index >= start:
                data = tar.extractfile(info).read()
                current.setdefault(suffix.lower(), data)  # a duplicated member keeps its first copy
        if current is not None and index >= start:
            yield current
    except (_TarBroken, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = getattr(e, "reason", "truncated_tar") if members else "unreadable_shard"
        at = max(index, 0)  # the marker replaces the sample being read
        if at >= start and (stop is None or at < stop):
            shard_warnings.warn(reason, f"{url}: {e}")
            yield {ERROR_KEY: reason, "__url__": url}
    finally:
        try:
            stream.close()
        except OSError as e:  # a pipe or curl that exited non-zero; the data it gave was already handled
            if not stopped_early:  # a reader that stops mid-shard makes curl fail with a broken pipe
                shard_warnings.warn("shard_close", f"{url}: {e}")


def iter_shards(urls: Iterable[str]) -> Iterator[RawSample]:
    """Concatenates the raw streams of `urls` (any iterable, possibly endless)."""
    for url in urls:
        yield from iter_shard(url)


def iter_pieces(pieces: Iterable["ShardPiece"]) -> Iterator[RawSample]:
    """Concatenates the raw streams of shard pieces: (url, start, stop) as `iter_shard` reads them."""
    for url, start, stop in pieces:
        yield from iter_shard(url, start, stop)


def shuffle_buffer(items: Iterable[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Shuffles a stream through a buffer of `size` items (webdataset's scheme); size <= 1 passes items through.

    The output order depends only on the input order and `rng`, never on timing.
    """
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        out, buffer[k] = buffer[k], item
        yield out
    rng.shuffle(buffer)
    yield from buffer
