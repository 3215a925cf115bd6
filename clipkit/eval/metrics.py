"""Classification metrics, computed as CLIP_benchmark 1.6 computes them, and the confusion matrix outputs."""

import json
from pathlib import Path
from typing import Dict, Iterable, Sequence

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1,)) -> Dict[int, float]:
    """scores: [N, C], labels: [N] -> {k: fraction of rows whose label is among the k highest scores}."""
    ks = list(ks)
    top = scores.topk(max(ks), dim=1, largest=True, sorted=True).indices  # [N, kmax]
    hit = top.eq(labels.view(-1, 1))
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_per_class_recall(cm: torch.Tensor) -> float:
    """Mean over the classes present in the labels of (correct / count): sklearn's balanced_accuracy_score, which
    CLIP_benchmark reports as `mean_per_class_recall`."""
    support = cm.sum(dim=1)
    present = support > 0
    recall = cm.diag()[present].double() / support[present].double()
    return recall.mean().item()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """scores: [N, C] logits or similarities, labels: [N] -> acc1, acc5 (with >= 5 classes), mean_per_class_recall,
    n, and the confusion matrix (a tensor, under `confusion`)."""
    num_classes = scores.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    acc = topk_accuracy(scores, labels, ks)
    cm = confusion_matrix(scores.argmax(dim=1), labels, num_classes)
    out = {"acc1": acc[1]}
    if 5 in acc:
        out["acc5"] = acc[5]
    out.update(mean_per_class_recall=mean_per_class_recall(cm), n=int(len(labels)), confusion=cm)
    return out


def confusion_figure(cm: torch.Tensor, classnames: Sequence[str]):
    """A matplotlib Figure of the row-normalised confusion matrix (counts written in the cells up to 20 classes)."""
    from matplotlib.figure import Figure

    n = len(classnames)
    size = min(4 + 0.45 * n, 40)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    row_sum = cm.sum(dim=1, keepdim=True).clamp(min=1)
    frac = (cm.double() / row_sum).numpy()
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), labels=list(classnames), rotation=90)
        ax.set_yticks(range(n), labels=list(classnames))
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def save_confusion(cm: torch.Tensor, classnames: Sequence[str], prefix: str) -> Dict[str, str]:
    """Writes PREFIX.json ({classnames, matrix: rows true, columns predicted}) and PREFIX.png; returns both paths."""
    prefix_path = Path(prefix)
    prefix_path.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = f"{prefix}.json", f"{prefix}.png"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"classnames": list(classnames), "rows": "true class", "columns": "predicted class",
                   "matrix": cm.tolist()}, f)
    confusion_figure(cm, classnames).savefig(png_path, dpi=100)
    return {"json": json_path, "png": png_path}
