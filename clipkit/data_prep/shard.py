"""Building one shard: rows -> (caption, fetch, check, resize, encode) on a thread pool -> tar in input order.

Threads overlap network waits, and PIL releases the GIL while decoding, resizing and encoding, so a process keeps a
core busy. Results are consumed in input order through a bounded window, so memory stays at a few dozen images and
the tar is the same whatever order the downloads finish in.
"""

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List

import pyarrow as pa

from clipkit.data_prep.captions import clean_caption
from clipkit.data_prep.config import ShardConfig
from clipkit.data_prep.fetch import FetchError, HttpFetcher, read_local
from clipkit.data_prep.journal import RowJournal
from clipkit.data_prep.process import ImageOptions, ProcessedImage, process_image
from clipkit.data_prep.writer import TarWriter, remove_stale_temporaries, shard_paths, write_json, write_parquet
from clipkit.images import ImageRejected

# Row statuses: success, or the kind of failure. The finer reason goes to error_reason.
SUCCESS = "success"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
DUPLICATE = "duplicate"


@dataclass
class ShardJob:
    shard_id: int
    name: str  # "00042"
    first_row: int
    rows: pa.Table
    fingerprint: str
    key_digits: int  # digits of the row number inside the shard


def mark_duplicate(record: Dict[str, Any], first_key: str) -> None:
    """--dedup: `record` holds the same image bytes as the row with key `first_key`, which wins."""
    record.update(status=DUPLICATE, error_reason="same_sha256", error_message=f"duplicate of {first_key}")


def shard_key(job: ShardJob, index: int) -> str:
    """img2dataset's key layout: shard number then row number inside the shard, zero-padded."""
    return f"{job.name}{index:0{job.key_digits}d}"


