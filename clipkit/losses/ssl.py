"""SLIP's image-image term: SimCLR's NT-Xent over two augmented views of each image (Mu et al. 2021, arXiv 2112.12750).

SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709): each of the 2N views of a global batch of N images is
a row whose positive is the other view of the same image and whose negatives are the other 2N - 2 views, logits
cos / tau. As in SLIP's SIMCLRLoss, every rank gathers both views' embeddings (with gradient) and computes its own
2B rows against all 2W*B columns, so the mean of the rank losses is the global loss. SLIP uses tau = 0.1 and adds
the term with weight 1 to the CLIP loss, on embeddings from a small MLP head on the image tower (SimCLRHead) that is
trained with the model but not part of the exported CLIP model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.distributed import gather_features, rank_world


class SimCLRHead(nn.Module):
    """The projection MLP of the SSL term: Linear(in_dim, hidden_dim) -> LayerNorm -> ReLU -> Linear(-, out_dim).

    SLIP's head is 3 layers with BatchNorm (4096 wide, 256 out, for ViT-B). LayerNorm here instead: it normalises
    each sample on its own, so the loss does not depend on how the global batch is split over ranks (BatchNorm
    would need SyncBatchNorm, which torch runs on CUDA only) and 1 and W processes compute the same thing.
    Input [B, in_dim] float (e.g. the image features), output [B, out_dim] (NTXentLoss normalises it).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_dim] -> [B, out_dim]."""
        return self.mlp(x)


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross-entropy over two views, SLIP's SIMCLRLoss.

    temperature: tau > 0 (SLIP: 0.1), fixed (its own; not the CLIP logit scale).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"SSL temperature must be a finite number > 0 (SLIP uses 0.1), got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """Loss of this rank's 2B views.

        view_a, view_b: [B, D] float embeddings of two augmentations of the same B images (row i of each is image i),
        any scale (L2-normalised here), the same B on every rank. Returns a 0-dim tensor in at least float32: the
        mean over this rank's 2B rows of -log softmax(positive) against the 2W*B - 1 other views; averaging it over
        ranks gives the loss of the global batch.
        """
        if view_a.shape != view_b.shape or view_a.ndim != 2:
            raise ValueError(
                f"expected two views of the same [B, D] shape, got {tuple(view_a.shape)} and {tuple(view_b.shape)}"
            )
        dtype = torch.promote_types(torch.promote_types(view_a.dtype, view_b.dtype), torch.float32)
        with torch.autocast(device_type=view_a.device.type, enabled=False):
            q_a, q_b = F.normalize(view_a.to(dtype), dim=-1), F.normalize(view_b.to(dtype), dim=-1)
            k_a, k_b = gather_features(q_a), gather_features(q_b)
            rank, _ = rank_world()
            batch = q_a.shape[0]
            labels = torch.arange(rank * batch, (rank + 1) * batch, device=q_a.device)
            self_mask = F.one_hot(labels, k_a.shape[0]).bool()  # a view is not its own negative
            losses = []
            for rows, same_view, other_view in ((q_a, k_a, k_b), (q_b, k_b, k_a)):
                positives_and_cross = rows @ other_view.T / self.temperature
                same = (rows @ same_view.T / self.temperature).masked_fill(self_mask, float("-inf"))
                losses.append(F.cross_entropy(torch.cat([positives_and_cross, same], dim=1), labels))
            return 0.5 * (losses[0] + losses[1])
