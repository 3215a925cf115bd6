"""Caption dumps in: csv, tsv, jsonl, json, parquet, txt (and .gz of the text formats).

Every problem with the input (no file, unknown format, unreadable file, missing column, no rows) is raised as
`DumpError` before any image is fetched. The result is one Arrow table with the columns `source` (URL or path as
written in the dump), `caption`, the extra columns, and `location` (for local dumps: the absolute path to read).
"""

import csv
import glob
import gzip
import io
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Sequence
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data_prep.captions import repair_undecodable

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "txt")
COMPRESSIBLE = ("csv", "tsv", "jsonl", "json", "txt")


class DumpError(ValueError):
    """The input dump cannot be used; raised before any work starts."""


def detect_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in os.path.basename(name) else ""
    if ext == "ndjson":
        ext = "jsonl"
    if ext not in FORMATS or (path.lower().endswith(".gz") and ext not in COMPRESSIBLE):
        raise DumpError(f"{path}: unknown dump format (expected {', '.join(FORMATS)}, or .gz of {COMPRESSIBLE})")
    return ext


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files, folders (every dump file inside, recursively) and globs, in sorted order, without repeats."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, _, names in os.walk(item):
                found += [os.path.join(root, n) for n in names if _is_dump_name(n)]
            if not found:
                raise DumpError(f"{item}: folder holds no dump files ({', '.join(FORMATS)})")
            files += sorted(found)
        elif os.path.exists(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise DumpError(f"{item}: pattern matches no file")
            files += found
        else:
            raise DumpError(f"{item}: no such file")
    unique = list(dict.fromkeys(os.path.abspath(f) for f in files))
    for f in unique:
        detect_format(f)
    return unique


def _is_dump_name(name: str) -> bool:
    try:
        detect_format(name)
        return True
    except DumpError:
        return False


def _open_text(path: str) -> io.TextIOBase:
    # surrogateescape keeps bytes that are not UTF-8; captions.repair_undecodable turns them into characters.
    raw = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _read_records(path: str, fmt: str, needed: List[str]) -> Dict[str, List[Any]]:
    """Reads one dump file into columns (only `needed`); raises DumpError for a missing column or a bad file."""
    if fmt == "parquet":
        names = pq.read_schema(path).names
        _check_columns(path, names, needed)
        return pq.read_table(path, columns=needed).to_pydict()
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, None)
            if header is None:
                return {c: [] for c in needed}
            header = [h.strip().lstrip("\ufeff") for h in header]
            _check_columns(path, header, needed)
            index = [header.index(c) for c in needed]
            columns: Dict[str, List[Any]] = {c: [] for c in needed}
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < len(header):
                    raise DumpError(f"{path}:{line_no}: {len(row)} fields, header has {len(header)}")
                for c, i in zip(needed, index):
                    columns[c].append(row[i])
            return columns
        if fmt == "txt":
            (column,) = needed
            return {column: [line.strip() for line in f if line.strip()]}
        if fmt == "jsonl":
            records = []
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_json_object(json.loads(line), f"{path}:{line_no}"))
        else:
            data = json.load(f)
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                _check_columns(path, list(data), needed)
                return {c: data[c] for c in needed}
            if not isinstance(data, list):
                raise DumpError(f"{path}: expected a list of objects or an object of columns")
            records = [_json_object(r, f"{path}[{i}]") for i, r in enumerate(data)]
    if records:
        _check_columns(path, list(records[0]), needed)
    return {c: [r.get(c) for r in records] for c in needed}


def _json_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DumpError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_columns(path: str, available: Iterable[str], needed: List[str]) -> None:
    available = list(available)
    missing = [c for c in needed if c not in available]
    if missing:
        raise DumpError(f"{path}: missing column(s) {missing}; the file has {available}")


def _as_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="surrogateescape")
    return repair_undecodable(value if isinstance(value, str) else str(value))


def _clean_extra(value: Any) -> Any:
    if isinstance(value, str):
        return repair_undecodable(value)
    if isinstance(value, bytes):
        return _as_string(value)
    return value


def local_location(source: str, base_dir: str) -> str:
    """An absolute path for a local-dump entry: `file://` URLs are unquoted, relative paths joined to base_dir."""
    if source.startswith("file:"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise DumpError(f"{source}: file:// URL with a remote host")
        source = unquote(parts.path)
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(source)))


def read_dump(
    inputs: Sequence[str],
    source_col: str,
    caption_col: str | None,
    extra_cols: Sequence[str] = (),
    local: bool = False,
    base_dir: str | None = None,
) -> pa.Table:
    """Reads every dump file into one table: `source`, `caption`, extras..., `location` (None for URL dumps).

    For local dumps a relative path is resolved against `base_dir`, or against the folder of its dump file when
    `base_dir` is None.
    """
    files = expand_inputs(inputs)
    if not files:
        raise DumpError("no input files")
    tables = []
    for path in files:
        fmt = detect_format(path)
        if fmt == "txt" and (caption_col or extra_cols):
            raise DumpError(f"{path}: txt dumps hold one URL or path per line, no caption or extra columns")
        needed = list(dict.fromkeys([source_col] + ([caption_col] if caption_col else []) + list(extra_cols)))
        try:
            columns = _read_records(path, fmt, needed)
        except DumpError:
            raise
        except (OSError, ValueError, EOFError, csv.Error, pa.ArrowException) as e:
            raise DumpError(f"{path}: cannot read as {fmt}: {e}") from e
        sources = [_as_string(v).strip() for v in columns[source_col]]
        data: Dict[str, Any] = {
            "source": pa.array(sources, pa.string()),
            "caption": pa.array(
                [_as_string(v) for v in columns[caption_col]] if caption_col else [""] * len(sources), pa.string()
            ),
        }
        for col in extra_cols:
            values = [_clean_extra(v) for v in columns[col]]
            try:
                data[col] = pa.array(values)
            except (pa.ArrowException, TypeError, ValueError):
                data[col] = pa.array([None if v is None else str(v) for v in values], pa.string())
        if local:
            base = base_dir if base_dir is not None else os.path.dirname(path)
            data["location"] = pa.array([local_location(s, base) if s else "" for s in sources], pa.string())
        else:
            data["location"] = pa.nulls(len(sources), pa.string())
        tables.append(pa.table(data))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:  # an extra column with a different type in two files: keep it as text
        tables = [t.cast(pa.schema([pa.field(n, pa.string()) for n in t.column_names])) for t in tables]
        table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise DumpError(f"the dump has no rows ({len(files)} file(s): {', '.join(files[:3])}...)")
    return table
