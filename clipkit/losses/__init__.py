"""Contrastive and auxiliary losses, one idea per module.

- infonce: symmetric InfoNCE (CLIP), plain and chunked (`ContrastiveLoss`, `RECOMMENDED_CHUNK_SIZE`).
- siglip: SigLIP's sigmoid loss (`SigLipLoss`).

`build_loss` picks the loss of a model family by name.
"""

from __future__ import annotations

from torch import nn

from clipkit.losses.infonce import RECOMMENDED_CHUNK_SIZE, ContrastiveLoss, duplicate_caption_mask
from clipkit.losses.siglip import SigLipLoss

__all__ = [
    "LOSS_NAMES",
    "RECOMMENDED_CHUNK_SIZE",
    "ContrastiveLoss",
    "SigLipLoss",
    "build_loss",
    "duplicate_caption_mask",
]

LOSS_NAMES = ("clip", "siglip")


def build_loss(name: str, chunk_size: int | None = None) -> nn.Module:
    """The loss for a model family: "clip" -> ContrastiveLoss(chunk_size), "siglip" -> SigLipLoss()."""
    if name == "clip":
        return ContrastiveLoss(chunk_size=chunk_size)
    if name == "siglip":
        if chunk_size is not None:
            raise ValueError("chunk_size applies to the 'clip' loss only; SigLIP's open_clip loss is not chunked")
        return SigLipLoss()
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
