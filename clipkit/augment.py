"""Train-time image augmentations: open_clip's train transform with SimCLR's augmentations (issue 11).

SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709) found random resized crop + colour jitter (0.4, 0.4,
0.4, 0.1 at p = 0.8) + grayscale (p = 0.2) + Gaussian blur (p = 0.5) the augmentations that matter. Crop scale,
jitter and grayscale are open_clip's own `AugmentationCfg` (its `image_transform` builds the transform); blur, which
open_clip does not offer, is torchvision's GaussianBlur inserted before ToTensor. SLIP's two SSL views use SimCLR's
settings (`simclr_settings`) whatever the CLIP image's are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from torchvision import transforms as T

SIMCLR_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue


@dataclass(frozen=True)
class AugmentSettings:
    scale: Tuple[float, float] | None = None  # RandomResizedCrop scale (None: open_clip's default, (0.9, 1.0))
    color_jitter: float = 0.0  # probability of SimCLR's colour jitter
    grayscale: float = 0.0  # probability of grayscale
    blur: float = 0.0  # probability of a Gaussian blur (kernel ~10% of the image side, sigma 0.1-2.0)

    @property
    def is_default(self) -> bool:
        return self == AugmentSettings()


def simclr_settings() -> AugmentSettings:
    """SimCLR's augmentations: crop scale (0.08, 1), jitter p 0.8, grayscale p 0.2, blur p 0.5."""
    return AugmentSettings(scale=(0.08, 1.0), color_jitter=0.8, grayscale=0.2, blur=0.5)


def parse_scale(text: str | None) -> Tuple[float, float] | None:
    """'LO,HI' -> (lo, hi) with 0 < lo <= hi <= 1; ValueError naming the flag otherwise."""
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError as e:
        raise ValueError(f"--aug-scale must be LO,HI (e.g. 0.08,1.0), got {text!r}") from e
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--aug-scale needs 0 < LO <= HI <= 1, got {text!r}")
    return lo, hi


def train_transform(image_size, preprocess_cfg: Dict[str, Any], settings: AugmentSettings):
    """open_clip's train transform for `preprocess_cfg` (mean, std, interpolation, ...) with `settings` applied
    through its AugmentationCfg; a Gaussian blur goes in before ToTensor."""
    import open_clip

    aug: Dict[str, Any] = {}
    if settings.scale is not None:
        aug["scale"] = settings.scale
    if settings.color_jitter:
        aug.update(color_jitter=SIMCLR_JITTER, color_jitter_prob=settings.color_jitter)
    if settings.grayscale:
        aug["gray_scale_prob"] = settings.grayscale
    cfg = {k: preprocess_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color")
           if preprocess_cfg.get(k) is not None}
    import warnings

    with warnings.catch_warnings():  # open_clip warns about jitter/grayscale items it then applies all the same
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        transform = open_clip.image_transform(image_size, is_train=True, aug_cfg=aug or None, **cfg)
    if settings.blur:
        side = image_size if isinstance(image_size, int) else min(image_size)
        kernel = max(3, int(0.1 * side) // 2 * 2 + 1)  # odd, ~10% of the side (SimCLR)
        steps = list(transform.transforms)
        at = next(i for i, t in enumerate(steps) if isinstance(t, T.ToTensor))
        steps.insert(at, T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=settings.blur))
        transform = T.Compose(steps)
    return transform
