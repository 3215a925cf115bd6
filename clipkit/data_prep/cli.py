"""Command line of the data-prep stage: `python data_prep/build_shards.py` or `python -m clipkit.data_prep`.

    python data_prep/build_shards.py laion_part_*.parquet --url-col URL --caption-col TEXT \\
        --output shards/ --image-size 256 --resize-mode center_crop --workers 16 --dedup
    python data_prep/build_shards.py dump.csv --path-col file --caption-col text --base-dir /data/images \\
        --output shards/
"""

import argparse
import math
import sys
from typing import List

from clipkit.data_prep import huge
from clipkit.data_prep.config import ConfigError, ShardConfig
from clipkit.data_prep.fetch import DEFAULT_DISALLOWED_DIRECTIVES, DEFAULT_USER_AGENT
from clipkit.data_prep.process import FORMATS, RESIZE_MODES
from clipkit.data_prep.readers import DumpError
from clipkit.images import DEFAULT_MAX_PIXELS


def _csv_list(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_shards",
        description="Turn caption dumps (URL or local path + caption) into WebDataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="dump files, folders or globs: csv tsv jsonl json parquet txt (+ .gz)")
    p.add_argument("--output", required=True, help="output folder for NNNNN.tar, .parquet, _stats.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url-col", help="column of http/https image URLs")
    src.add_argument("--path-col", help="column of local image paths (or file:// URLs)")
    p.add_argument("--base-dir", help="folder relative paths are resolved against (default: the dump's folder)")
    p.add_argument("--caption-col", help="column of captions")
    p.add_argument("--extra-cols", type=_csv_list, default=[], help="columns copied into each sample's json: a,b")
    p.add_argument("--samples-per-shard", type=int, default=10000, help="input rows per shard")

    img = p.add_argument_group("images")
    img.add_argument("--image-size", type=int, default=256)
    img.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop")
    img.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
    img.add_argument("--format", choices=tuple(FORMATS), default="jpg")
    img.add_argument("--quality", type=int, default=95, help="jpg/webp encoder quality")
    img.add_argument("--min-size", type=int, default=0, help="reject images whose smaller side is below this")
    img.add_argument("--max-aspect-ratio", type=float, default=math.inf, help="reject wider/taller images")
    img.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="decode in memory up to this many pixels (header); larger ones are streamed (below)")
    img.add_argument("--stream-max-pixels", type=int, default=huge.DEFAULT_MAX_PIXELS,
                     help="above --max-pixels, decode in bounded memory with libvips up to this (0: refuse them)")
    img.add_argument("--stream-min-bytes-per-pixel", type=float, default=huge.DEFAULT_MIN_BYTES_PER_PIXEL,
                     help="above --max-pixels, a file with fewer bytes per pixel is a decompression bomb: refused")
    img.add_argument("--stream-time-budget", type=float, default=huge.DEFAULT_TIME_BUDGET_S,
                     help="seconds one streamed decode may take")
    img.add_argument("--stream-slots", type=int, default=2, help="streamed decodes at once per process")
    img.add_argument("--dedup", action="store_true", help="drop exact duplicate images (sha256), first one wins")
    img.add_argument("--extract-exif", action="store_true",
                     help="store the source EXIF (IFD0 + Exif IFD; no GPS, no binary tags) as a JSON string in 'exif'")

    cap = p.add_argument_group("captions")
    cap.add_argument("--max-caption-length", type=int, default=1000, help="characters kept after cleaning")
    cap.add_argument("--keep-empty-captions", action="store_true", help="keep rows whose caption is empty")

    net = p.add_argument_group("downloads")
    net.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt, connect to last byte")
    net.add_argument("--retries", type=int, default=2, help="extra attempts on timeouts, 429, 5xx (with backoff)")
    net.add_argument("--max-bytes", type=int, default=32 << 20, help="largest accepted image file or body")
    net.add_argument("--user-agent", default=DEFAULT_USER_AGENT)
    net.add_argument(
        "--disallowed-header-directives",
        type=_csv_list,
        default=sorted(DEFAULT_DISALLOWED_DIRECTIVES),
        help="X-Robots-Tag directives that opt an image out (empty string: ignore the header)",
    )
    net.add_argument(
        "--allow-private-network",
        action="store_true",
        help="allow URLs that resolve to loopback/private/link-local addresses (off: SSRF guard)",
    )

    run = p.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=0, help="processes (0: one per core; 1: in this process)")
    run.add_argument("--threads", type=int, default=16, help="download/decode threads per process")
    run.add_argument("--distributor", choices=("multiprocessing", "ray"), default="multiprocessing")
    run.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    return ShardConfig(
        inputs=args.inputs,
        output=args.output,
        url_col=args.url_col,
        path_col=args.path_col,
        base_dir=args.base_dir,
        caption_col=args.caption_col,
        extra_cols=args.extra_cols,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        format=args.format,
        quality=args.quality,
        min_size=args.min_size,
        max_aspect_ratio=args.max_aspect_ratio,
        max_pixels=args.max_pixels,
        stream_max_pixels=args.stream_max_pixels,
        stream_min_bytes_per_pixel=args.stream_min_bytes_per_pixel,
        stream_time_budget_s=args.stream_time_budget,
        stream_slots=args.stream_slots,
        dedup=args.dedup,
        extract_exif=args.extract_exif,
        max_caption_length=args.max_caption_length,
        keep_empty_captions=args.keep_empty_captions,
        workers=args.workers,
        threads=args.threads,
        timeout=args.timeout,
        retries=args.retries,
        max_bytes=args.max_bytes,
        user_agent=args.user_agent,
        disallowed_directives=frozenset(d.lower() for d in args.disallowed_header_directives),
        allow_private_network=args.allow_private_network,
        distributor=args.distributor,
        ray_address=args.ray_address,
        progress=not args.no_progress,
    )


def main(argv: List[str] | None = None) -> int:
    """Returns 0 when every shard completed (rows may still have failed: see the parquet files), 1 if a shard
    failed, 2 on bad input or settings (nothing was done)."""
    args = build_parser().parse_args(argv)
    from clipkit.data_prep.pipeline import build_shards

    try:
        manifest = build_shards(config_from_args(args))
    except (DumpError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; run the same command to resume", file=sys.stderr)
        return 130
    return 1 if manifest["failed_shards"] else 0
