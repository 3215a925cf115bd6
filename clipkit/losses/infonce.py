"""Symmetric InfoNCE (CLIP), plain or chunked, with hard-negative weighting and negatives beyond the batch.

CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) trains with a symmetric cross-entropy over the B x B
image-text similarity matrix. Across ranks clipkit uses open_clip's "local loss" formulation: every rank gathers all
features (with gradient) and computes its own B rows against all W*B columns, so no rank builds the W*B x W*B matrix.
`ContrastiveLoss()` is numerically open_clip's `ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`.

`ContrastiveLoss(chunk_size=K)` additionally never materialises the B x B (or B x W*B) logits: custom autograd
Functions (clipkit/losses/infonce_chunked.py) walk over K rows at a time, keep only O(B) logsumexp statistics, and
recompute each chunk of logits in backward to form softmax - onehot chunk by chunk (the recompute-instead-of-store
idea of FlashAttention, Dao et al. 2022, applied to the contrastive loss as in "Inf-CL", Cheng et al. 2024,
https://arxiv.org/abs/2410.17243). Peak extra memory drops from O(B^2) to O(K*B); see BENCHMARKS.md "Loss memory".
RECOMMENDED_CHUNK_SIZE is the default to use for training.

Beyond the in-batch loss (issue 11), each optional and combinable, plain and chunked, 1 or W processes:
- hard_negative_beta: HN-NCE (Radenovic et al. 2023, https://arxiv.org/abs/2301.02280), negatives re-weighted by
  w_ij = n_i exp(beta l_ij) / sum_k exp(beta l_ik) over row i's n_i negatives, gradients through the weights.
- image_queue / text_queue: [K, D] features of earlier batches (MoCo, He et al. 2020; ALBEF, Li et al. 2021) as
  extra columns without gradient: image->text rows see W*B batch texts + K queued texts, text->image rows W*B batch
  images + K queued images.
- text_negatives: per-row extra text columns for the image->text direction only (NegCLIP's perturbed captions,
  Yuksekgonul et al. 2023).
- caption_ids: columns whose caption id equals the row's (an identical caption of another sample, in the batch or in
  the queue) are left out of the denominator in both directions; they are false negatives.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipkit.distributed import gather_detached, gather_features, rank_world
from clipkit.losses.infonce_chunked import (
    _InfoNCERowsChunked,
    _logits,
    _NegativesTiled,
    _stats_dtype,
    _SymmetricInfoNCEChunked,
)

# The chunk size to train with (BENCHMARKS.md "Loss memory", D=512): on CPU float32 at B=16384 it needs ~5-6% of
# open_clip's extra memory and about half its time (16 idle cores); K=2048 was no faster and needs more. On a GPU,
# larger K (4096-8192) is slightly faster and still a few percent of open_clip's memory.
RECOMMENDED_CHUNK_SIZE = 1024


def caption_ids_from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B] int64 caption ids for duplicate masking: equal for rows with the same token ids, else (almost) never.

    tokens: [B, L] integer token ids (any device; read on the CPU). Each row's id is an 8-byte BLAKE2b digest of its
    int64 values without trailing zeros (pad id 0), stable across processes and runs (so a queue's ids stay comparable
    after a resume) and across pad widths (`clipkit.text_padding` cuts each rank's batch at its own longest caption);
    two different captions collide with probability ~2^-64. Returns a CPU tensor.
    """
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be [B, L] integer token ids, got {tokens.dtype} of shape {tuple(tokens.shape)}")
    rows = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    digests = [hashlib.blake2b(np.trim_zeros(row, "b").tobytes(), digest_size=8).digest() for row in rows]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.int64)


def duplicate_caption_mask(row_ids: torch.Tensor, col_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[B, N] bool, True where column j is a duplicate of row i's positive: same caption id, not the positive.

    row_ids: [B] int64 caption ids of this rank's pairs (e.g. hashes of their token ids); col_ids: [N] int64 ids of
    the columns, where column offset + i is row i's positive (the gathered batch, optionally followed by a queue's).
    These are the columns `ContrastiveLoss(...)(..., caption_ids=...)` leaves out of each row's denominator.
    """
    index = torch.arange(row_ids.shape[0], device=row_ids.device)
    duplicate = row_ids[:, None] == col_ids[None, :]
    duplicate[index, offset + index] = False
    return duplicate


def _caption_negative_logits(image: torch.Tensor, text_negatives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[B, M] logits scale * <image_i, text_negatives_im> in the statistics dtype, rounded as `_logits` rounds."""
    scaled = (image.to(_stats_dtype(image.dtype)) * scale).to(image.dtype)
    return torch.bmm(text_negatives, scaled[:, :, None]).squeeze(2).to(_stats_dtype(image.dtype))


