"""Shard files: the WebDataset tar, the per-row parquet and the stats json, each written under a temporary name and
renamed when complete. The stats json is renamed last: its presence (with a matching fingerprint and tar size) is
what marks a shard complete, so a run killed at any point leaves either a complete shard or one that is redone.

Tars are byte-reproducible: members in input order, mtime 0, uid/gid 0, no user names, mode 0644.
"""

import io
import json
import os
import tarfile
from typing import Any, Dict, Iterable, List

import pyarrow as pa
import pyarrow.parquet as pq

# Row-level columns of NNNNN.parquet, after key/source/caption and the extra columns.
RESULT_FIELDS = [
    ("status", pa.string()),
    ("error_reason", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("original_bytes", pa.int64()),
    ("sha256", pa.string()),
    ("exif", pa.string()),  # JSON object as a string (img2dataset's layout); null unless --extract-exif
]


def shard_paths(output_dir: str, name: str) -> Dict[str, str]:
    return {
        "tar": os.path.join(output_dir, f"{name}.tar"),
        "parquet": os.path.join(output_dir, f"{name}.parquet"),
        "stats": os.path.join(output_dir, f"{name}_stats.json"),
        "journal": os.path.join(output_dir, f"{name}.rows.partial"),
    }


def _temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def remove_stale_temporaries(output_dir: str, name: str) -> None:
    """Deletes leftovers of a killed run for this shard (NNNNN.parquet.tmpPID and friends; not the .partial files
    that a resume continues from)."""
    for entry in os.listdir(output_dir):
        if entry.startswith(f"{name}.") and ".tmp" in entry:
            try:
                os.remove(os.path.join(output_dir, entry))
            except FileNotFoundError:
                pass


class TarWriter:
    """Writes members to `path + ".partial"`; `commit()` renames it into place.

    `resume_offset`: continue a partial tar of a killed run, cut back to the end of its last complete row.
    """

    def __init__(self, path: str, resume_offset: int | None = None):
        self.path = path
        self.tmp_path = f"{path}.partial"
        if resume_offset is None:
            self._file = open(self.tmp_path, "wb")
        else:
            self._file = open(self.tmp_path, "r+b")
            self._file.truncate(resume_offset)
            self._file.seek(resume_offset)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._tar.offset = resume_offset or 0  # tarfile pads the archive end relative to this

    @property
    def offset(self) -> int:
        """Bytes written so far: where the next member starts."""
        return self._tar.offset

    def flush(self) -> None:
        self._file.flush()

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, ext: str, image: bytes, caption: str, meta: Dict[str, Any]) -> None:
        self.add(f"{key}.{ext}", image)
        self.add(f"{key}.txt", caption.encode("utf-8"))
        self.add(f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))

    def commit(self) -> int:
        """Closes and renames into place; returns the tar's size in bytes."""
        self._tar.close()
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return os.path.getsize(self.path)

    def close_partial(self) -> None:
        """Stops writing but keeps the partial file, for a later resume."""
        self._file.close()


def filter_tar(path: str, drop_keys: Iterable[str]) -> int:
    """Rewrites a tar without the members of `drop_keys` (same member bytes and order); returns the new size."""
    drop = set(drop_keys)
    writer = TarWriter(path)
    try:
        with tarfile.open(path, "r") as source:
            for member in source:
                if member.name.split(".", 1)[0] in drop:
                    continue
                writer.add(member.name, source.extractfile(member).read())
    except BaseException:
        writer.close_partial()
        os.remove(writer.tmp_path)
        raise
    return writer.commit()


def write_parquet(path: str, records: List[Dict[str, Any]], extra_cols: List[str]) -> None:
    """One row per input row: key, source, caption, extras, then RESULT_FIELDS."""
    columns: Dict[str, pa.Array] = {
        "key": pa.array([r["key"] for r in records], pa.string()),
        "source": pa.array([r["source"] for r in records], pa.string()),
        "caption": pa.array([r["caption"] for r in records], pa.string()),
    }
    for col in extra_cols:
        values = [r["extras"].get(col) for r in records]
        try:
            columns[col] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            columns[col] = pa.array([None if v is None else str(v) for v in values], pa.string())
    for field, dtype in RESULT_FIELDS:
        columns[field] = pa.array([r.get(field) for r in records], dtype)
    tmp = _temporary(path)
    pq.write_table(pa.table(columns), tmp, compression="zstd")
    os.replace(tmp, path)


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = _temporary(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
