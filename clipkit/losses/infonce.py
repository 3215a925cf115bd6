"""Symmetric InfoNCE (CLIP) with an optional memory-efficient chunked path.

CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) trains with a symmetric cross-entropy over the B x B
image-text similarity matrix. Across ranks clipkit uses open_clip's "local loss" formulation: every rank gathers all
features (with gradient) and computes its own B rows against all W*B columns, so no rank builds the W*B x W*B matrix.
`ContrastiveLoss()` is numerically open_clip's `ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)`.

`ContrastiveLoss(chunk_size=K)` additionally never materialises the B x B (or B x W*B) logits: a custom autograd
Function walks over K rows at a time, keeps only O(B) logsumexp statistics, and recomputes each chunk of logits in
backward to form softmax - onehot chunk by chunk (the recompute-instead-of-store idea of FlashAttention, Dao et al.
2022, applied to the contrastive loss as in "Inf-CL", Cheng et al. 2024, https://arxiv.org/abs/2410.17243).
Peak extra memory drops from O(B^2) to O(K*B); see BENCHMARKS.md "Loss memory". RECOMMENDED_CHUNK_SIZE is the default
to use for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.distributed import gather_features, rank_world

# The chunk size to train with (BENCHMARKS.md "Loss memory", D=512): on CPU float32 at B=16384 it needs ~5-6% of
# open_clip's extra memory and about half its time (16 idle cores); K=2048 was no faster and needs more. On a GPU,
# larger K (4096-8192) is slightly faster and still a few percent of open_clip's memory.
RECOMMENDED_CHUNK_SIZE = 1024


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics are accumulated in at least float32 (like FlashAttention does for bf16 matmuls): summing
    # thousands of exp() terms in bf16/fp16 would lose the loss to rounding.
    return torch.promote_types(dtype, torch.float32)


def _mm_stats(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in the statistics dtype (into `out` when given) for inputs of any float dtype; not differentiable.

    bf16/fp16 operands keep the fast low-precision matmul; on CUDA its float32 accumulator is written out directly
    (out_dtype) instead of being rounded to bf16 first, which costs each logit of magnitude ~14 up to 0.06.
    """
    stats_dtype = _stats_dtype(a.dtype)
    if a.dtype == stats_dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=stats_dtype, out=out)
    product = torch.mm(a, b).to(stats_dtype)  # CPU has no out_dtype matmul for bf16/fp16
    return product if out is None else out.copy_(product)


def _logits(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None):
    """[k, D] x [N, D] -> [k, N] logits `scale * rows @ cols.T` in the statistics dtype, into `out` when given.

    The scale is folded into the k x D operand (cheaper than scaling k x N), which is also exactly how open_clip
    evaluates `logit_scale * image_features @ text_features.T` (left to right), so the roundings match. The product
    is taken in the statistics dtype before rounding to the feature dtype, as open_clip under autocast does: rounding
    the scale itself to bf16 (1/0.07 -> 14.3125) would bias every logit by 0.2%.
    """
    scaled_rows = (rows.to(_stats_dtype(rows.dtype)) * scale).to(rows.dtype)
    if out is None:  # the plain path differentiates through this, and out_dtype matmuls have no autograd formula
        return torch.mm(scaled_rows, cols.T).to(_stats_dtype(rows.dtype))
    return _mm_stats(scaled_rows, cols.T, out=out)


def _row_chunks(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk_size: int):
    """Yields (start, stop, logits) with logits = scale * rows[start:stop] @ cols.T, [stop - start, N].

    Every chunk is a view of ONE buffer allocated here, overwritten by the next chunk (callers may scribble on it):
    reusing it rather than allocating K x N per chunk avoids re-faulting fresh pages each time, which on CPU costs
    as much as the elementwise work, and keeps the allocator from fragmenting.
    """
    batch = rows.shape[0]
    buffer = torch.empty(min(chunk_size, batch), cols.shape[0], dtype=_stats_dtype(rows.dtype), device=rows.device)
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        yield start, stop, _logits(rows[start:stop], cols, scale, out=buffer[: stop - start])


