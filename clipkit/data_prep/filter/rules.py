"""What is kept: DataComp's basic rules and CLIP-score thresholds, decided over the whole input at once.

Each sample gets `kept` and, when dropped, the first rule it fails, in this order: unusable image
(`bad_image`) or empty caption (`no_caption`), `min_caption_chars`, `min_caption_words`, `caption_language`,
`min_image_side`, `max_aspect_ratio`, `min_clip_score`, `top_fraction`. --top-fraction F keeps the round(F x N)
highest-scoring of the N scored samples of the whole input (ties broken by input order), like DataComp's "top 30% by
CLIP score" over the pool, so F is exact; a sample must also pass every other rule.
"""

import math
from typing import Any, Dict, List, Sequence

import numpy as np

from clipkit.data_prep.filter.config import FilterConfig, FilterError


def caption_languages(captions: Sequence[str | None]) -> List[str | None]:
    """ISO 639-1 code per caption (py3langid: langid.py's 97-language model, offline, a numpy file loaded with
    allow_pickle=False; about 7k captions/s)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as e:
        raise FilterError("--caption-language needs py3langid: pip install py3langid") from e
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    return [identifier.classify(c)[0] if c else None for c in captions]


def decide(rows: List[Dict[str, Any]], config: FilterConfig) -> Dict[str, Any]:
    """Sets `kept`, `drop_reason`, `caption_words`, `caption_chars` (and `language`) on every row, in place;
    returns {"top_fraction_cut": the lowest score kept by --top-fraction, "kept": count}."""
    languages = caption_languages([r["caption"] for r in rows]) if config.caption_language else None
    allowed = set(config.caption_language)
    for i, r in enumerate(rows):
        caption = r["caption"] or ""
        r["caption_words"] = len(caption.split())
        r["caption_chars"] = len(caption)
        if languages is not None:
            r["language"] = languages[i]
        r["drop_reason"] = _first_failed_rule(r, config, allowed)
    cut = None
    if config.top_fraction is not None:
        scored = [i for i, r in enumerate(rows) if r["clip_score"] is not None]
        keep = math.floor(config.top_fraction * len(scored) + 0.5)
        order = sorted(scored, key=lambda i: (-rows[i]["clip_score"], i))
        for i in order[keep:]:
            if rows[i]["drop_reason"] is None:
                rows[i]["drop_reason"] = "top_fraction"
        cut = rows[order[keep - 1]]["clip_score"] if keep > 0 else None
    for r in rows:
        r["kept"] = r["drop_reason"] is None
    return {"top_fraction_cut": cut, "kept": sum(r["kept"] for r in rows)}


def _first_failed_rule(r: Dict[str, Any], config: FilterConfig, allowed: set) -> str | None:
    if r["image_error"] is not None:
        return "bad_image"
    if not r["caption"]:
        return "no_caption"
    if r["caption_chars"] < config.min_caption_chars:
        return "min_caption_chars"
    if r["caption_words"] < config.min_caption_words:
        return "min_caption_words"
    if allowed and r.get("language") not in allowed:
        return "caption_language"
    width, height = r["width"], r["height"]
    if min(width, height) < config.min_image_side:
        return "min_image_side"
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        return "max_aspect_ratio"
    scored = config.min_clip_score is not None or config.top_fraction is not None
    if scored and r["clip_score"] is None:
        return "bad_image"
    if config.min_clip_score is not None and r["clip_score"] < config.min_clip_score:
        return "min_clip_score"
    return None


def otsu_threshold(scores: Sequence[float], bins: int = 256) -> float | None:
    """Otsu's threshold: the cut that maximises the between-class variance of the scores' histogram, i.e. the
    valley between a low mode (mismatched pairs) and a high one (matching pairs). None for < 2 distinct scores."""
    values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    if len(values) < 2 or values.min() == values.max():
        return None
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centers)
    total, total_mean = weight[-1], mean[-1]
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    between = np.zeros_like(w0, dtype=np.float64)
    m0 = np.divide(mean[:-1], w0, out=np.zeros_like(between), where=valid)
    m1 = np.divide(total_mean - mean[:-1], w1, out=np.zeros_like(between), where=valid)
    between[valid] = w0[valid] * w1[valid] * (m0[valid] - m1[valid]) ** 2
    # an empty gap between the modes gives a plateau of equal maxima: cut in its middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return float(edges[int(best[len(best) // 2]) + 1])


def plot_histogram(scores: Sequence[float], path: str, thresholds: Dict[str, float | None], title: str = "") -> None:
    """Histogram of the CLIP scores with each named threshold as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [s for s in scores if s is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist(values, bins=100, color="#4c72b0")
    styles = {"suggested (Otsu)": ("green", "--"), "--min-clip-score": ("red", "-"),
              "--top-fraction cut": ("purple", "-.")}
    for name, value in thresholds.items():
        if value is not None:
            color, style = styles.get(name, ("black", ":"))
            ax.axvline(value, color=color, linestyle=style, label=f"{name} = {value:.4f}")
    ax.set_xlabel("CLIP score: cosine(image embedding, caption embedding)")
    ax.set_ylabel("samples")
    ax.set_title(title or f"CLIP scores of {len(values)} samples")
    if any(v is not None for v in thresholds.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
