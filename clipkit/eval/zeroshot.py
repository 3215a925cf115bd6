"""Zero-shot classification: class embeddings from prompts, images scored against them.

The classifier is open_clip's `build_zero_shot_classifier`: each prompt embedding L2-normalised, averaged per class,
the average re-normalised (tested against open_clip to 1e-6). Unlike open_clip's, it also takes per-class prompt
lists of different lengths (CuPL) and batches texts across classes.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.eval.datasets import Batch, EvalDataset, build_dataset, check_label_range
from clipkit.eval.features import RejectCounter, encode_images, encode_texts, iterate_batches, unwrap
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.templates import Templates, class_prompts, load_templates

# Resized images are cached across calls (training evaluates the same set every N steps) up to this size.
IMAGE_CACHE_BYTES = 512 * 2**20


def build_zero_shot_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                               templates: Templates, device: Any = "cpu", batch_size: int = 256,
                               progress: bool = False) -> torch.Tensor:
    """Returns [D, C] class embeddings (columns L2-normalised), float32 (float64 for a float64 model).

    templates: `{c}` template strings, or a {classname: [prompts]} dict (CuPL)."""
    prompts = class_prompts(templates, classnames)
    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([i for i, ps in enumerate(prompts) for _ in ps], device=device)
    emb = encode_texts(model, tokenizer, flat, device, batch_size, progress)  # [P, D], normalised
    sums = torch.zeros(len(prompts), emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, owner, emb)
    counts = torch.tensor([len(ps) for ps in prompts], dtype=emb.dtype, device=emb.device)
    return F.normalize(sums / counts[:, None], dim=-1).T


def zero_shot_scores(model: nn.Module, classifier: torch.Tensor, batches, device: Any = "cpu",
                     classnames: Sequence[str] | None = None, spec: str = "") -> tuple:
    """Cosine similarities [N, C] of each image to each class, and labels [N], from an iterable of Batch."""
    scores, labels = [], []
    for batch in batches:
        if classnames is not None:
            check_label_range(batch.labels, classnames, spec)
        feats = encode_images(model, batch.images, device)
        scores.append((feats @ classifier.to(feats.dtype)).cpu())
        labels.append(batch.labels)
    if not scores:
        raise ValueError(f"{spec}: no readable images")
    return torch.cat(scores), torch.cat(labels)


def _require_classification(dataset: EvalDataset) -> None:
    if not dataset.has_labels:
        raise ValueError(f"{dataset.spec}: has no class labels (a retrieval set?): zero-shot classification needs them")
    if not dataset.classnames:
        raise ValueError(f"{dataset.spec}: has no class names: pass --classnames FILE (one name per line)")


def run_zeroshot(model: nn.Module, tokenizer: Callable, preprocess: Callable, dataset: EvalDataset,
                 templates: Union[str, Templates] = "auto", batch_size: int = 256, workers: int = 0,
                 device: Any = "cpu", max_samples: int | None = None, progress: bool = True) -> dict:
    """Zero-shot classification of `dataset`: returns acc1, acc5 (>= 5 classes), mean_per_class_recall, n,
    `confusion` ([C, C] tensor) and `rejected` ({reason: count} of unreadable images)."""
    _require_classification(dataset)
    if isinstance(templates, str):
        templates = load_templates(templates, dataset.templates)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        classifier = build_zero_shot_classifier(model, tokenizer, dataset.classnames, templates, device,
                                                progress=progress)
        rejects = RejectCounter()
        loader = dataset.loader(preprocess, batch_size, workers, max_samples)
        batches = iterate_batches(loader, max_samples, rejects, desc="zero-shot", progress=progress)
        scores, labels = zero_shot_scores(model, classifier, batches, device, dataset.classnames, dataset.spec)
    finally:
        model.train(was_training)
    out = classification_metrics(scores, labels)
    out["rejected"] = rejects.as_dict()
    return out


@dataclass
class _Cached:
    """A data set's images after `preprocess`, kept in memory for repeated evaluation during training."""

    preprocess: Callable
    images: torch.Tensor  # [N, 3, H, W] float32
    labels: torch.Tensor  # [N] int64
    rejects: RejectCounter


