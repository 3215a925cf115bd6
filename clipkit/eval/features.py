"""Batched encoding of images and texts with a frozen model."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.eval.datasets import Batch, EvalDataset


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model inside DDP / DeepSpeed / accelerate wrappers (they keep it as `.module`)."""
    while not hasattr(model, "encode_image") and hasattr(model, "module"):
        model = model.module
    return model


def as_float(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 outputs to float32; float64 (used by the reference tests) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class RejectCounter:
    """Counts unreadable samples by reason (reported in results, never a crash)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reasons: Sequence[str]) -> None:
        self.counts.update(reasons)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))


def iterate_batches(loader, max_samples: int | None = None, rejects: RejectCounter | None = None,
                    desc: str = "images", progress: bool = True) -> Iterator[Batch]:
    """Yields batches with at least one readable image, cut so that at most `max_samples` images come out."""
    from tqdm import tqdm

    total = None
    if hasattr(loader.dataset, "__len__"):
        total = len(loader.dataset) if max_samples is None else min(max_samples, len(loader.dataset))
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            if rejects is not None:
                rejects.add(batch.rejected)
            if batch.images is None:
                continue
            if max_samples is not None and seen + len(batch.images) > max_samples:
                keep = max_samples - seen
                batch = Batch(batch.images[:keep], batch.labels[:keep], batch.captions[:keep], [])
            seen += len(batch.images)
            bar.update(len(batch.images))
            yield batch
            if max_samples is not None and seen >= max_samples:
                break


@torch.inference_mode()
def encode_images(model: nn.Module, images: torch.Tensor, device: Any = "cpu") -> torch.Tensor:
    """images: [B, 3, H, W] -> [B, D] float32, L2-normalised."""
    model = unwrap(model)
    x = images.to(device=device, dtype=model_dtype(model), non_blocking=True)
    return F.normalize(as_float(model.encode_image(x)), dim=-1)


@torch.inference_mode()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: List[str], device: Any = "cpu",
                 batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """texts: N strings -> [N, D] float32 (float64 for a float64 model), L2-normalised; `batch_size` texts per
    forward."""
    from tqdm import tqdm

    model = unwrap(model)
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", unit="batch", disable=not progress or len(starts) < 2, leave=False):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        out.append(F.normalize(as_float(model.encode_text(tokens)), dim=-1))
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class ImageFeatures:
    features: torch.Tensor  # [N, D] float32, L2-normalised, on CPU
    labels: torch.Tensor  # [N] int64 (NO_LABEL where none)
    captions: List[List[str] | None]
    rejects: RejectCounter
    spec: str  # the resolved dataset spec


def extract_features(model: nn.Module, dataset: EvalDataset, preprocess: Callable, batch_size: int = 256,
                     workers: int = 0, device: Any = "cpu", max_samples: int | None = None,
                     progress: bool = True, desc: str = "encode") -> ImageFeatures:
    """Encodes every readable image of `dataset` (frozen model, eval mode restored afterwards)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    feats, labels, captions, rejects = [], [], [], RejectCounter()
    try:
        loader = dataset.loader(preprocess, batch_size, workers, max_samples)
        for batch in iterate_batches(loader, max_samples, rejects, desc=desc, progress=progress):
            feats.append(encode_images(model, batch.images, device).cpu())
            labels.append(batch.labels)
            captions.extend(batch.captions)
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"{dataset.spec}: no readable images (rejected: {rejects.as_dict() or 'none'})")
    return ImageFeatures(torch.cat(feats), torch.cat(labels), captions, rejects, dataset.spec)


def labelled_features(loaded, train_spec: str, test_spec: str, batch_size: int = 256, workers: int = 0,
                      device: Any = "cpu", max_train_samples: int | None = None, max_samples: int | None = None,
                      progress: bool = True) -> tuple:
    """Features of a labelled train and test set (for the linear probe and kNN): (train, test, num_classes)."""
    from clipkit.eval.datasets import build_dataset

    train_ds, test_ds = build_dataset(train_spec), build_dataset(test_spec)
    for ds in (train_ds, test_ds):
        if not ds.has_labels:
            raise ValueError(f"{ds.spec}: has no class labels")
    if train_ds.classnames and test_ds.classnames and train_ds.classnames != test_ds.classnames:
        raise ValueError(f"{train_spec} and {test_spec} have different classes")
    kw = dict(batch_size=batch_size, workers=workers, device=device, progress=progress)
    train = extract_features(loaded.model, train_ds, loaded.preprocess, max_samples=max_train_samples,
                             desc="train features", **kw)
    test = extract_features(loaded.model, test_ds, loaded.preprocess, max_samples=max_samples,
                            desc="test features", **kw)
    names = train_ds.classnames or test_ds.classnames
    num_classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    for split, feats in (("train", train), ("test", test)):
        if int(feats.labels.min()) < 0 or int(feats.labels.max()) >= num_classes:
            raise ValueError(f"{split} labels out of range for {num_classes} classes")
    return train, test, num_classes
