"""Settings of one shard-building run (one field per command-line flag)."""

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List

from clipkit.data_prep import huge
from clipkit.data_prep.fetch import DEFAULT_DISALLOWED_DIRECTIVES, DEFAULT_USER_AGENT, FetchOptions
from clipkit.data_prep.process import FORMATS, RESIZE_MODES, ImageOptions
from clipkit.images import DEFAULT_MAX_PIXELS

# Keys of every sample's json that extra columns may not overwrite.
RESERVED_META = (
    "key",
    "source",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "original_bytes",
    "sha256",
)


class ConfigError(ValueError):
    """Inconsistent settings; raised before any work starts."""


@dataclass
class ShardConfig:
    inputs: List[str]  # dump files, folders or globs
    output: str  # output folder for NNNNN.tar and friends
    url_col: str | None = None  # column of http/https URLs
    path_col: str | None = None  # column of local paths (or file:// URLs)
    base_dir: str | None = None  # relative paths are joined to this (default: the dump file's folder)
    caption_col: str | None = None  # column of captions
    extra_cols: List[str] = field(default_factory=list)  # columns copied into each sample's json
    samples_per_shard: int = 10000  # input rows per shard
    image_size: int = 256  # target side in pixels
    resize_mode: str = "center_crop"  # no | center_crop | keep_ratio | keep_ratio_largest | border
    resize_only_if_bigger: bool = False  # never upscale
    format: str = "jpg"  # jpg | png | webp
    quality: int = 95  # jpg/webp quality
    min_size: int = 0  # reject images whose smaller side is below this
    max_aspect_ratio: float = math.inf  # reject images with larger side / smaller side above this
    max_pixels: int = DEFAULT_MAX_PIXELS  # decode in memory up to this many pixels (checked from the header)
    stream_max_pixels: int = huge.DEFAULT_MAX_PIXELS  # above max_pixels: streamed decoding up to this (0: refuse)
    stream_min_bytes_per_pixel: float = huge.DEFAULT_MIN_BYTES_PER_PIXEL  # above max_pixels, fewer: a bomb
    stream_time_budget_s: float = huge.DEFAULT_TIME_BUDGET_S  # wall-clock limit of one streamed decode
    stream_slots: int = 2  # streamed decodes at once per process (each holds ~100-200 MB)
    extract_exif: bool = False  # source EXIF (no GPS) into each sample's json and the parquet, as a JSON string
    dedup: bool = False  # drop exact duplicate images (sha256 of the source bytes); first occurrence wins
    max_caption_length: int = 1000  # characters kept after cleaning
    keep_empty_captions: bool = False  # keep rows whose cleaned caption is empty
    workers: int = 0  # processes (0: one per CPU core; 1: in this process)
    threads: int = 16  # download/decode threads per process
    timeout: float = 10.0  # seconds per download attempt, connect to last byte
    retries: int = 2  # extra attempts after a timeout, connection error, 429 or 5xx
    max_bytes: int = 32 << 20  # largest accepted source file / response body
    user_agent: str = DEFAULT_USER_AGENT
    disallowed_directives: FrozenSet[str] = DEFAULT_DISALLOWED_DIRECTIVES  # X-Robots-Tag opt-outs honoured
    allow_private_network: bool = False  # let URL rows reach loopback/private/link-local addresses
    distributor: str = "multiprocessing"  # multiprocessing | ray
    ray_address: str | None = None  # Ray cluster address (default: start a local Ray instance)
    progress: bool = True  # progress bar on stderr

    def validate(self) -> None:
        if bool(self.url_col) == bool(self.path_col):
            raise ConfigError("give exactly one of --url-col and --path-col")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"--resize-mode must be one of {RESIZE_MODES}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {tuple(FORMATS)}")
        if self.stream_max_pixels < 0 or self.stream_min_bytes_per_pixel < 0 or self.stream_time_budget_s <= 0 \
                or self.stream_slots < 1:
            raise ConfigError("--stream-max-pixels and --stream-min-bytes-per-pixel must be >= 0, "
                              "--stream-time-budget and --stream-slots positive")
        if self.image_size <= 0 or self.samples_per_shard <= 0 or self.threads <= 0 or self.workers < 0:
            raise ConfigError("--image-size, --samples-per-shard and --threads must be positive, --workers >= 0")
        if not 0 <= self.quality <= 100:
            raise ConfigError("--quality must be within 0..100")
        if self.distributor not in ("multiprocessing", "ray"):
            raise ConfigError("--distributor must be multiprocessing or ray")
        clash = sorted(set(self.extra_cols) & set(RESERVED_META))
        if clash:
            raise ConfigError(f"--extra-cols {clash} clash with fields every sample json has: {RESERVED_META}")
        if self.caption_col is None and not self.keep_empty_captions:
            raise ConfigError("no --caption-col: pass --keep-empty-captions to build image-only shards")

    @property
    def local(self) -> bool:
        return bool(self.path_col)

    @property
    def source_col(self) -> str:
        return self.path_col or self.url_col  # type: ignore[return-value]

    @property
    def process_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def image_options(self) -> ImageOptions:
        return ImageOptions(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            format=self.format,
            quality=self.quality,
            min_size=self.min_size,
            max_aspect_ratio=self.max_aspect_ratio,
            max_pixels=self.max_pixels,
            extract_exif=self.extract_exif,
            stream_max_pixels=self.stream_max_pixels,
            stream_min_bytes_per_pixel=self.stream_min_bytes_per_pixel,
            stream_time_budget_s=self.stream_time_budget_s,
        )

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            timeout=self.timeout,
            retries=self.retries,
            max_bytes=self.max_bytes,
            user_agent=self.user_agent,
            disallowed_directives=frozenset(self.disallowed_directives),
            allow_private_network=self.allow_private_network,
        )

    def output_settings(self) -> Dict[str, Any]:
        """Settings that change shard contents (a changed one means complete shards are redone, not skipped)."""
        names = (
            "url_col path_col caption_col extra_cols samples_per_shard image_size resize_mode resize_only_if_bigger "
            "format quality min_size max_aspect_ratio max_pixels stream_max_pixels stream_min_bytes_per_pixel "
            "extract_exif dedup max_caption_length "
            "keep_empty_captions max_bytes user_agent allow_private_network"
        ).split()
        settings = {n: getattr(self, n) for n in names}
        settings["disallowed_directives"] = sorted(self.disallowed_directives)
        settings["max_aspect_ratio"] = str(self.max_aspect_ratio)
        return settings

    def to_json(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["disallowed_directives"] = sorted(self.disallowed_directives)
        data["max_aspect_ratio"] = str(self.max_aspect_ratio)
        return data


def fingerprint(settings: Dict[str, Any], rows_digest: str) -> str:
    text = json.dumps(settings, sort_keys=True, default=str) + rows_digest
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