def _negatives_plain(rows, cols, queue, extra_logits, logit_scale, row_ids, col_ids, queue_ids, offset, beta):
    """One direction of `_NegativesTiled`'s loss (same inputs and math), with the whole [B, N + K + M] logits."""
    scale = logit_scale.reshape(())
    logits, ids = _logits(rows, cols, scale), col_ids
    if queue is not None:
        logits = torch.cat([logits, _logits(rows, queue, scale)], dim=1)
        ids = None if col_ids is None else torch.cat([col_ids, queue_ids])
    index = torch.arange(rows.shape[0], device=rows.device)
    if extra_logits is not None:
        logits = torch.cat([logits, extra_logits], dim=1)
    duplicate = None
    if ids is not None:
        duplicate = duplicate_caption_mask(row_ids, ids, offset)
        if extra_logits is not None:
            duplicate = torch.cat([duplicate, torch.zeros_like(extra_logits, dtype=torch.bool)], dim=1)
    if not beta:  # InfoNCE over the columns left: cross-entropy, with duplicates (and excluded extras) at -inf
        if duplicate is not None:
            logits = logits.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(logits, offset + index)
    positives = logits[index, offset + index]
    negative = torch.isfinite(logits)
    negative[index, offset + index] = False
    if duplicate is not None:
        negative &= ~duplicate
    count = negative.sum(dim=1)
    # A row with no negative left gets finite stand-ins (its S is -inf below): keeps logsumexp's gradient finite.
    negatives = logits.masked_fill(~negative, float("-inf")).masked_fill((count == 0)[:, None], 0.0)
    log_weighted = count.to(logits.dtype).log() + torch.logsumexp((1.0 + beta) * negatives, dim=1)
    log_weighted = torch.where(count > 0, log_weighted - torch.logsumexp(beta * negatives, dim=1), float("-inf"))
    return (torch.logaddexp(positives, log_weighted) - positives).mean()


