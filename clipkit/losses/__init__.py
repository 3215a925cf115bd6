"""Contrastive and auxiliary losses, one idea per module.

- infonce: symmetric InfoNCE (CLIP), plain and chunked, with hard-negative weighting (HN-NCE), queue columns,
  per-row caption-negative columns and duplicate-caption masking (`ContrastiveLoss`, `RECOMMENDED_CHUNK_SIZE`,
  `duplicate_caption_mask`, `caption_ids_from_tokens`); the chunked kernels live in infonce_chunked.
- siglip: SigLIP's sigmoid loss (`SigLipLoss`).
- queue: the FIFO image/text feature queue of MoCo / ALBEF (`FeatureQueue`).
- distill: ALBEF's momentum distillation (`itc_distillation_loss`, `momentum_distillation_loss`,
  `distillation_targets`).
- ssl: SLIP's SimCLR term (`NTXentLoss`, `SimCLRHead`).

`build_loss` picks the contrastive loss of a model family by name.
"""

from __future__ import annotations

from torch import nn

from clipkit.losses.distill import distillation_targets, itc_distillation_loss, momentum_distillation_loss
from clipkit.losses.infonce import (
    RECOMMENDED_CHUNK_SIZE,
    ContrastiveLoss,
    caption_ids_from_tokens,
    duplicate_caption_mask,
)
from clipkit.losses.queue import FeatureQueue
from clipkit.losses.siglip import SigLipLoss
from clipkit.losses.ssl import NTXentLoss, SimCLRHead

__all__ = [
    "LOSS_NAMES",
    "RECOMMENDED_CHUNK_SIZE",
    "ContrastiveLoss",
    "FeatureQueue",
    "NTXentLoss",
    "SigLipLoss",
    "SimCLRHead",
    "build_loss",
    "caption_ids_from_tokens",
    "distillation_targets",
    "duplicate_caption_mask",
    "itc_distillation_loss",
    "momentum_distillation_loss",
]

LOSS_NAMES = ("clip", "siglip")


def build_loss(name: str, chunk_size: int | None = None, hard_negative_beta: float = 0.0) -> nn.Module:
    """The loss for a model family: "clip" -> ContrastiveLoss(chunk_size, hard_negative_beta), "siglip" ->
    SigLipLoss() (which takes neither option)."""
    if name == "clip":
        return ContrastiveLoss(chunk_size=chunk_size, hard_negative_beta=hard_negative_beta)
    if name == "siglip":
        if chunk_size is not None:
            raise ValueError("chunk_size applies to the 'clip' loss only; SigLIP's open_clip loss is not chunked")
        if hard_negative_beta:
            raise ValueError("hard_negative_beta applies to the 'clip' loss only (HN-NCE reweights InfoNCE)")
        return SigLipLoss()
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
