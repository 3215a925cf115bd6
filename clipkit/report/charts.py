"""The report's pictures: matplotlib figures rendered to PNG data URIs (base64), so the HTML needs no other file.

Figures are `matplotlib.figure.Figure` objects (no pyplot state), so nothing here touches a global backend.
"""

import base64
import io
import math
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from clipkit.report.runs import Run

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Chart:
    key: str  # stable id: loss, lr, logit_scale, samples_per_s, skipped, zeroshot, grad_norm, data_wait, memory
    title: str
    uri: str  # data:image/png;base64,...


def png_uri(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def smooth(values: Sequence[float], window: int) -> List[float]:
    """Exponential moving average with the span of `window` points, bias-corrected at the start."""
    if window <= 1:
        return list(values)
    alpha = 2.0 / (window + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _figure(width: float = 6.0, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("step")
    return fig, ax


def _finish(fig, ax, runs: Sequence[Run], title: str) -> None:
    ax.set_title(title, fontsize=10)
    if len(runs) > 1 or len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()


def _line_chart(runs: Sequence[Run], key: str, title: str, ylabel: str, logy: bool = False) -> Chart | None:
    if not any(r.has(key) for r in runs):
        return None
    fig, ax = _figure()
    for i, r in enumerate(runs):
        steps, values = r.series(key)
        if steps:
            ax.plot(steps, values, color=COLORS[i % len(COLORS)], label=r.label, lw=1.4)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _finish(fig, ax, runs, title)
    return Chart(key, title, png_uri(fig))


def loss_chart(runs: Sequence[Run]) -> Chart:
    """Raw per-step loss (faint) and its moving average (solid), one colour per run."""
    fig, ax = _figure()
    for i, r in enumerate(runs):
        steps, values = r.series("loss")
        color = COLORS[i % len(COLORS)]
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(values, max(1, len(values) // 40)), color=color, lw=1.6, label=r.label)
    ax.set_ylabel("contrastive loss")
    _finish(fig, ax, runs, "training loss (faint: per step; solid: moving average)")
    return Chart("loss", "loss", png_uri(fig))


def logit_scale_chart(runs: Sequence[Run]) -> Chart | None:
    """metrics.jsonl logs the learnable log-scale s; plotted: the scale exp(s), temperature 1/exp(s) on the right."""
    if not any(r.has("logit_scale") for r in runs):
        return None
    title = "logit scale exp(s) (right axis: temperature 1/exp(s))"
    fig, ax = _figure()
    for i, r in enumerate(runs):
        steps, values = r.series("logit_scale")
        ax.plot(steps, [math.exp(v) for v in values], color=COLORS[i % len(COLORS)], label=r.label, lw=1.4)
    ax.set_ylabel("logit scale")
    def inverse(x):
        return 1.0 / np.maximum(np.asarray(x, dtype=float), 1e-9)

    ax.secondary_yaxis("right", functions=(inverse, inverse)).set_ylabel("temperature")
    _finish(fig, ax, runs, title)
    return Chart("logit_scale", title, png_uri(fig))


def zeroshot_chart(runs: Sequence[Run]) -> Chart | None:
    keys = [k for k in ("zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall")
            if any(r.has(k) for r in runs)]
    if not keys:
        return None
    fig, ax = _figure()
    styles = {"zeroshot/acc1": "-", "zeroshot/acc5": "--", "zeroshot/mean_per_class_recall": ":"}
    for i, r in enumerate(runs):
        for k in keys:
            steps, values = r.series(k)
            if steps:
                name = k.split("/", 1)[1]
                ax.plot(steps, [100 * v for v in values], styles[k], marker="o", ms=3, color=COLORS[i % len(COLORS)],
                        label=f"{r.label}: {name}" if len(runs) > 1 else name)
    ax.set_ylabel("%")
    _finish(fig, ax, runs, "zero-shot accuracy during training")
    return Chart("zeroshot", "zero-shot accuracy", png_uri(fig))


def data_wait_chart(runs: Sequence[Run]) -> Chart | None:
    """Share of each step spent waiting for the loader (data_time / step_time)."""
    if not any(r.has("data_time") and r.has("step_time") for r in runs):
        return None
    fig, ax = _figure()
    for i, r in enumerate(runs):
        pairs = [(x["step"], x["data_time"] / x["step_time"]) for x in r.records
                 if isinstance(x.get("data_time"), (int, float)) and x.get("step_time")]
        if pairs:
            ax.plot(*zip(*pairs), color=COLORS[i % len(COLORS)], label=r.label, lw=1.0)
    ax.set_ylabel("data wait / step time")
    _finish(fig, ax, runs, "share of each step spent waiting for data")
    return Chart("data_wait", "data wait", png_uri(fig))


def curve_charts(runs: Sequence[Run]) -> List[Chart]:
    """Every curve the runs logged, overlaid across runs: loss, lr, logit scale/temperature, samples/s, skipped
    samples, zero-shot accuracy, grad norm, data-wait share, peak GPU memory."""
    charts = [
        loss_chart(runs),
        _line_chart(runs, "lr", "learning rate", "lr"),
        logit_scale_chart(runs),
        _line_chart(runs, "samples_per_s", "throughput (global samples/s)", "samples/s"),
        _line_chart(runs, "skipped", "skipped samples (bad data, cumulative, all ranks)", "samples"),
        zeroshot_chart(runs),
        _line_chart(runs, "grad_norm", "gradient norm (before clipping)", "norm", logy=True),
        data_wait_chart(runs),
        _line_chart(runs, "peak_mem_gb", "peak GPU memory (rank 0)", "GiB"),
    ]
    return [c for c in charts if c is not None]


def recall_chart(classnames: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> Chart:
    """Horizontal bars of per-class recall (diagonal / row sum), worst class at the top; classes without images
    (no recall) are left out and counted in the title."""
    recalls = sorted((row[i] / sum(row), name) for i, (row, name) in enumerate(zip(matrix, classnames)) if sum(row))
    absent = len(classnames) - len(recalls)
    if absent:
        title = f"{title} ({absent} classes without images left out)"
    fig, ax = _figure(6.0, max(2.0, 0.25 * len(recalls) + 1.0))
    ax.set_xlabel("recall (%)")
    ax.barh(range(len(recalls)), [100 * v for v, _ in recalls], color=COLORS[0])
    ax.set_yticks(range(len(recalls)), labels=[n for _, n in recalls], fontsize=7)
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return Chart("recall", title, png_uri(fig))


def confusion_chart(classnames: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> Chart:
    import torch

    from clipkit.eval.metrics import confusion_figure

    fig = confusion_figure(torch.tensor(matrix), classnames)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return Chart("confusion", title, png_uri(fig, dpi=80))
