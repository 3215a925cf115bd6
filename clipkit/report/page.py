"""The report's HTML: one self-contained page (inline CSS, images as data URIs, no script, no external resource)."""

import html
import math
import statistics
from datetime import datetime, timezone
from typing import Dict, List, Sequence

from clipkit.report.charts import Chart
from clipkit.report.runs import EvalResult, Run
from clipkit.report.strip import Strip

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1320px;
       padding: 16px 24px 48px; color: #1b1f24; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd;
padding-bottom: 4px; } h3 { font-size: 14px; margin: 14px 0 6px; }
.muted { color: #667; font-size: 12px; } nav a { margin-right: 12px; font-size: 13px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0; }
th, td { border: 1px solid #d8dbe0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 10px; }
.grid img, .pair img { width: 100%; border: 1px solid #eee; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; align-items: start; }
.strip { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin-bottom: 8px; }
.query { width: 210px; font-size: 12.5px; font-weight: 600; padding-top: 4px; }
figure { margin: 0; width: 100px; font-size: 10.5px; text-align: center; }
figure img { width: 96px; height: 96px; object-fit: contain; border: 3px solid #bbb; background: #fafafa; }
figure.ok img { border-color: #2a9d3c; } figure.bad img { border-color: #d23c3c; }
.image-queries { display: flex; flex-wrap: wrap; gap: 14px; }
.image-query { width: 420px; } ol.caps { margin: 0; padding-left: 18px; font-size: 12.5px; }
.ok-t { color: #1d7a2d; } .bad-t { color: #b02a2a; }
pre { background: #f6f8fa; padding: 8px; font-size: 12px; overflow-x: auto; max-height: 480px; }
.note { background: #fff7e0; border: 1px solid #f0d890; padding: 4px 8px; font-size: 12.5px; margin: 4px 0; }
"""

e = html.escape


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
    return e(str(v))


def table(columns: Sequence[str], rows: Sequence[Dict], css_id: str = "") -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{fmt(v)}</td>' if num else f"<td>{fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{e(css_id)}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def run_overview(runs: Sequence[Run]) -> List[Dict]:
    """One row per run: steps, samples seen, losses, throughput, bad samples, final zero-shot top-1."""
    rows = []
    for r in runs:
        cfg = r.config or {}
        _, loss = r.series("loss")
        _, sps = r.series("samples_per_s")
        _, skipped = r.series("skipped")
        _, step_time = r.series("step_time")
        tail = loss[-max(1, len(loss) // 10):]
        per_step = (cfg.get("batch_size") or 0) * (cfg.get("grad_accum") or 1) * (cfg.get("world_size") or 1)
        acc = (r.summary or {}).get("zeroshot/acc1")
        rows.append({
            "run": r.label, "model": cfg.get("model", "?"), "steps": r.last_step,
            "of steps": cfg.get("steps", ""), "global batch": per_step or "",
            "samples seen": per_step * r.last_step if per_step else "",
            "final loss (last 10%)": statistics.fmean(tail) if tail else "",
            "min loss": min(loss) if loss else "",
            "median samples/s": statistics.median(sps) if sps else "",
            "train time (s)": sum(step_time) if step_time else "",
            "skipped samples": int(skipped[-1]) if skipped else 0,
            "non-finite steps": (r.summary or {}).get("nonfinite_steps", ""),
            "final zero-shot top-1": acc if acc is not None else "",
            "finished": "yes (final/)" if r.has_final else "no",
        })
    return rows


def _charts(charts: Sequence[Chart]) -> str:
    return "".join(f'<img class="chart" data-chart="{e(c.key)}" alt="{e(c.title)}" src="{c.uri}">' for c in charts)


def _figure(strip: Strip, index: int, hit_correct: bool | None, caption: str) -> str:
    cls = "" if hit_correct is None else ("ok" if hit_correct else "bad")
    return (f'<figure class="{cls}"><img alt="{e(strip.labels[index] or "image")}" src="{strip.thumbs[index]}">'
            f"<figcaption>{e(caption)}</figcaption></figure>")


def strip_html(strip: Strip) -> str:
    parts = [f"<h3>{e(strip.run_label)} on {e(strip.spec)}</h3>",
             f'<div class="muted">{len(strip.labels)} images sampled; green: same class / the image\'s own caption, '
             "red: not.</div>"]
    parts.append("<h3>text &rarr; images</h3>")
    for q in strip.text_queries:
        figs = "".join(_figure(strip, h.index, h.correct, f"{h.similarity:.3f} {strip.labels[h.index] or ''}")
                       for h in q.hits)
        parts.append(f'<div class="strip text-query"><div class="query">&ldquo;{e(q.text)}&rdquo;</div>{figs}</div>')
    parts.append('<h3>image &rarr; captions</h3><div class="image-queries">')
    for q in strip.image_queries:
        items = "".join(
            f'<li class="{"" if h.correct is None else ("ok-t" if h.correct else "bad-t")}">'
            f"{e(strip.captions[h.index])} <span class=\"muted\">{h.similarity:.3f}</span></li>" for h in q.hits)
        fig = _figure(strip, q.image, None, strip.labels[q.image] or "")
        parts.append(f'<div class="strip image-query">{fig}<ol class="caps">{items}</ol></div>')
    return "".join(parts) + "</div>"


def per_class_recall(classnames: Sequence[str], matrix: Sequence[Sequence[int]]) -> List[Dict]:
    """[{class, images, correct, recall}] from a confusion matrix (rows: true class), worst recall first."""
    rows = [{"class": name, "images": sum(row), "correct": row[i], "recall": row[i] / sum(row) if sum(row) else ""}
            for i, (name, row) in enumerate(zip(classnames, matrix))]
    return sorted(rows, key=lambda r: (r["recall"] == "", r["recall"] if r["recall"] != "" else 0))


def confusion_html(title: str, classnames: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Confusion matrix and per-class recall bars side by side, the recall numbers in a folded table below."""
    from clipkit.report.charts import confusion_chart, recall_chart

    cm, recall = confusion_chart(classnames, matrix, title), recall_chart(classnames, matrix, "per-class recall")
    rows = per_class_recall(classnames, matrix)
    return (f'<div class="confusion-block"><h3>{e(title)}</h3><div class="pair">'
            f'<img class="chart" data-chart="confusion" alt="confusion matrix" src="{cm.uri}">'
            f'<img class="chart" data-chart="recall" alt="per-class recall" src="{recall.uri}"></div>'
            f"<details><summary>per-class recall table ({len(rows)} classes)</summary>"
            f"{table(['class', 'images', 'correct', 'recall'], rows, '')}</details></div>")


def config_html(runs: Sequence[Run]) -> str:
    parts = []
    if len(runs) > 1:
        keys = []
        for r in runs:
            keys += [k for k in (r.config or {}) if k not in keys]
        differ = [k for k in keys if len({repr((r.config or {}).get(k)) for r in runs}) > 1]
        rows = [{"setting": k, **{r.label: str((r.config or {}).get(k, "")) for r in runs}} for k in differ]
        parts.append("<h3>settings that differ</h3>" + (table(["setting"] + [r.label for r in runs], rows,
                                                               "config-diff") if rows else "<p>none</p>"))
    for r in runs:
        text = r.config_text if r.config_text is not None else "(no config.yaml in this run)"
        parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>{e(r.label)}: {e(str(r.path))}/config.yaml"
                     f"</summary><pre class=\"config\">{e(text)}</pre></details>")
    return "".join(parts)


def render(runs: Sequence[Run], charts: Sequence[Chart], metric_columns: List[str], metric_rows: List[Dict],
           results: Sequence[EvalResult], confusions: Sequence[str], strips: Sequence[Strip],
           notes: Sequence[str]) -> str:
    """The whole page. `confusions`: confusion + recall blocks already rendered (see confusion_html)."""
    from clipkit.eval.report import to_rows

    title = "clipkit run report: " + ", ".join(r.label for r in runs)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head><body>",
           f"<h1>{e(title)}</h1><div class=\"muted\">written {now} by clipkit; runs: "
           + "; ".join(e(str(r.path)) for r in runs) + "</div>",
           '<nav><a href="#overview">overview</a><a href="#curves">curves</a><a href="#metrics">metrics</a>'
           '<a href="#classes">classes</a><a href="#retrieval">retrieval</a><a href="#config">config</a></nav>']
    out += [f'<div class="note">{e(n)}</div>' for n in notes]
    overview = run_overview(runs)
    out.append('<section id="overview"><h2>overview</h2>' + table(list(overview[0]), overview, "overview-table")
               + "</section>")
    out.append('<section id="curves"><h2>training curves</h2><div class="grid">' + _charts(charts) + "</div></section>")
    out.append('<section id="metrics"><h2>final metrics</h2>')
    if metric_rows:
        out.append(table(["dataset", "task", "metric"] + metric_columns, metric_rows, "metrics-table"))
    else:
        out.append("<p>no eval results: pass result JSONs from eval/*.py after the run dirs, or train with "
                   "--zeroshot-data</p>")
    if results:
        columns, rows = to_rows([r.data for r in results])
        out.append("<h3>result files (CLIP_benchmark schema)</h3>" + table(columns, rows, "results-table"))
        out += [f'<div class="note">{e(n)}</div>' for r in results for n in r.notes]
    out.append("</section>")
    out.append('<section id="classes"><h2>classes: confusion matrix and per-class recall</h2>'
               + ("".join(confusions) or "<p>no confusion matrix: pass a zero-shot result JSON (eval/zeroshot.py "
                  "writes OUT.confusion.json beside it) or --dataset with a labelled set</p>") + "</section>")
    out.append('<section id="retrieval"><h2>retrieval strip</h2>'
               + ("".join(strip_html(s) for s in strips) or "<p>no retrieval strip: needs a finished run (final/) "
                  "and an eval data set (--dataset SPEC, or the run's --zeroshot-data)</p>") + "</section>")
    out.append('<section id="config"><h2>resolved config</h2>' + config_html(runs) + "</section>")
    out.append("</body></html>\n")
    return "\n".join(out)
