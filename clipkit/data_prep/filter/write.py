"""Pass 2: one output shard per input shard, with the kept samples' members copied unchanged (names, bytes, order)
into a reproducible tar (clipkit.data_prep.writer.TarWriter: mtime 0, uid 0, mode 0644), so the output is a byte-for-
byte subset of the input and a rerun writes identical files.

Resume comes from build_shards' machinery: a row journal (`NAME.rows.partial`, one line per input sample with the
tar offset after it) lets a killed job continue inside a shard, and `NAME_stats.json`, written last, marks a shard
complete when its fingerprint (input sha256 + settings + the kept keys) matches.
"""

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data_prep.filter.read import HashingReader, iter_samples
from clipkit.data_prep.journal import RowJournal
from clipkit.data_prep.writer import TarWriter, read_json, remove_stale_temporaries, shard_paths, write_json

ROW_FIELDS = [
    ("key", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption_words", pa.int32()),
    ("caption_chars", pa.int32()),
    ("language", pa.string()),
    ("image_error", pa.string()),
    ("clip_score", pa.float64()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
]


@dataclass
class FilterJob:
    name: str  # output shard name (the input's file name without .tar)
    input_path: str
    input_sha256: str  # of the input tar when it was scored: a changed input is an error, not a silent mismatch
    output: str
    rows: List[Dict[str, Any]]  # one per input sample, in tar order, with `kept` and `drop_reason` decided
    fingerprint: str


def job_fingerprint(input_sha256: str, rows: List[Dict[str, Any]], settings: Dict[str, Any]) -> str:
    text = json.dumps({"input": input_sha256, "settings": settings,
                       "kept": [r["key"] for r in rows if r["kept"]], "n": len(rows)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def is_complete(job: FilterJob) -> bool:
    paths = shard_paths(job.output, job.name)
    stats = read_json(paths["stats"])
    if not stats or stats.get("fingerprint") != job.fingerprint or not os.path.exists(paths["parquet"]):
        return False
    return os.path.exists(paths["tar"]) and os.path.getsize(paths["tar"]) == stats.get("tar_bytes")


def write_filtered_shard(job: FilterJob, config: Any, progress: Callable[[int], None] | None = None
                         ) -> Dict[str, Any]:
    """Writes NAME.tar (kept samples), NAME.parquet (every input sample) and NAME_stats.json (last)."""
    start = time.monotonic()
    paths = shard_paths(job.output, job.name)
    remove_stale_temporaries(job.output, job.name)
    journal = RowJournal(paths["journal"], job.fingerprint)
    partial = os.path.exists(paths["tar"] + ".partial")
    done, offset = journal.open(tar_exists=partial or os.path.exists(paths["tar"]))
    if len(done) == len(job.rows) and not partial and os.path.exists(paths["tar"]):
        # killed after the tar was renamed into place: only the parquet and the stats are missing
        return _finish(job, paths, os.path.getsize(paths["tar"]), journal, start, len(done))
    tar = TarWriter(paths["tar"], resume_offset=offset if done else None)
    reported = seen = 0
    try:
        with open(job.input_path, "rb") as f:
            reader = HashingReader(f)
            for index, sample in enumerate(iter_samples(reader)):
                seen = index + 1
                if index >= len(job.rows) or sample.key != job.rows[index]["key"]:
                    raise RuntimeError(f"{job.input_path}: sample {index} is not the scored one: the shard changed "
                                       "since it was scored; score it again")
                if index < len(done):
                    continue  # written by the killed run this one resumes
                if job.rows[index]["kept"]:
                    for name, data in sample.members:
                        tar.add(name, data)
                    tar.flush()  # the members are in the file before the journal says the row is done
                journal.append({"key": sample.key}, tar.offset)
                if progress is not None and index % 64 == 63:
                    progress(index + 1 - reported)
                    reported = index + 1
            digest = reader.finish()
        if seen != len(job.rows):
            raise RuntimeError(f"{job.input_path}: {seen} samples, {len(job.rows)} were scored: score it again")
        if digest != job.input_sha256:
            raise RuntimeError(f"{job.input_path}: sha256 differs from the scored shard's: score it again")
    except BaseException:
        tar.close_partial()
        journal.close(remove=False)
        raise
    if progress is not None and len(job.rows) > reported:
        progress(len(job.rows) - reported)
    return _finish(job, paths, tar.commit(), journal, start, len(done))


def _finish(job: FilterJob, paths: Dict[str, str], tar_bytes: int, journal: RowJournal, start: float,
            resumed: int) -> Dict[str, Any]:
    table = pa.table({name: pa.array([r.get(name) for r in job.rows], dtype) for name, dtype in ROW_FIELDS})
    tmp = f"{paths['parquet']}.tmp{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, paths["parquet"])
    reasons = Counter(r["drop_reason"] for r in job.rows if not r["kept"])
    stats = {"shard": job.name, "input": job.input_path, "fingerprint": job.fingerprint, "count": len(job.rows),
             "kept": sum(r["kept"] for r in job.rows), "drop_reasons": dict(sorted(reasons.items())),
             "tar_bytes": tar_bytes, "resumed_rows": resumed, "duration_s": round(time.monotonic() - start, 3)}
    write_json(paths["stats"], stats)  # last: marks the shard complete
    journal.close(remove=True)
    return stats