_DATASETS: Dict[tuple, EvalDataset] = {}
_IMAGES: Dict[tuple, _Cached] = {}


def _cached_images(dataset: EvalDataset, key: tuple, preprocess: Callable, batch_size: int,
                   max_samples: int | None) -> _Cached | None:
    hit = _IMAGES.get(key)
    if hit is not None:
        return hit
    count = dataset.num_samples if max_samples is None else min(max_samples, dataset.num_samples)
    per_image = _sample_bytes(dataset, preprocess)
    if per_image is None or count * per_image > IMAGE_CACHE_BYTES:
        return None
    rejects = RejectCounter()
    batches = list(iterate_batches(dataset.loader(preprocess, batch_size, 0, max_samples), max_samples, rejects,
                                   progress=False))
    if not batches:
        raise ValueError(f"{dataset.spec}: no readable images (rejected: {rejects.as_dict()})")
    cached = _Cached(preprocess, torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]),
                     rejects)
    _IMAGES[key] = cached  # holds `preprocess`, so its id() in the key cannot be reused while cached
    return cached


def _sample_bytes(dataset: EvalDataset, preprocess: Callable) -> int | None:
    """Bytes of one preprocessed image (from the first readable of the first few samples)."""
    source = dataset.source
    source.transform = preprocess
    for i in range(min(len(source), 16)):
        image = source[i][0]
        if image is not None:
            return image.numel() * image.element_size()
    return None


def evaluate_zeroshot(model: nn.Module, tokenizer: Callable, preprocess: Callable, dataset_spec: str,
                      templates: Union[str, Templates] = "simple", classnames=None, batch_size: int = 256,
                      device: Any = "cpu", max_samples: int | None = None) -> dict:
    """Zero-shot top-1/top-5 of `model` on a dataset SPEC, for the training loop.

    Takes a plain open_clip model (or one wrapped by DDP/DeepSpeed: `.module` is unwrapped); restores its train/eval
    mode. The data set is resolved once per (spec, classnames); for an indexable set (folder, csv, fashion-mnist) whose
    preprocessed images fit in IMAGE_CACHE_BYTES, those images are kept, so later calls only run the model (a wds set
    is streamed again on every call). Returns {"acc1", "acc5" (>= 5 classes), "mean_per_class_recall", "n"}, plus
    "rejected" (count of unreadable images) when there were any.
    """
    names_key = tuple(classnames) if isinstance(classnames, (list, tuple)) else classnames
    ds_key = (dataset_spec, names_key)
    if ds_key not in _DATASETS:
        _DATASETS[ds_key] = build_dataset(dataset_spec, classnames)
    dataset = _DATASETS[ds_key]
    _require_classification(dataset)
    if isinstance(templates, str):
        templates = load_templates(templates, dataset.templates)
    cached = None
    if dataset.num_samples is not None:
        cached = _cached_images(dataset, ds_key + (max_samples, id(preprocess)), preprocess, batch_size, max_samples)
    if cached is None:
        out = run_zeroshot(model, tokenizer, preprocess, dataset, templates, batch_size, 0, device, max_samples,
                           progress=False)
        rejected = sum(out.pop("rejected").values())
    else:
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        try:
            classifier = build_zero_shot_classifier(inner, tokenizer, dataset.classnames, templates, device)
            batches = (Batch(cached.images[i:i + batch_size], cached.labels[i:i + batch_size], [])
                       for i in range(0, len(cached.labels), batch_size))
            scores, labels = zero_shot_scores(inner, classifier, batches, device, dataset.classnames, dataset.spec)
        finally:
            inner.train(was_training)
        out = classification_metrics(scores, labels)
        rejected = cached.rejects.total
    out.pop("confusion")
    if rejected:
        out["rejected"] = rejected
    return out
