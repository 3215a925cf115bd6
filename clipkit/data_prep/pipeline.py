"""The whole run: read the dump, plan shards, skip complete ones, run the rest, drop cross-shard duplicates, write
sizes.json (open_clip's format) and manifest.json, print a summary.
"""

import hashlib
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from typing import Any, Dict, List, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data_prep.config import ShardConfig, fingerprint
from clipkit.data_prep.distributors import run_jobs
from clipkit.data_prep.readers import read_dump
from clipkit.data_prep.shard import DUPLICATE, SUCCESS, ShardJob, mark_duplicate, shard_stats
from clipkit.data_prep.writer import RESULT_FIELDS, filter_tar, read_json, shard_paths, write_json, write_parquet


def _rows_digest(rows: pa.Table) -> str:
    digest = hashlib.sha256()
    for column in rows.column_names:
        digest.update(column.encode())
        digest.update(json.dumps(rows.column(column).to_pylist(), default=str).encode("utf-8", "replace"))
    return digest.hexdigest()


def plan_jobs(table: pa.Table, config: ShardConfig) -> List[ShardJob]:
    per_shard = config.samples_per_shard
    count = (table.num_rows + per_shard - 1) // per_shard
    name_digits = max(5, len(str(count - 1)))
    key_digits = len(str(per_shard - 1))
    settings = config.output_settings()
    jobs = []
    for shard_id in range(count):
        # take() copies: a slice would pickle the whole dump's buffers into every job sent to a worker
        first = shard_id * per_shard
        rows = table.take(pa.array(range(first, min(first + per_shard, table.num_rows))))
        jobs.append(
            ShardJob(
                shard_id=shard_id,
                name=f"{shard_id:0{name_digits}d}",
                first_row=shard_id * per_shard,
                rows=rows,
                fingerprint=fingerprint(settings, _rows_digest(rows)),
                key_digits=key_digits,
            )
        )
    return jobs


def is_complete(job: ShardJob, output: str) -> bool:
    """A shard is complete when its stats json (written last) matches this job and its tar has the recorded size."""
    paths = shard_paths(output, job.name)
    stats = read_json(paths["stats"])
    if not stats or stats.get("fingerprint") != job.fingerprint or not os.path.exists(paths["parquet"]):
        return False
    return os.path.exists(paths["tar"]) and os.path.getsize(paths["tar"]) == stats.get("tar_bytes")


