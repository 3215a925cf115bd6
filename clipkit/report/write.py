"""write_run_report: run dirs (+ eval result JSONs) -> one self-contained HTML file. Called by eval/report_html.py and
at the end of every training run (`write_report_after_training`, which never raises)."""

import logging
import os
from pathlib import Path
from typing import Any, List, Sequence

from clipkit.report.charts import curve_charts
from clipkit.report.page import confusion_html, render
from clipkit.report.runs import EvalResult, Run, load_eval_results, load_runs, metric_table, owner_label
from clipkit.report.strip import Strip, build_strip

log = logging.getLogger("clipkit.report")


def _known_dataset(runs: Sequence[Run], results: Sequence[EvalResult]) -> str | None:
    """The eval set the runs or results name: a run's --zeroshot-data, else a result's dataset spec."""
    for r in runs:
        spec = (r.config or {}).get("zeroshot_data")
        if spec:
            return str(spec)
    for res in results:
        spec = str(res.data.get("dataset", ""))
        if ":" in spec:
            return spec
    return None


def _strips(runs: Sequence[Run], spec: str, queries, max_images: int, device: Any) -> List[Strip]:
    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.models import load_model

    dataset = build_dataset(spec)
    strips = []
    for r in runs:
        if not r.has_final:
            continue
        templates = str((r.config or {}).get("zeroshot_templates") or "simple")
        loaded = load_model(str(r.path), device=device)
        strips.append(build_strip(loaded, dataset, r.label, queries, max_images, device=device, templates=templates))
    return strips


def _confusions(runs: Sequence[Run], results: Sequence[EvalResult], strips: Sequence[Strip]) -> List[str]:
    """Confusion matrix + recall bars of every zero-shot result that has one; for a run without one, those of the
    strip's sample."""
    blocks, covered = [], set()
    for res in results:
        if res.confusion is None:
            continue
        owner = owner_label(res, runs) if len(runs) > 1 else runs[0].label
        covered.add(owner)
        acc = res.data["metrics"].get("acc1")
        title = f"{owner}: {res.data['task']} on {res.data['dataset']}" + (f", top-1 {acc:.1%}" if acc is not None
                                                                              else "")
        blocks.append(confusion_html(title, res.classnames, res.confusion))
    for s in strips:
        z = s.zeroshot
        if z is None or s.run_label in covered:
            continue
        title = (f"{s.run_label}: zero-shot on the {z['n']} sampled images of {s.spec} (templates {z['templates']}), "
                 f"top-1 {z['acc1']:.1%}")
        blocks.append(confusion_html(title, z["classnames"], z["matrix"]))
    return blocks


def write_run_report(run_dirs: Sequence, eval_jsons: Sequence = (), out_path=None, dataset: str | None = None,
                     queries: Sequence[str] | None = None, max_images: int = 200, device: Any = "cpu",
                     strip: bool = True) -> Path:
    """Writes the report of one run, or of several side by side (curves overlaid, metrics in columns).

    dataset: eval set SPEC for the retrieval strip (see clipkit.eval.datasets); when given, a failure to use it is an
    error. Without it, the run's --zeroshot-data (or an eval result's dataset) is used when it resolves, and a
    failure only leaves a note in the report. out_path: default RUN/report.html for one run, ./report.html for
    several. Returns the path written."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = load_runs(run_dirs)
    results = load_eval_results(eval_jsons)
    notes: List[str] = []
    strips: List[Strip] = []
    spec = dataset or _known_dataset(runs, results)
    if strip and spec and any(r.has_final for r in runs):
        if dataset:
            strips = _strips(runs, spec, queries, max_images, device)
        else:
            try:
                strips = _strips(runs, spec, queries, max_images, device)
            except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
                notes.append(f"retrieval strip skipped: eval set {spec}: {e}")
    columns, rows = metric_table(runs, results)
    page = render(runs, curve_charts(runs), columns, rows, results, _confusions(runs, results, strips), strips, notes)
    out = Path(out_path) if out_path else (runs[0].path / "report.html" if len(runs) == 1 else Path("report.html"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def write_report_after_training(run_dir, device: Any = "cpu") -> Path | None:
    """RUN/report.html at the end of a training run (the retrieval strip on the run's --zeroshot-data, if any).
    Never raises: a failure is logged as a warning, the training run's result stands."""
    try:
        path = write_run_report([run_dir], out_path=Path(run_dir) / "report.html", device=device)
    except Exception as e:  # noqa: BLE001 -- the report must never fail the run it reports on
        log.warning("could not write the run report in %s: %s: %s", run_dir, type(e).__name__, e)
        return None
    log.info("run report: %s", path)
    return path
