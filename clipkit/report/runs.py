"""A training run and eval results as the report reads them, each file checked with an error that names it.

A run dir (train/main.py's --output-dir) holds `metrics.jsonl` (one JSON object per logged step: step, loss, lr,
logit_scale (log of the scale), samples_per_s, data_time, step_time, skipped, nonfinite_steps, grad_norm,
`zeroshot/acc1`, ...), `config.yaml` (the resolved TrainConfig), `summary.json` (when finished) and `final/` (the
open_clip export, when finished).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import yaml

from clipkit.eval.report import iter_result_files


@dataclass
class Run:
    path: Path
    label: str  # how the report names it (the directory name, made unique across compared runs)
    records: List[dict]  # metrics.jsonl lines, in file order
    config: dict | None = None  # config.yaml
    config_text: str | None = None
    summary: dict | None = None  # summary.json
    has_final: bool = False  # final/ holds an open_clip export

    def series(self, key: str) -> Tuple[List[int], List[float]]:
        """(steps, values) of the records that carry a finite number under `key`."""
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
                steps.append(int(r["step"]))
                values.append(float(v))
        return steps, values

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    @property
    def last_step(self) -> int:
        return max(int(r.get("step", 0)) for r in self.records)


@dataclass
class EvalResult:
    """One result JSON (CLIP_benchmark's schema) and, for zero-shot classification, its confusion matrix."""

    path: Path
    data: dict
    classnames: List[str] | None = None
    confusion: List[List[int]] | None = None  # rows: true class, columns: predicted
    notes: List[str] = field(default_factory=list)


def read_jsonl(path: Path) -> List[dict]:
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}): the file is not "
                             "what train/main.py writes (one JSON object per line)") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
        records.append(rec)
    return records


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def load_run(path, label: str | None = None) -> Run:
    """Reads a run dir; a missing dir, a missing or empty metrics.jsonl or malformed JSON/YAML is an error."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such run directory (pass a training run's --output-dir)")
    if not root.is_dir():
        raise ValueError(f"{path}: not a directory: pass a training run's --output-dir (eval JSONs go after the runs)")
    metrics = root / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: missing: {path} is not a training run directory, or its run has not "
                                "started logging yet")
    records = [r for r in read_jsonl(metrics) if "step" in r]
    if not records:
        raise ValueError(f"{metrics}: no metrics (empty file): the run has not logged a step yet")
    has_final = (root / "final" / "open_clip_config.json").is_file()
    run = Run(root, label or root.resolve().name, records, has_final=has_final)
    config = root / "config.yaml"
    if config.is_file():
        run.config_text = config.read_text(encoding="utf-8")
        try:
            run.config = yaml.safe_load(run.config_text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{config}: malformed YAML ({str(e).splitlines()[0]})") from e
    summary = root / "summary.json"
    if summary.is_file():
        run.summary = _read_json(summary)
    return run


def load_runs(paths: Sequence) -> List[Run]:
    """Reads every run dir; labels are the directory names, with the parent prepended where two would clash."""
    runs = [load_run(p) for p in paths]
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.path.resolve().parent.name}/{r.label}"
    for i, r in enumerate(runs):
        if [x.label for x in runs].count(r.label) > 1:
            r.label = f"{r.label} ({i + 1})"
    return runs


def _confusion_file(result_file: Path, written: str) -> Path | None:
    """The confusion JSON a result names: as written (relative to where eval ran), else beside the result file."""
    for candidate in (Path(written), result_file.parent / Path(written).name):
        if candidate.is_file():
            return candidate
    return None


def load_eval_results(paths: Sequence) -> List[EvalResult]:
    """Result JSONs (files or directories of them); a zero-shot result's confusion matrix is read when it is found."""
    results = []
    for f, data in iter_result_files([str(p) for p in paths]):
        res = EvalResult(Path(f), data)
        written = data.get("confusion_matrix")
        if written:
            cm_file = _confusion_file(Path(f), str(written))
            if cm_file is None:
                res.notes.append(f"confusion matrix {written} not found (neither as written nor beside {f})")
            else:
                cm = _read_json(cm_file)
                if not isinstance(cm, dict) or "matrix" not in cm or "classnames" not in cm:
                    raise ValueError(f"{cm_file}: not a confusion matrix file (needs 'classnames' and 'matrix')")
                res.classnames, res.confusion = list(cm["classnames"]), cm["matrix"]
        results.append(res)
    return results


def owner_label(result: EvalResult, runs: Sequence[Run]) -> str:
    """Which compared run an eval result belongs to: the run whose dir holds the evaluated weights, else the run
    whose name the result's `model` is; else the result's own model name."""
    pretrained = str(result.data.get("pretrained", ""))
    for r in runs:
        root = r.path.resolve()
        try:
            if pretrained and Path(pretrained).resolve().is_relative_to(root):
                return r.label
        except (OSError, ValueError):
            pass
    for r in runs:
        if result.data.get("model") == r.path.resolve().name:
            return r.label
    return str(result.data.get("model", "?"))


def metric_table(runs: Sequence[Run], results: Sequence[EvalResult]) -> Tuple[List[str], List[dict]]:
    """Side by side: one row per (dataset, task, metric), one column per run (or evaluated model). Training's own
    final zero-shot numbers (summary.json) come first, as task `zeroshot during training`."""
    columns: List[str] = []
    rows: Dict[tuple, dict] = {}

    def put(column: str, dataset: str, task: str, metric: str, value) -> None:
        if column not in columns:
            columns.append(column)
        rows.setdefault((dataset, task, metric), {})[column] = value

    for r in runs:
        for k, v in (r.summary or {}).items():
            if k.startswith("zeroshot/") and isinstance(v, (int, float)):
                dataset = (r.config or {}).get("zeroshot_data") or "?"
                put(r.label, str(dataset), "zeroshot during training", k[len("zeroshot/"):], v)
    for res in results:
        owner = owner_label(res, runs) if len(runs) > 1 else runs[0].label
        for k, v in res.data["metrics"].items():
            put(owner, str(res.data["dataset"]), str(res.data["task"]), k, v)
    out = [{"dataset": d, "task": t, "metric": m, **vals} for (d, t, m), vals in rows.items()]
    return columns, out
