"""Classification metrics, computed as CLIP_benchmark 1.6 computes them, and the confusion matrix outputs."""

import json
from pathlib import Path
from typing import Dict, Iterable, Sequence

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1,)) -> Dict[int, float]:
    """scores: [N, C], labels: [N] -> {k: fraction of rows whose label is among the k highest scores}
    (scikit-learn's top_k_accuracy_score)."""
    from sklearn.metrics import top_k_accuracy_score

    classes = list(range(scores.shape[1]))
    s, y = scores.double().numpy(), labels.numpy()
    return {k: float(top_k_accuracy_score(y, s, k=k, labels=classes)) if k > 1 else
            float((s.argmax(axis=1) == y).mean()) for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts: row = true class, column = predicted class (scikit-learn's confusion_matrix)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    cm = sk_confusion_matrix(labels.numpy(), preds.numpy(), labels=list(range(num_classes)))
    return torch.from_numpy(cm).long()


def mean_per_class_recall(labels: torch.Tensor, preds: torch.Tensor) -> float:
    """Mean over the classes present in the labels of (correct / count): scikit-learn's balanced_accuracy_score,
    which CLIP_benchmark reports as `mean_per_class_recall`."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # one class only: its recall is still well defined
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(balanced_accuracy_score(labels.numpy(), preds.numpy()))


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """scores: [N, C] logits or similarities, labels: [N] -> acc1, acc5 (with >= 5 classes), mean_per_class_recall,
    n, and the confusion matrix (a tensor, under `confusion`)."""
    num_classes = scores.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    acc = topk_accuracy(scores, labels, ks)
    preds = scores.argmax(dim=1)
    cm = confusion_matrix(preds, labels, num_classes)
    out = {"acc1": acc[1]}
    if 5 in acc:
        out["acc5"] = acc[5]
    out.update(mean_per_class_recall=mean_per_class_recall(labels, preds), n=int(len(labels)), confusion=cm)
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
