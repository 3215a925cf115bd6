"""ALBEF's momentum distillation for the image-text contrastive loss (Li et al. 2021, arXiv 2107.07651, sec. 3.3).

Web captions are noisy: some "negatives" describe the image better than its own caption. ALBEF trains the online
model against soft targets made from a momentum (EMA) model's similarities, over the same columns (batch + queue):
    targets_ij = alpha * softmax_j(momentum_logits_i) + (1 - alpha) * onehot(positive_i)_j
    loss = mean_i -sum_j targets_ij log softmax_j(online_logits_i)          (ALBEF: alpha = 0.4)
which is linear in alpha: (1 - alpha) * InfoNCE + alpha * (the same with alpha = 1). So a run can keep the chunked
(and hard-negative weighted) ContrastiveLoss for the hard part and add `alpha * itc_distillation_loss(..., alpha=1)`.

These functions materialise the [B, W*B + K] logits of both models (no chunked path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.distributed import gather_detached, gather_features, rank_world
from clipkit.losses.infonce import duplicate_caption_mask


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1] (0 = hard targets only; ALBEF uses 0.4), got {alpha!r}")


def distillation_targets(
    momentum_logits: torch.Tensor, positives: torch.Tensor, alpha: float, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, N] soft targets `alpha * softmax(momentum_logits) + (1 - alpha) * onehot(positives)`, no gradient.

    momentum_logits: [B, N] float, scale * <momentum row i, momentum column j>; positives: [B] int64, row i's
    positive column; exclude: [B, N] bool or None, columns left out (duplicate captions): they get target 0 and
    the softmax runs over the others. Rows sum to 1.
    """
    _check_alpha(alpha)
    logits = momentum_logits.detach()
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    onehot = F.one_hot(positives, logits.shape[1]).to(logits.dtype)
    return alpha * logits.softmax(dim=1) + (1.0 - alpha) * onehot


def momentum_distillation_loss(
    online_logits: torch.Tensor,
    momentum_logits: torch.Tensor,
    positives: torch.Tensor,
    alpha: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """One direction: mean_i -sum_j targets_ij log softmax_j(online_logits_i), targets from distillation_targets.

    online_logits: [B, N] float with gradient; momentum_logits: [B, N] over the same columns (detached here);
    positives: [B] int64; exclude: [B, N] bool or None (left out of both softmaxes). alpha = 0 is InfoNCE
    (cross-entropy with the positives). Returns a 0-dim tensor in online_logits' dtype.
    """
    if online_logits.shape != momentum_logits.shape or online_logits.ndim != 2:
        raise ValueError(
            f"online and momentum logits must have the same [B, N] shape, got {tuple(online_logits.shape)} and "
            f"{tuple(momentum_logits.shape)}"
        )
    targets = distillation_targets(momentum_logits, positives, alpha, exclude).to(online_logits.dtype)
    if exclude is not None:
        online_logits = online_logits.masked_fill(exclude, float("-inf"))
    log_probs = online_logits.log_softmax(dim=1)
    if exclude is not None:
        log_probs = log_probs.masked_fill(exclude, 0.0)  # target 0 there; avoids 0 * -inf
    return -(targets * log_probs).sum(dim=1).mean()


def itc_distillation_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    momentum_image: torch.Tensor,
    momentum_text: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float,
    *,
    image_queue: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    caption_ids: torch.Tensor | None = None,
    queue_caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both directions of ALBEF's distilled contrastive loss for this rank's pairs, averaged.

    image_features, text_features: [B, D] float, L2-normalised online features (with gradient); momentum_image,
    momentum_text: [B, D] the momentum model's features of the same pairs (no gradient); logit_scale: 1 element,
    exponentiated, used for both models (ALBEF shares the temperature). image_queue, text_queue: [K, D] or None, the
    queues' momentum features (FeatureQueue.columns()). Image->text rows see [W*B online texts, text queue] online
    and [W*B momentum texts, text queue] for the targets; text->image likewise with images. caption_ids: [B] int64
    and queue_caption_ids: [K] int64 or None: duplicate captions are excluded as in ContrastiveLoss. Batch columns
    are gathered over ranks (online with gradient). Returns a 0-dim tensor; alpha = 0 gives ContrastiveLoss()'s
    value with the same columns.
    """
    if (image_queue is None) != (text_queue is None):
        raise ValueError("itc_distillation_loss needs both queues (image_queue and text_queue) or neither")
    if caption_ids is not None and image_queue is not None and queue_caption_ids is None:
        raise ValueError("caption_ids with a queue needs queue_caption_ids ([K] ids of the queue)")
    rank, _ = rank_world()
    offset, batch, scale = rank * image_features.shape[0], image_features.shape[0], logit_scale.reshape(())
    positives = torch.arange(offset, offset + batch, device=image_features.device)
    exclude = None
    if caption_ids is not None:
        caption_ids = caption_ids.to(image_features.device)
        col_ids = gather_detached(caption_ids)
        if image_queue is not None:
            col_ids = torch.cat([col_ids, queue_caption_ids.to(col_ids.device)])
        exclude = duplicate_caption_mask(caption_ids, col_ids, offset)
    losses = []
    for rows, cols, momentum_rows, momentum_cols, queue in (
        (image_features, text_features, momentum_image, momentum_text, text_queue),
        (text_features, image_features, momentum_text, momentum_image, image_queue),
    ):
        online_cols, key_cols = gather_features(cols), gather_detached(momentum_cols)
        if queue is not None:
            queue = queue.detach().to(online_cols.dtype)
            online_cols, key_cols = torch.cat([online_cols, queue]), torch.cat([key_cols, queue])
        with torch.no_grad():
            momentum_logits = scale * momentum_rows.detach() @ key_cols.T
        online_logits = scale * rows @ online_cols.T
        losses.append(momentum_distillation_loss(online_logits, momentum_logits, positives, alpha, exclude))
    return 0.5 * (losses[0] + losses[1])
