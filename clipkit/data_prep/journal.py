"""Row-level resume inside a shard (img2dataset redoes a whole interrupted shard: its #333, #358).

While a shard is written, `NNNNN.rows.partial` gets one JSON line per finished row, with the tar offset after that
row's members; the tar itself grows in `NNNNN.tar.partial`. A rerun with the same fingerprint cuts the tar back to the
offset of the last complete journal line and goes on from the next row, so the finished shard is byte-identical to
one written in a single go. A lock on the journal keeps two runs from writing the same shard at once.
"""

import fcntl
import json
import os
from typing import Any, Dict, List, Tuple


class ShardBusy(RuntimeError):
    """Another process is writing this shard right now."""


class RowJournal:
    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint
        self._file = None

    def open(self, tar_exists: bool) -> Tuple[List[Dict[str, Any]], int]:
        """Locks the journal; returns (records of finished rows, tar offset after them) to resume from, or ([], 0)."""
        self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._file.close()
            raise ShardBusy(f"{self.path} is locked: another run is writing this shard") from e
        self._file.seek(0)
        lines = self._file.read().split(b"\n")
        records, offset, valid_bytes = [], 0, 0
        try:
            header = json.loads(lines[0]) if len(lines) > 1 else {}
        except ValueError:
            header = {}
        if tar_exists and header.get("fingerprint") == self.fingerprint:
            valid_bytes = len(lines[0]) + 1
            for line in lines[1:-1]:  # the last element is after the final newline: empty or a cut line
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                offset = record.pop("tar_offset")
                records.append(record)
                valid_bytes += len(line) + 1
        self._file.truncate(valid_bytes)
        if valid_bytes == 0:
            self._write({"fingerprint": self.fingerprint})
        return records, offset

    def append(self, record: Dict[str, Any], tar_offset: int) -> None:
        self._write({**record, "tar_offset": tar_offset})

    def _write(self, data: Dict[str, Any]) -> None:
        self._file.seek(0, os.SEEK_END)
        self._file.write(json.dumps(data, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
        self._file.flush()

    def close(self, remove: bool) -> None:
        if self._file is not None:
            if remove:
                os.remove(self.path)
            self._file.close()  # releases the lock
            self._file = None
