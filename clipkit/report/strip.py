"""The retrieval strip: a trained model's top images for a few text queries and top captions for a few images, on a
small sample of an eval data set, plus zero-shot classification of that sample (confusion matrix, per-class recall).

The sample is `max_images` images spread evenly over an indexable data set (folder, csv, fashion-mnist: sorted by
class, so the first N would all be one class), or the first `max_images` of a streamed one (wds). Captions to rank are
the sample's own captions when the data set has them, else one prompt per class ("a photo of a {c}.").
"""

import base64
import io
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

CLASS_PROMPT = "a photo of a {c}."
THUMB_PX = 96


@dataclass
class Hit:
    index: int  # image index in the sample (text queries) or caption index (image queries)
    similarity: float  # cosine similarity
    correct: bool | None  # same class / the image's own caption; None when the query has no known answer


@dataclass
class Query:
    text: str | None  # a text query, or None for an image query
    image: int | None  # sample index of an image query
    hits: List[Hit]


@dataclass
class Strip:
    spec: str
    run_label: str
    thumbs: List[str]  # data URIs, one per sample image (only those shown are rendered)
    labels: List[str | None]  # class name per sample image
    captions: List[str]  # the caption pool image queries rank
    text_queries: List[Query]
    image_queries: List[Query]
    zeroshot: dict | None = None  # {"classnames", "matrix", "acc1", "n", "templates"} on the sample
    notes: List[str] = field(default_factory=list)


def thumbnail_uri(image, px: int = THUMB_PX) -> str:
    """A PIL image as a small JPEG data URI."""
    im = image.convert("RGB")
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_images(dataset, max_images: int) -> List[tuple]:
    """[(PIL image, label, captions or None)] of up to `max_images` readable images (see module doc)."""
    source = dataset.source
    source.transform = lambda im: im
    out = []
    if dataset.num_samples is not None:
        n = dataset.num_samples
        stride = max(1, n // max_images)
        for i in range(0, n, stride):
            image, label, captions, reason = source[i]
            if reason is None:
                out.append((image, label, captions))
            if len(out) >= max_images:
                break
    else:
        for image, label, captions, reason in source:
            if reason is None:
                out.append((image, label, captions))
            if len(out) >= max_images:
                break
    if not out:
        raise ValueError(f"{dataset.spec}: no readable images for the retrieval strip")
    return out


def _spread(keys: Sequence, count: int) -> List[int]:
    """Indices of up to `count` items with distinct keys first (one per class), in order."""
    seen, first, rest = set(), [], []
    for i, k in enumerate(keys):
        (rest if k in seen else first).append(i)
        seen.add(k)
    return (first + rest)[:count]


@torch.inference_mode()
def build_strip(loaded, dataset, run_label: str, queries: Sequence[str] | None = None, max_images: int = 200,
                n_queries: int = 4, top_k: int = 5, device: Any = "cpu", templates: str = "simple") -> Strip:
    """Ranks the sample for text queries (given, else class prompts or sample captions) and captions for images.

    loaded: a clipkit.eval.models.LoadedModel; dataset: a clipkit.eval.datasets.EvalDataset."""
    from clipkit.eval.features import encode_images, encode_texts

    samples = sample_images(dataset, max_images)
    names = dataset.classnames if dataset.has_labels else None
    labels = [names[lab] if names and 0 <= lab < len(names) else None for _, lab, _ in samples]
    images = torch.stack([loaded.preprocess(im) for im, _, _ in samples])
    image_feats = torch.cat([encode_images(loaded.model, images[i:i + 64], device).cpu()
                             for i in range(0, len(images), 64)])  # [N, D]
    if dataset.has_captions:
        captions, owner = [], []
        for i, (_, _, caps) in enumerate(samples):
            for c in caps or []:
                captions.append(c)
                owner.append(i)
        caption_class = None
    elif names:
        captions = [CLASS_PROMPT.format(c=c) for c in names]
        owner, caption_class = None, list(names)
    else:
        raise ValueError(f"{dataset.spec}: has neither captions nor class names: nothing to rank for the strip")
    caption_feats = encode_texts(loaded.model, loaded.tokenizer, captions, device).cpu()  # [T, D]

    def correct_caption(image: int, caption: int) -> bool | None:
        if owner is not None:
            return owner[caption] == image
        return labels[image] == caption_class[caption] if labels[image] is not None else None

    # Text queries: given ones (no known answer), else captions of images of distinct classes / class prompts.
    if queries:
        q_texts, q_answer = list(queries), [None] * len(queries)
    elif owner is not None:
        picks = _spread([labels[owner[j]] or owner[j] for j in range(len(captions))], n_queries)
        q_texts, q_answer = [captions[j] for j in picks], [("image", owner[j]) for j in picks]
    else:
        present = _spread(labels, len(labels))
        classes = list(dict.fromkeys(labels[i] for i in present if labels[i] is not None))[:n_queries]
        q_texts, q_answer = [CLASS_PROMPT.format(c=c) for c in classes], [("class", c) for c in classes]
    q_feats = encode_texts(loaded.model, loaded.tokenizer, q_texts, device).cpu() if q_texts else None
    text_queries = []
    for qi, text in enumerate(q_texts):
        sims = image_feats @ q_feats[qi]
        top = sims.topk(min(top_k, len(sims))).indices.tolist()
        answer = q_answer[qi]
        hits = [Hit(j, float(sims[j]), None if answer is None else
                    (j == answer[1] if answer[0] == "image" else labels[j] == answer[1])) for j in top]
        text_queries.append(Query(text, None, hits))

    image_queries = []
    for i in _spread(labels, n_queries):
        sims = caption_feats @ image_feats[i]
        top = sims.topk(min(3, len(sims))).indices.tolist()
        image_queries.append(Query(None, i, [Hit(j, float(sims[j]), correct_caption(i, j)) for j in top]))

    shown = {h.index for q in text_queries for h in q.hits} | {q.image for q in image_queries}
    thumbs = [thumbnail_uri(im) if i in shown else "" for i, (im, _, _) in enumerate(samples)]
    strip = Strip(dataset.spec, run_label, thumbs, labels, captions, text_queries, image_queries)
    if names and dataset.has_labels:
        strip.zeroshot = _zeroshot(loaded, names, dataset, image_feats, [lab for _, lab, _ in samples], device,
                                   templates)
    return strip


def _zeroshot(loaded, names, dataset, image_feats, sample_labels, device, templates: str) -> dict:
    from clipkit.eval.metrics import classification_metrics
    from clipkit.eval.templates import load_templates
    from clipkit.eval.zeroshot import build_zero_shot_classifier

    tmpl = load_templates(templates, dataset.templates)
    classifier = build_zero_shot_classifier(loaded.model, loaded.tokenizer, names, tmpl, device).cpu()  # [D, C]
    m = classification_metrics(image_feats @ classifier, torch.tensor(sample_labels))
    return {"classnames": list(names), "matrix": m["confusion"].tolist(), "acc1": m["acc1"], "n": m["n"],
            "templates": templates}