def _bounded_ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[Any]:
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _RowWorker:
    """Turns one input row into a result record (+ the encoded image on success). Runs on worker threads."""

    def __init__(self, config: ShardConfig, image_options: ImageOptions):
        self.config = config
        self.image_options = image_options
        self.fetcher = None if config.local else HttpFetcher(config.fetch_options())
        self.huge_slots = threading.BoundedSemaphore(config.stream_slots)  # streamed decodes of huge images at once

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        record: Dict[str, Any] = {"status": SUCCESS, "image": None}
        caption = clean_caption(row["caption"], self.config.max_caption_length)
        record["caption"] = caption
        if not caption and not self.config.keep_empty_captions:
            return self._fail(record, "empty_caption", "empty_caption", "caption is empty after cleaning")
        if not row["source"]:
            return self._fail(record, "failed_download", "no_source", "empty URL/path")
        try:
            if self.fetcher is None:
                data = read_local(row["location"], self.config.max_bytes)
            else:
                data = self.fetcher.fetch(row["source"])
        except FetchError as e:
            return self._fail(record, e.status, e.reason, str(e))
        except Exception as e:  # an odd URL or server reply must fail its row, never the shard
            return self._fail(record, "failed_download", "unexpected_error", f"{type(e).__name__}: {e}")
        record["original_bytes"] = len(data)
        record["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            image: ProcessedImage = process_image(data, self.image_options, self.huge_slots)
        except ImageRejected as e:
            return self._fail(record, "failed_image", e.reason, str(e))
        except Exception as e:  # a decoder bug on one hostile file must not take the shard down
            return self._fail(record, "failed_image", "decoder_error", f"{type(e).__name__}: {e}")
        record.update(
            image=image,
            width=image.width,
            height=image.height,
            original_width=image.original_width,
            original_height=image.original_height,
        )
        if image.exif is not None:
            record["exif"] = json.dumps(image.exif, sort_keys=True, ensure_ascii=False)
        return record

    @staticmethod
    def _fail(record: Dict[str, Any], status: str, reason: str, message: str) -> Dict[str, Any]:
        # "<_io.BytesIO object at 0x7f...>" would make reruns differ byte for byte
        record.update(status=status, error_reason=reason, error_message=_ADDRESS.sub("", message)[:500])
        return record

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()


def run_shard(job: ShardJob, config: ShardConfig, progress: Callable[[int], None] | None = None) -> Dict[str, Any]:
    """Builds NNNNN.tar, NNNNN.parquet and NNNNN_stats.json for one job; returns the stats.

    Continues from the last finished row when a killed run left this shard's .partial files (see journal.py).
    """
    start = time.monotonic()
    paths = shard_paths(config.output, job.name)
    remove_stale_temporaries(config.output, job.name)
    journal = RowJournal(paths["journal"], job.fingerprint)
    partial, rows = os.path.exists(paths["tar"] + ".partial"), job.rows.to_pylist()
    records, offset = journal.open(tar_exists=partial or os.path.exists(paths["tar"]))
    resumed = len(records)
    extra_cols = list(config.extra_cols)
    if resumed == len(rows) and not partial and os.path.exists(paths["tar"]):
        # killed after the tar was renamed into place: only the parquet and the stats are missing
        return _finish(job, paths, records, extra_cols, os.path.getsize(paths["tar"]), journal, start, resumed)
    worker = _RowWorker(config, config.image_options())
    tar = TarWriter(paths["tar"], resume_offset=offset if resumed else None)
    seen = {r["sha256"]: r["key"] for r in records if r["status"] == SUCCESS and config.dedup}
    reported = 0  # rows already counted on the progress bar
    pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix=f"shard{job.name}")
    try:
        results = _bounded_ordered_map(pool, worker, rows[resumed:], window=config.threads * 3)
        for index, (row, record) in enumerate(zip(rows[resumed:], results), start=resumed):
            key = shard_key(job, index)
            image = record.pop("image")
            record.update(key=key, source=row["source"], extras={c: row[c] for c in extra_cols})
            if record["status"] == SUCCESS and config.dedup:
                first = seen.setdefault(record["sha256"], key)
                if first != key:
                    mark_duplicate(record, first)
            if record["status"] == SUCCESS:
                meta = {n: record.get(n) for n in ("key", "source", "caption", "width", "height")}
                meta.update({n: record.get(n) for n in ("original_width", "original_height", "original_bytes")})
                meta.update(record["extras"], sha256=record["sha256"])
                if config.extract_exif:
                    meta["exif"] = record.get("exif")
                tar.add_sample(key, image.ext, image.data, record["caption"], meta)
                tar.flush()  # the tar bytes are in the file before the journal says the row is done
            journal.append(record, tar.offset)
            records.append(record)
            if progress is not None and (index % 16 == 15 or index == len(rows) - 1):
                progress(index + 1 - reported)
                reported = index + 1
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        tar.close_partial()
        journal.close(remove=False)
        raise
    pool.shutdown(wait=True)
    worker.close()
    return _finish(job, paths, records, extra_cols, tar.commit(), journal, start, resumed)


def _finish(job, paths, records, extra_cols, tar_bytes, journal, start, resumed) -> Dict[str, Any]:
    write_parquet(paths["parquet"], records, extra_cols)
    stats = shard_stats(job, records, tar_bytes, time.monotonic() - start)
    stats["resumed_rows"] = resumed
    write_json(paths["stats"], stats)  # last: marks the shard complete
    journal.close(remove=True)
    return stats


def shard_stats(job: ShardJob, records: List[Dict[str, Any]], tar_bytes: int, duration: float) -> Dict[str, Any]:
    statuses = Counter(r["status"] for r in records)
    reasons = Counter(r["error_reason"] for r in records if r.get("error_reason"))
    return {
        "shard": job.name,
        "fingerprint": job.fingerprint,
        "count": len(records),
        "successes": statuses.get(SUCCESS, 0),
        "duplicates": statuses.get(DUPLICATE, 0),
        "status_counts": dict(sorted(statuses.items())),
        "reason_counts": dict(sorted(reasons.items())),
        "tar_bytes": tar_bytes,
        "duration_s": round(duration, 3),
    }
