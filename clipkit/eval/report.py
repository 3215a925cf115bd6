"""Result files in CLIP_benchmark's schema, the stdout table, and merging many results into one CSV/markdown table.

A result: {"dataset", "model", "pretrained", "task", "metrics": {name: number}, "language"}, the keys CLIP_benchmark
1.6 writes (its `clip_benchmark build` reads ours), plus optional extras (e.g. "rejected": {reason: count}).
"""

import csv
import io
import json
import math
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

SCHEMA_KEYS = ("dataset", "model", "pretrained", "task", "metrics")
ID_COLUMNS = ("model", "pretrained", "dataset", "task")
OPTIONAL_ID_COLUMNS = ("templates", "train_dataset")  # shown when some result has them


def make_result(dataset: str, model: str, pretrained: str, task: str, metrics: Dict, **extra) -> Dict:
    """Keeps the scalar metrics (numbers; dicts and tensors go to extras or elsewhere)."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    result = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": scalars,
              "language": "en"}
    result.update(extra)
    return result


def write_result(result: Dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.1e}"
    return str(v)


def format_result(result: Dict) -> str:
    """A readable block: what was evaluated, then one metric per line."""
    lines = [f"{result['task']}: model {result['model']} ({result['pretrained']}) on {result['dataset']}"]
    width = max((len(k) for k in result["metrics"]), default=0)
    lines += [f"  {k.ljust(width)}  {_fmt(v)}" for k, v in result["metrics"].items()]
    rejected = result.get("rejected")
    if rejected:
        lines.append(f"  unreadable images skipped: {sum(rejected.values())} ({rejected})")
    return "\n".join(lines)


def iter_result_files(paths: Iterable[str]) -> Iterator[Tuple[Path, Dict]]:
    """(file, result) for each result JSON. A directory contributes every result *.json in it (sorted; other JSONs
    there, such as confusion matrices, are passed over); a file named explicitly must be a result. A missing file or
    malformed JSON is an error naming the file."""
    for p in paths:
        in_dir = Path(p).is_dir()
        if not in_dir and not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such result file or directory")
        for f in sorted(Path(p).glob("*.json")) if in_dir else [Path(p)]:
            try:
                with open(f, encoding="utf-8") as fh:
                    data = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
            if not isinstance(data, dict) or any(k not in data for k in SCHEMA_KEYS):
                if in_dir:
                    continue
                raise ValueError(f"{f}: not a result file (needs keys {', '.join(SCHEMA_KEYS)})")
            yield f, data


def load_results(paths: Iterable[str]) -> List[Dict]:
    """Reads result JSONs (see `iter_result_files`)."""
    return [data for _, data in iter_result_files(paths)]


def to_rows(results: Sequence[Dict]) -> tuple:
    """(columns, rows): the id columns, then every metric name in order of first appearance."""
    ids = list(ID_COLUMNS) + [c for c in OPTIONAL_ID_COLUMNS if any(c in r for r in results)]
    metric_cols: List[str] = []
    for r in results:
        metric_cols += [k for k in r["metrics"] if k not in metric_cols]
    rows = [{**{c: r.get(c, "") for c in ids}, **r["metrics"]} for r in results]
    return ids + metric_cols, rows


def to_csv(results: Sequence[Dict]) -> str:
    columns, rows = to_rows(results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(results: Sequence[Dict]) -> str:
    columns, rows = to_rows(results)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"
