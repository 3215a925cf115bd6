"""Shard specs -> shard URLs, and sample counts without decoding.

A spec is one or more sources joined with '::'; each source may use brace expansion (`data/{00000..00099}.tar`)
and, for local files, glob patterns (`other/*.tar`). Only local paths, file:// and http(s):// are accepted by
default: webdataset's `pipe:` scheme runs a shell command, so a spec from an untrusted config could run anything.
"""

import glob
import json
import os
import re
import tarfile
from typing import Dict, List, Sequence, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .tar_stream import META_MEMBER

SAFE_SCHEMES = ("", "file", "http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def url_scheme(url: str) -> str:
    """The URL scheme in lower case, '' for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def _local_path(url: str) -> str | None:
    """The filesystem path of a plain path or file:// URL, None for anything else."""
    scheme = url_scheme(url)
    if scheme == "":
        return os.path.expanduser(url)
    if scheme == "file":
        return url2pathname(urlparse(url).path)
    return None


def expand_urls(urls: Union[str, Sequence[str]], allow_unsafe_urls: bool = False) -> List[str]:
    """Expands a shard spec into a list of shard URLs, in order (sources in order, each glob sorted).

    Raises ValueError for a refused scheme or a source that matches no files, naming the source.
    """
    sources = [urls] if isinstance(urls, str) else list(urls)
    specs = [part.strip() for source in sources for part in source.split("::") if part.strip()]
    if not specs:
        raise ValueError(f"empty shard spec: {urls!r}")
    shards: List[str] = []
    for spec in specs:
        scheme = url_scheme(spec)
        if scheme not in SAFE_SCHEMES and not allow_unsafe_urls:
            raise ValueError(
                f"refusing shard URL {spec!r}: scheme {scheme!r} is not allowed (only local paths, file://, http:// "
                "and https://); pass allow_unsafe_urls=True to let webdataset open it (pipe: runs a shell command)"
            )
        found: List[str] = []
        missing: List[str] = []
        for url in braceexpand(spec):
            path = _local_path(url)
            if path is None:
                found.append(url)  # remote or allowed-unsafe: existence is only known when it is read
            elif glob.has_magic(path):
                found.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"shard spec {spec!r}: file {missing[0]!r} does not exist{more}")
        if not found:
            raise ValueError(f"shard spec {spec!r} matches no files")
        shards.extend(found)
    return shards


def _count_tar_keys(url: str) -> int:
    """Counts distinct consecutive keys in a tar (as the loader groups them). Local files skip member data."""
    path = _local_path(url)
    keys = 0
    last = None
    try:
        if path is not None:
            tar = tarfile.open(path, mode="r:*")  # seekable: iterating reads headers and seeks over data
        else:
            tar = tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
        with tar:
            for info in tar:
                if not info.isreg() or META_MEMBER.match(info.name):
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is not None and prefix != last:
                    keys += 1
                    last = prefix
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated shard counts the keys seen before the break
    return keys


def _known_sizes(directory: str, cache: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """open_clip's `sizes.json` ({"00000.tar": n, ...}) next to local shards, if present."""
    if directory not in cache:
        sizes: Dict[str, int] = {}
        sizes_path = os.path.join(directory, "sizes.json")
        if os.path.isfile(sizes_path):
            with open(sizes_path, encoding="utf-8") as f:
                sizes = {str(k): int(v) for k, v in json.load(f).items()}
        cache[directory] = sizes
    return cache[directory]


def shard_sizes(urls: Union[str, Sequence[str]], allow_unsafe_urls: bool = False,
                read_remote: bool = True) -> List[int | None]:
    """Samples (keys) per shard of `urls`, bad ones included, in order.

    Per shard: `sizes.json` in the shard's folder if it lists the shard; else img2dataset's `<shard>_stats.json`
    ("successes"); else the tar headers are read (member data is skipped for local files, streamed for remote ones;
    with read_remote=False a remote shard's size is None instead).
    """
    sizes: List[int | None] = []
    cache: Dict[str, Dict[str, int]] = {}
    for url in expand_urls(urls, allow_unsafe_urls=allow_unsafe_urls):
        path = _local_path(url)
        if path is not None:
            directory, name = os.path.split(path)
            known = _known_sizes(directory or ".", cache)
            if name in known:
                sizes.append(known[name])
                continue
            stats_path = os.path.join(directory, name.split(".")[0] + "_stats.json")
            if os.path.isfile(stats_path):
                with open(stats_path, encoding="utf-8") as f:
                    stats = json.load(f)
                if isinstance(stats.get("successes"), int):
                    sizes.append(stats["successes"])
                    continue
        elif not read_remote:
            sizes.append(None)
            continue
        sizes.append(_count_tar_keys(url))
    return sizes


def count_samples(urls: Union[str, Sequence[str]], allow_unsafe_urls: bool = False) -> int:
    """Number of samples (keys) in the shards of `urls`, bad ones included (see `shard_sizes`)."""
    return sum(n or 0 for n in shard_sizes(urls, allow_unsafe_urls=allow_unsafe_urls))
