"""Image <-> text retrieval recall@k, as CLIP_benchmark 1.6 defines it.

`image_retrieval_recall@k` (text -> image): the fraction of captions whose image is among the k images most similar
to it. `text_retrieval_recall@k` (image -> text): the fraction of images with at least one of their captions among the
k captions most similar to it. Images may have several captions.
"""

from typing import Any, Callable, Sequence

import torch
from torch import nn

from clipkit.eval.datasets import EvalDataset
from clipkit.eval.features import RejectCounter, encode_images, encode_texts, iterate_batches, unwrap

DEFAULT_KS = (1, 5, 10)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = DEFAULT_KS, chunk: int = 4096) -> dict:
    """image_features: [N, D], text_features: [T, D] (both L2-normalised), text_to_image: [T] int64 image index of
    each caption. Similarities are computed `chunk` rows at a time, so [T, N] is never held whole."""
    n_images, n_texts = len(image_features), len(text_features)
    hits_t2i = {k: 0 for k in ks}
    for start in range(0, n_texts, chunk):
        sims = text_features[start:start + chunk] @ image_features.T  # [t, N]
        top = sims.topk(min(max(ks), n_images), dim=1).indices
        match = top.eq(text_to_image[start:start + chunk, None])
        for k in ks:
            hits_t2i[k] += int(match[:, :k].any(dim=1).sum())
    hits_i2t = {k: 0 for k in ks}
    for start in range(0, n_images, chunk):
        sims = image_features[start:start + chunk] @ text_features.T  # [n, T]
        top = sims.topk(min(max(ks), n_texts), dim=1).indices
        own = torch.arange(start, start + len(sims))[:, None]
        match = text_to_image[top].eq(own)
        for k in ks:
            hits_i2t[k] += int(match[:, :k].any(dim=1).sum())
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = hits_t2i[k] / n_texts
        out[f"text_retrieval_recall@{k}"] = hits_i2t[k] / n_images
    return out


def run_retrieval(model: nn.Module, tokenizer: Callable, preprocess: Callable, dataset: EvalDataset,
                  ks: Sequence[int] = DEFAULT_KS, batch_size: int = 256, workers: int = 0, device: Any = "cpu",
                  max_samples: int | None = None, progress: bool = True) -> dict:
    """Encodes the images and their captions batch by batch (a batch's captions in one text forward, as
    CLIP_benchmark does), returns the recall@k metrics, n_images, n_texts and `rejected` ({reason: count})."""
    if not dataset.has_captions:
        raise ValueError(f"{dataset.spec}: has no captions: retrieval needs a caption column (csv) or txt (wds "
                         "with dataset_type.txt = retrieval)")
    model = unwrap(model)
    was_training = model.training
    model.eval()
    image_feats, text_feats, owner, rejects, n_images = [], [], [], RejectCounter(), 0
    try:
        loader = dataset.loader(preprocess, batch_size, workers, max_samples)
        for batch in iterate_batches(loader, max_samples, rejects, desc="retrieval", progress=progress):
            texts = [c for caps in batch.captions for c in caps or []]
            owner += [n_images + i for i, caps in enumerate(batch.captions) for _ in caps or []]
            n_images += len(batch.images)
            image_feats.append(encode_images(model, batch.images, device).cpu())
            if texts:
                text_feats.append(encode_texts(model, tokenizer, texts, device, batch_size=len(texts)).cpu())
    finally:
        model.train(was_training)
    if not image_feats:
        raise ValueError(f"{dataset.spec}: no readable images (rejected: {rejects.as_dict() or 'none'})")
    if not text_feats:
        raise ValueError(f"{dataset.spec}: no captions found")
    out = retrieval_recall(torch.cat(image_feats), torch.cat(text_feats), torch.tensor(owner), ks)
    out.update(n_images=n_images, n_texts=len(owner), rejected=rejects.as_dict())
    return out