def _check_features(name: str, x: torch.Tensor | None, shape: tuple) -> None:
    """x must be None or have `shape` (None entries: any size)."""
    if x is not None and (x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape))):
        wanted = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{wanted}], got {tuple(x.shape)}")


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over image-text pairs, open_clip's ClipLoss(local_loss=True, gather_with_grad=True).

    chunk_size: None computes the plain B x (W*B) logits; an int K streams K rows at a time and never holds more than
    a [K, B] (or [K, W*B]) block, in forward or backward; with any of the options below it works on [K, K] tiles
    (queue columns included). Both paths give the same loss and gradients (tests/test_losses.py,
    tests/test_losses_negatives.py). RECOMMENDED_CHUNK_SIZE is the value to train with: measured single-process, it
    is faster than open_clip in float32 on CPU (~2x) and GPU (~1.2x) but ~1.5x slower than open_clip for bf16
    features on a GPU, where its unfused float32 elementwise passes over each chunk cost more than the bf16 matmuls
    (BENCHMARKS.md "Loss memory"). Multi-rank it runs 8 [B, W*B, D] matmuls to open_clip's 6 (the recompute).

    hard_negative_beta: HN-NCE's beta (>= 0; 0 = plain InfoNCE). Per direction, over the n_i negatives of row i
    (every column but the positive, minus duplicates when caption ids are given) with l_ij = scale * <x_i, y_j>:
        w_ij = n_i exp(beta l_ij) / sum_{k neg} exp(beta l_ik),
        loss_i = -log(exp(l_ii) / (exp(l_ii) + sum_{j neg} w_ij exp(l_ij))),
    averaged over rows, the two directions averaged; gradients flow through the weights. Without duplicates n_i is
    N - 1 for N columns: exactly issue 11's formula.
    """

    def __init__(self, chunk_size: int | None = None, hard_negative_beta: float = 0.0):
        super().__init__()
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not math.isfinite(hard_negative_beta) or hard_negative_beta < 0:
            raise ValueError(f"hard_negative_beta must be a finite number >= 0 (0 = off), got {hard_negative_beta!r}")
        self.chunk_size = chunk_size
        self.hard_negative_beta = float(hard_negative_beta)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        text_negatives: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        queue_caption_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of this rank's pairs.

        image_features, text_features: [B, D] float (float32/bf16/fp16/float64), L2-normalised by the model; the same
            B on every rank. Row i of each is pair i.
        logit_scale: 1-element or 0-dim float tensor, the already-exponentiated temperature (model.logit_scale.exp()).
        image_queue, text_queue: [K, D] float or None, L2-normalised features of earlier batches, the same on every
            rank (FeatureQueue.columns()); used detached, as extra columns of text->image (image_queue) and
            image->text (text_queue). K may be 0.
        text_negatives: [B, M, D] float or None, L2-normalised text features of M extra negatives per pair (e.g.
            perturbed captions), used for that pair's image->text row only, with gradient.
        caption_ids: [B] int64 or None, one id per pair that is equal for equal captions (e.g. a hash of its token
            ids). Given, every column whose id equals the row's, other than the positive itself, is left out of that
            row's denominator, in both directions (batch and queue columns; text_negatives are never left out).
        queue_caption_ids: [K] int64, the queue's caption ids; needed with caption_ids and a non-empty queue.
        Returns a 0-dim tensor in the statistics dtype (float32, or float64 for float64 inputs). Averaging it over
        ranks gives the loss of the global W*B batch (with the same queue on every rank).
        """
        if image_features.shape != text_features.shape or image_features.ndim != 2:
            raise ValueError(
                f"expected image and text features of the same [B, D] shape, got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must have one element, got shape {tuple(logit_scale.shape)}")
        batch, dim = image_features.shape
        for name, queue in (("image_queue", image_queue), ("text_queue", text_queue)):
            _check_features(name, queue, (None, dim))
        _check_features("text_negatives", text_negatives, (batch, None, dim))
        dtype = torch.promote_types(image_features.dtype, text_features.dtype)
        image, text = image_features.to(dtype), text_features.to(dtype)
        # Queues are constants (earlier batches' keys); an empty one (K = 0, before the first enqueue) is no queue.
        image_queue, text_queue = (
            None if q is None or q.shape[0] == 0 else q.detach().to(dtype) for q in (image_queue, text_queue)
        )
        if text_negatives is not None and text_negatives.shape[1] == 0:
            text_negatives = None
        self._check_ids(batch, caption_ids, queue_caption_ids, image_queue, text_queue)
        caption_ids, queue_caption_ids = (
            None if x is None else x.to(image.device) for x in (caption_ids, queue_caption_ids)
        )
        rank, world = rank_world()
        # Autocast off: the chunked Functions pick their own precision (matmuls in the feature dtype, statistics in
        # >= float32), and the plain path must match it.
        with torch.autocast(device_type=image.device.type, enabled=False):
            extras = (image_queue, text_queue, text_negatives, caption_ids)
            if self.hard_negative_beta or any(x is not None for x in extras):
                negatives = None if text_negatives is None else text_negatives.to(dtype)
                return self._with_negatives(
                    image, text, logit_scale, rank, image_queue, text_queue, negatives, caption_ids, queue_caption_ids
                )
            if world == 1:
                return self._single_process(image, text, logit_scale)
            return self._multi_rank(image, text, logit_scale, rank)

    @staticmethod
    def _check_ids(batch, caption_ids, queue_caption_ids, image_queue, text_queue) -> None:
        for name, ids in (("caption_ids", caption_ids), ("queue_caption_ids", queue_caption_ids)):
            if ids is not None and (ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex):
                raise ValueError(f"{name} must be a 1-d integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        _check_features("caption_ids", caption_ids, (batch,))
        queues = [q for q in (image_queue, text_queue) if q is not None]
        if caption_ids is None or not queues:
            return
        if queue_caption_ids is None:
            raise ValueError("caption_ids with a non-empty queue needs queue_caption_ids ([K] ids of the queue)")
        for queue in queues:
            _check_features("queue_caption_ids", queue_caption_ids, (queue.shape[0],))

    def _with_negatives(
        self, image, text, logit_scale, rank, image_queue, text_queue, text_negatives, caption_ids, queue_caption_ids
    ) -> torch.Tensor:
        all_image, all_text = gather_features(image), gather_features(text)
        all_ids = None if caption_ids is None else gather_detached(caption_ids)
        queue_ids = None if caption_ids is None else queue_caption_ids
        offset, beta = rank * image.shape[0], self.hard_negative_beta
        extra = None
        if text_negatives is not None:
            extra = _caption_negative_logits(image, text_negatives, logit_scale.reshape(()))
        directions = (
            (image, all_text, text_queue, extra),  # image->text: batch texts, text queue, caption negatives
            (text, all_image, image_queue, None),  # text->image: batch images, image queue
        )
        losses = []
        for rows, cols, queue, extra_logits in directions:
            args = (rows, cols, queue, extra_logits, logit_scale, caption_ids, all_ids, queue_ids, offset)
            if self.chunk_size is None:
                losses.append(_negatives_plain(*args, beta))
            else:
                losses.append(_NegativesTiled.apply(*args, self.chunk_size, beta))
        return 0.5 * (losses[0] + losses[1])

    def _single_process(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if self.chunk_size is not None:
            return _SymmetricInfoNCEChunked.apply(image, text, logit_scale, self.chunk_size)
        logits = _logits(image, text, logit_scale.reshape(()))
        labels = torch.arange(image.shape[0], device=image.device)
        # The text->image logits are the transpose: one matmul instead of open_clip's two.
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def _multi_rank(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, rank: int
    ) -> torch.Tensor:
        all_image, all_text = gather_features(image), gather_features(text)
        offset = rank * image.shape[0]
        if self.chunk_size is not None:
            image_to_text = _InfoNCERowsChunked.apply(image, all_text, logit_scale, offset, self.chunk_size)
            text_to_image = _InfoNCERowsChunked.apply(text, all_image, logit_scale, offset, self.chunk_size)
            return 0.5 * (image_to_text + text_to_image)
        scale = logit_scale.reshape(())
        labels = torch.arange(offset, offset + image.shape[0], device=image.device)
        return 0.5 * (
            F.cross_entropy(_logits(image, all_text, scale), labels)
            + F.cross_entropy(_logits(text, all_image, scale), labels)
        )
