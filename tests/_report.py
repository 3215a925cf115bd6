"""Helpers for the run-report tests: a run directory with known metrics, eval results, and reading the HTML back."""

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List

import yaml
from PIL import Image

CLASSNAMES = ["blue", "green", "red"]
CONFUSION = [[4, 0, 0], [1, 2, 1], [0, 0, 3]]  # recall: blue 1.0, green 0.5, red 1.0


def write_run(root: Path, steps: int = 40, lr: float = 1e-3, loss0: float = 4.0, skip_at: int = 20,
              zeroshot_every: int = 10, extra_config: Dict | None = None) -> Path:
    """A run dir as train/main.py leaves it (without final/): metrics.jsonl whose values follow known formulas,
    config.yaml and summary.json."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "epoch": 0, "loss": loss0 * math.exp(-s / 20), "lr": lr * min(1.0, s / 5),
               "logit_scale": math.log(1 / 0.07) + 0.01 * s, "samples_per_s": 100.0 + s,
               "data_time": 0.01, "step_time": 0.5, "skipped": 3 if s >= skip_at else 0, "nonfinite_steps": 0,
               "grad_norm": 1.0 + 1 / s}
        if zeroshot_every and s % zeroshot_every == 0 and s < steps:
            rec.update({"zeroshot/acc1": s / 100, "zeroshot/acc5": min(1.0, s / 50)})
        lines.append(rec)
    lines.append({"step": steps, "zeroshot/acc1": 0.61, "zeroshot/acc5": 0.9})  # finish()'s final eval
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = {"model": "clipkit-tiny", "train_data": "shards/{00000..00003}.tar", "batch_size": 16, "grad_accum": 1,
              "steps": steps, "lr": lr, "zeroshot_data": None, "world_size": 2, "zero_stage": 2,
              **(extra_config or {})}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "summary.json").write_text(json.dumps({"step": steps, "nonfinite_steps": 0, "zeroshot/acc1": 0.61,
                                                   "zeroshot/acc5": 0.9}))
    return root


def write_result(root: Path, model: str, pretrained: str, acc1: float = 0.75) -> Path:
    """A zero-shot result in CLIP_benchmark's schema plus its confusion matrix file, as eval/zeroshot.py writes
    them (the confusion path written relative to where the eval ran)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "zs.confusion.json").write_text(json.dumps({"classnames": CLASSNAMES, "rows": "true class",
                                                        "columns": "predicted class", "matrix": CONFUSION}))
    result = {"dataset": "folder:colors", "model": model, "pretrained": pretrained, "task": "zeroshot_classification",
              "metrics": {"acc1": acc1, "mean_per_class_recall": 0.8333, "n": 11}, "language": "en",
              "templates": "simple", "confusion_matrix": "results/zs.confusion.json"}
    path = root / "zs.json"
    path.write_text(json.dumps(result, indent=2))
    return path


class _Tables(HTMLParser):
    """Collects every <table id=...> as a list of rows (lists of cell texts), and every <img> attribute dict."""

    def __init__(self):
        super().__init__()
        self.tables: Dict[str, List[List[str]]] = {}
        self.images: List[Dict[str, str]] = []
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html_text: str) -> _Tables:
    p = _Tables()
    p.feed(html_text)
    return p


def table_dicts(rows: List[List[str]]) -> List[Dict[str, str]]:
    head, *body = rows
    return [dict(zip(head, r)) for r in body]


def chart_image(parsed: _Tables, key: str, index: int = 0) -> Image.Image:
    imgs = [i for i in parsed.images if i.get("data-chart") == key]
    uri = imgs[index]["src"]
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def colour_pixels(img: Image.Image, rgb: tuple, tol: int = 40) -> int:
    """Pixels within `tol` (per channel) of `rgb`: how much of a line in that colour the chart drew."""
    import numpy as np

    a = np.asarray(img, dtype=np.int16)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())
