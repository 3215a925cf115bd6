"""Settings of one filtering run (one field per command-line flag of data_prep/filter_shards.py)."""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List


class FilterError(ValueError):
    """Bad input or inconsistent settings; raised before any shard is written."""


@dataclass
class FilterConfig:
    input: str  # shard spec: brace-expanded tar paths (build_shards' or any WebDataset shards)
    output: str  # output folder: NAME.tar, NAME.parquet, NAME_stats.json, sizes.json, manifest.json, scores/
    model: str | None = None  # model SPEC for CLIP scores (as eval: run dir, final/, local-dir:DIR, name)
    pretrained: str | None = None  # weights for a model name
    min_clip_score: float | None = None  # drop samples whose cosine(image, caption) is below this
    top_fraction: float | None = None  # keep this fraction of the whole input's scored samples, highest first
    min_caption_words: int = 0  # DataComp's basic filter: > 2 words
    min_caption_chars: int = 0  # DataComp's basic filter: > 5 characters
    min_image_side: int = 0  # smaller side of the stored image, in pixels
    max_aspect_ratio: float = math.inf  # larger side / smaller side
    caption_language: List[str] = field(default_factory=list)  # ISO 639-1 codes to keep (py3langid), e.g. ["en"]
    scores_only: bool = False  # stop after writing scores/ (and the histogram)
    from_scores: str | None = None  # scores/ folder of an earlier run: no model, no re-embedding
    batch_size: int = 256  # images per forward
    threads: int = 4  # decode + preprocess threads while scoring
    device: str = "auto"  # auto (this rank's GPU when there is one) | cpu | cuda | cuda:N
    workers: int = 0  # writing processes (0: one per core; 1: in this process)
    distributor: str = "multiprocessing"  # writing: multiprocessing | ray
    ray_address: str | None = None
    progress: bool = True

    def validate(self) -> "FilterConfig":
        if self.from_scores and self.model:
            raise FilterError("give --model or --from-scores, not both (--from-scores reuses the scores it holds)")
        if self.scores_only and not self.model:
            raise FilterError("--scores-only needs --model (it writes the model's CLIP scores)")
        needs_scores = self.min_clip_score is not None or self.top_fraction is not None
        if needs_scores and not (self.model or self.from_scores):
            raise FilterError("--min-clip-score and --top-fraction need --model SPEC (or --from-scores DIR)")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise FilterError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.max_aspect_ratio < 1.0:
            raise FilterError(f"--max-aspect-ratio must be >= 1, got {self.max_aspect_ratio}")
        if min(self.min_caption_words, self.min_caption_chars, self.min_image_side) < 0:
            raise FilterError("--min-caption-words, --min-caption-chars and --min-image-side must be >= 0")
        if self.batch_size < 1 or self.threads < 1 or self.workers < 0:
            raise FilterError("--batch-size and --threads must be positive, --workers >= 0")
        if self.distributor not in ("multiprocessing", "ray"):
            raise FilterError("--distributor must be multiprocessing or ray")
        if self.from_scores and not os.path.isdir(self.from_scores):
            raise FilterError(f"--from-scores {self.from_scores}: no such folder (a --scores-only run's OUTPUT/scores)")
        return self

    @property
    def process_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def rule_settings(self) -> Dict[str, Any]:
        """The settings that decide what is kept (part of every output shard's fingerprint)."""
        names = ("min_clip_score top_fraction min_caption_words min_caption_chars min_image_side max_aspect_ratio "
                 "caption_language").split()
        settings = {n: getattr(self, n) for n in names}
        settings["max_aspect_ratio"] = str(self.max_aspect_ratio)
        return settings

    def to_json(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["max_aspect_ratio"] = str(self.max_aspect_ratio)
        return data