class FirstSeen:
    """sha256 -> key of its first occurrence, in a SQLite table on disk, so that memory stays bounded however many
    images there are (a Python dict of hex digests costs ~224 bytes per image, ~21 GB for 100 million:
    bench/dedup_memory.py)."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):
            os.remove(path)  # left by a killed run; the table is rebuilt from the shards' parquet files every time
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-65536"):  # a scratch table: 64 MiB cache
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY, key TEXT NOT NULL) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def first(self, sha256_hex: str, key: str) -> str:
        """The key the image first came with: `key` itself unless the digest was recorded before."""
        digest = bytes.fromhex(sha256_hex)
        if self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (digest, key)).rowcount:
            return key
        return self.db.execute("SELECT key FROM seen WHERE digest = ?", (digest,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()
        os.remove(self.path)


def dedup_across_shards(jobs: List[ShardJob], output: str) -> None:
    """Drops images already written by an earlier shard (first occurrence in input order wins).

    Runs after all shards exist, so shards stay independent jobs; rewrites only the shards that hold a duplicate,
    each file through a temporary name, and is idempotent, so a kill in the middle is fixed by running again.
    """
    seen = FirstSeen(os.path.join(output, "_dedup.sqlite"))
    try:
        for job in jobs:
            _drop_seen(job, output, seen)
    finally:
        seen.close()


def _drop_seen(job: ShardJob, output: str, seen: FirstSeen) -> None:
    paths = shard_paths(output, job.name)
    table = pq.read_table(paths["parquet"])
    records = table.to_pylist()
    drop = []
    for record in records:
        if record["status"] != SUCCESS:
            continue
        first = seen.first(record["sha256"], record["key"])
        if first != record["key"]:
            mark_duplicate(record, first)
            drop.append(record["key"])
    if drop:
        tar_bytes = filter_tar(paths["tar"], drop)
        extra = [c for c in table.column_names if c not in ("key", "source", "caption") and c not in _RESULT_NAMES]
        for record in records:
            record["extras"] = {c: record[c] for c in extra}
        write_parquet(paths["parquet"], records, extra)
        old = read_json(paths["stats"]) or {}
        stats = shard_stats(job, records, tar_bytes, old.get("duration_s", 0.0))
        stats["resumed_rows"] = old.get("resumed_rows", 0)
        write_json(paths["stats"], stats)


_RESULT_NAMES = {name for name, _ in RESULT_FIELDS}


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", disable=not enabled, file=sys.stderr, smoothing=0.1)


def build_shards(config: ShardConfig, log: TextIO | None = None) -> Dict[str, Any]:
    """Runs the whole stage; returns the manifest. Raises DumpError/ConfigError before any work on bad input."""
    log = log or sys.stdout
    start = time.monotonic()
    config.validate()
    table = read_dump(
        config.inputs, config.source_col, config.caption_col, config.extra_cols, config.local, config.base_dir
    )
    os.makedirs(config.output, exist_ok=True)
    jobs = plan_jobs(table, config)
    todo = [job for job in jobs if not is_complete(job, config.output)]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(jobs)} shards already complete", file=log)
    failures: Dict[str, str] = {}
    run_rows = sum(job.rows.num_rows for job in todo)
    bar = _progress_bar(table.num_rows, table.num_rows - run_rows, config.progress)

    def on_done(job: ShardJob, stats: Dict[str, Any] | None, error: str | None) -> None:
        if error is not None:
            failures[job.name] = error
            print(f"shard {job.name} failed: {error}", file=sys.stderr)

    try:
        run_jobs(todo, config, on_done, bar.update)
    finally:
        bar.close()
    if config.dedup and not failures:
        dedup_across_shards(jobs, config.output)
    elif config.dedup:
        print("duplicates across shards are removed once every shard is complete: run the command again", file=log)
    elapsed = time.monotonic() - start
    manifest = _write_totals(config, jobs, todo, failures, elapsed, table.num_rows)
    _print_summary(manifest, log)
    return manifest


def _write_totals(config, jobs, todo, failures, elapsed, total_rows) -> Dict[str, Any]:
    statuses: Counter = Counter()
    reasons: Counter = Counter()
    sizes: Dict[str, int] = {}
    run_successes = 0
    ran = {job.name for job in todo} - set(failures)
    complete = [job for job in jobs if job.name not in failures]
    for job in complete:
        stats = read_json(shard_paths(config.output, job.name)["stats"]) or {}
        statuses.update(stats.get("status_counts", {}))
        reasons.update(stats.get("reason_counts", {}))
        sizes[f"{job.name}.tar"] = stats.get("successes", 0)
        if job.name in ran:
            run_successes += stats.get("successes", 0)
    write_json(os.path.join(config.output, "sizes.json"), sizes)
    manifest = {
        "rows": total_rows,
        "shards": len(jobs),
        "complete_shards": len(complete),
        "failed_shards": failures,
        "successes": statuses.get(SUCCESS, 0),
        "duplicates_removed": statuses.get(DUPLICATE, 0),
        "status_counts": dict(sorted(statuses.items())),
        "reason_counts": dict(sorted(reasons.items())),
        "rows_this_run": sum(job.rows.num_rows for job in todo),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(run_successes / elapsed, 2) if elapsed > 0 else 0.0,
        "config": config.to_json(),
    }
    write_json(os.path.join(config.output, "manifest.json"), manifest)
    return manifest


def _print_summary(manifest: Dict[str, Any], log: TextIO) -> None:
    failed = {k: v for k, v in manifest["status_counts"].items() if k not in (SUCCESS, DUPLICATE)}
    print(
        f"{manifest['successes']} images in {manifest['complete_shards']}/{manifest['shards']} shards "
        f"from {manifest['rows']} rows; {manifest['duplicates_removed']} duplicates removed; "
        f"{manifest['images_per_s']:.1f} images/s ({manifest['elapsed_s']:.1f}s)",
        file=log,
    )
    if failed:
        print("failures by status: " + ", ".join(f"{k}={v}" for k, v in sorted(failed.items())), file=log)
    reasons = manifest["reason_counts"]
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:12]
        print("failures by reason: " + ", ".join(f"{k}={v}" for k, v in top), file=log)
    if manifest["failed_shards"]:
        print(f"{len(manifest['failed_shards'])} shard(s) failed; run the same command again to retry them", file=log)
