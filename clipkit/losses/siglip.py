"""SigLIP's sigmoid pairwise loss (Zhai et al. 2023, https://arxiv.org/abs/2303.15343), as open_clip computes it."""

from __future__ import annotations

import torch
from torch import nn

from clipkit.distributed import rank_world


class SigLipLoss(nn.Module):
    """Sigmoid pairwise loss (SigLIP, Zhai et al. 2023, https://arxiv.org/abs/2303.15343): open_clip's SigLipLoss.

    A thin wrapper so training code does not pass rank/world_size: they are read from torch.distributed at every call
    (so constructing the loss before init_process_group is fine). Cross-rank text features travel by open_clip's
    neighbour exchange (`dist_impl`, default 'bidir'), with gradient.
    """

    def __init__(self, dist_impl: str | None = None):
        super().__init__()
        # Imported here: open_clip pulls in timm and torchvision, which importing clipkit.losses should not.
        from open_clip.loss import SigLipLoss as _OpenClipSigLipLoss

        self.loss = _OpenClipSigLipLoss(dist_impl=dist_impl)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """image_features, text_features: [B, D] float, L2-normalised, same B on every rank; logit_scale (already
        exponentiated) and logit_bias: 1-element or 0-dim float tensors. Returns a 0-dim tensor: this rank's loss,
        summed over its B x (W*B) pairs and divided by B, as in the paper."""
        self.loss.rank, self.loss.world_size = rank_world()
        return self.loss(image_features, text_features, logit_scale, logit_bias)