def _row_logsumexp(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 of [k, N] logits using scratch ([>= k, N]) for the exp, so no [k, N] allocation."""
    row_max = logits.amax(dim=1, keepdim=True)
    exps = torch.sub(logits, row_max, out=scratch[: logits.shape[0]]).exp_()
    return exps.sum(dim=1).log_().add_(row_max.squeeze(1))


def _backprop_chunk(
    grad_logits: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    grad_rows_out: torch.Tensor,
    grad_cols_unscaled: torch.Tensor,
) -> torch.Tensor:
    """Backward of one [k, N] chunk `logits = scale * rows @ cols.T`, given G = d loss / d logits ([k, N]).

    Writes d/d rows = scale * G @ cols into grad_rows_out ([k, D]), adds G.T @ rows into grad_cols_unscaled ([N, D]
    in the statistics dtype; the caller multiplies by scale once at the end) and returns this chunk's d/d scale
    = sum(G * rows @ cols.T) = sum((G @ cols) * rows), which reuses G @ cols: no extra [k, N] elementwise pass.
    """
    grad_logits = grad_logits.to(rows.dtype)  # bf16/fp16 features: low-precision matmuls, float32 results
    grad_rows_unscaled = _mm_stats(grad_logits, cols)
    grad_scale = (grad_rows_unscaled * rows).sum(dtype=grad_rows_unscaled.dtype)
    grad_rows_out.copy_(grad_rows_unscaled.mul_(scale))
    if grad_cols_unscaled.dtype == rows.dtype:
        grad_cols_unscaled.addmm_(grad_logits.T, rows)
    else:  # accumulate over chunks in float32: B / K bf16 additions would each round
        grad_cols_unscaled.add_(_mm_stats(grad_logits.T, rows))
    return grad_scale


class _SymmetricInfoNCEChunked(torch.autograd.Function):
    """Single process: both InfoNCE directions from ONE pass of chunked matmuls.

    Rows and columns are the same set of B pairs, so the image->text direction is a row-wise logsumexp and the
    text->image direction a column-wise one over the same logits: rows are reduced per chunk, columns with a streaming
    (online) logsumexp. Forward: 1 B x B x D matmul; backward: recompute + 2 gradient matmuls. open_clip needs 6.
    """

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, chunk_size: int):
        batch = image.shape[0]
        scale = logit_scale.reshape(())
        stats_dtype = _stats_dtype(image.dtype)
        row_lse = torch.empty(batch, dtype=stats_dtype, device=image.device)
        positives = torch.empty(batch, dtype=stats_dtype, device=image.device)
        col_max = torch.full((batch,), float("-inf"), dtype=stats_dtype, device=image.device)
        col_sum = torch.zeros(batch, dtype=stats_dtype, device=image.device)
        scratch = torch.empty(min(chunk_size, batch), batch, dtype=stats_dtype, device=image.device)
        for start, stop, logits in _row_chunks(image, text, scale, chunk_size):
            # The diagonal of the full matrix: pair i's positive logit, taken from the same numbers the lse sees.
            positives[start:stop] = logits.diagonal(offset=start)
            row_lse[start:stop] = _row_logsumexp(logits, scratch)
            # Online logsumexp over columns: rescale the running sum to the new running max before adding the chunk.
            # Shifting per row / per column (not by one global bound) keeps exp() from underflowing when a whole row
            # or column sits far below the largest logit (tests: test_chunked_loss_is_finite_for_extreme_logits).
            new_max = torch.maximum(col_max, logits.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(logits.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
        col_lse = col_sum.log_().add_(col_max)
        loss = 0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean())
        ctx.chunk_size = chunk_size
        # Only O(B) statistics beyond the features themselves (which autograd keeps alive anyway).
        ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
        batch = image.shape[0]
        scale = logit_scale.reshape(())
        # d loss / d logits = 0.5/B * (softmax_rows + softmax_cols - 2 * I), times the incoming scalar gradient.
        coef = grad_loss.to(row_lse.dtype) * (0.5 / batch)
        grad_image = torch.empty_like(image)
        grad_text_unscaled = torch.zeros_like(text, dtype=row_lse.dtype)
        grad_scale = torch.zeros((), dtype=row_lse.dtype, device=image.device)
        scratch = torch.empty(min(ctx.chunk_size, batch), batch, dtype=row_lse.dtype, device=image.device)
        for start, stop, logits in _row_chunks(image, text, scale, ctx.chunk_size):
            probs_rows = torch.sub(logits, row_lse[start:stop, None], out=scratch[: stop - start]).exp_()
            grad_logits = logits.sub_(col_lse).exp_().add_(probs_rows)
            grad_logits.diagonal(offset=start).sub_(2.0)
            grad_scale += _backprop_chunk(
                grad_logits.mul_(coef), image[start:stop], text, scale, grad_image[start:stop], grad_text_unscaled
            )
        grad_text = grad_text_unscaled.mul_(scale).to(text.dtype)
        return grad_image, grad_text, grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None


class _InfoNCERowsChunked(torch.autograd.Function):
    """One InfoNCE direction, chunked over rows: mean_i [lse_j(s * rows_i . cols_j) - s * rows_i . cols_{offset+i}].

    rows: [B, D] local features, cols: [N, D] gathered features of the other modality, offset: where this rank's
    pairs sit in cols (rank * B). Used per direction when rows and columns are different sets (multi-rank).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor, offset: int, chunk_size: int):
        batch = rows.shape[0]
        scale = logit_scale.reshape(())
        stats_dtype = _stats_dtype(rows.dtype)
        lse = torch.empty(batch, dtype=stats_dtype, device=rows.device)
        positives = torch.empty(batch, dtype=stats_dtype, device=rows.device)
        scratch = torch.empty(min(chunk_size, batch), cols.shape[0], dtype=stats_dtype, device=rows.device)
        for start, stop, logits in _row_chunks(rows, cols, scale, chunk_size):
            positives[start:stop] = logits.diagonal(offset=offset + start)
            lse[start:stop] = _row_logsumexp(logits, scratch)
        ctx.offset, ctx.chunk_size = offset, chunk_size
        ctx.save_for_backward(rows, cols, logit_scale, lse)
        return (lse - positives).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        rows, cols, logit_scale, lse = ctx.saved_tensors
        scale = logit_scale.reshape(())
        coef = grad_loss.to(lse.dtype) / rows.shape[0]
        grad_rows = torch.empty_like(rows)
        grad_cols_unscaled = torch.zeros_like(cols, dtype=lse.dtype)
        grad_scale = torch.zeros((), dtype=lse.dtype, device=rows.device)
        for start, stop, logits in _row_chunks(rows, cols, scale, ctx.chunk_size):
            grad_logits = logits.sub_(lse[start:stop, None]).exp_()
            grad_logits.diagonal(offset=ctx.offset + start).sub_(1.0)  # softmax - onehot
            grad_scale += _backprop_chunk(
                grad_logits.mul_(coef), rows[start:stop], cols, scale, grad_rows[start:stop], grad_cols_unscaled
            )
        grad_cols = grad_cols_unscaled.mul_(scale).to(cols.dtype)
        return grad_rows, grad_cols, grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None, None


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over image-text pairs, open_clip's ClipLoss(local_loss=True, gather_with_grad=True).

    chunk_size: None computes the plain B x (W*B) logits; an int K streams K rows at a time and never holds more than
    a [K, B] (or [K, W*B]) block, in forward or backward. Both paths give the same loss and gradients
    (tests/test_losses.py). RECOMMENDED_CHUNK_SIZE is the value to train with: measured single-process, it is faster
    than open_clip in float32 on CPU (~2x) and GPU (~1.2x) but ~1.5x slower than open_clip for bf16 features on a GPU,
    where its unfused float32 elementwise passes over each chunk cost more than the bf16 matmuls
    (BENCHMARKS.md "Loss memory"). Multi-rank it runs 8 [B, W*B, D] matmuls to open_clip's 6 (the recompute).
    """

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Loss of this rank's pairs.

        image_features, text_features: [B, D] float (float32/bf16/fp16/float64), L2-normalised by the model; the same
            B on every rank. Row i of each is pair i.
        logit_scale: 1-element or 0-dim float tensor, the already-exponentiated temperature (model.logit_scale.exp()).
        Returns a 0-dim tensor in the statistics dtype (float32, or float64 for float64 inputs). Averaging it over
        ranks gives the loss of the global W*B batch.
        """
        if image_features.shape != text_features.shape or image_features.ndim != 2:
            raise ValueError(
                f"expected image and text features of the same [B, D] shape, got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must have one element, got shape {tuple(logit_scale.shape)}")
        dtype = torch.promote_types(image_features.dtype, text_features.dtype)
        image, text = image_features.to(dtype), text_features.to(dtype)
        rank, world = rank_world()
        # Autocast off: the chunked Functions pick their own precision (matmuls in the feature dtype, statistics in
        # >= float32), and the plain path must match it.
        with torch.autocast(device_type=image.device.type, enabled=False):
            if world == 1:
                return self._single_process(image, text, logit_scale)
            return self._multi_rank(image, text, logit_scale, rank)

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
