"""Chunked contrastive-loss kernels: custom autograd Functions that never hold a whole B x N logits matrix.

The recompute-instead-of-store idea of FlashAttention (Dao et al. 2022), applied to the contrastive loss as in
"Inf-CL" (Cheng et al. 2024, https://arxiv.org/abs/2410.17243): forward keeps O(B) logsumexp statistics per row,
backward recomputes each block of logits and forms d loss / d logits block by block.

- `_SymmetricInfoNCEChunked`: single process, plain InfoNCE, both directions from one pass over [K, B] row chunks.
- `_InfoNCERowsChunked`: one direction of plain InfoNCE, [K, W*B] row chunks (multi-rank).
- `_NegativesTiled`: one direction with everything else (hard-negative weighting, queue columns without gradient,
  per-row extra columns, duplicate-caption exclusion), over [K, K] tiles, so a queue of 65,536 columns never needs
  a [K, 65,536] block either.
"""

from __future__ import annotations

import torch


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
    grad_cols_unscaled: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one [k, N] block `logits = scale * rows @ cols.T`, given G = d loss / d logits ([k, N]).

    Returns (d/d rows = scale * G @ cols, [k, D] in the statistics dtype; this block's d/d scale = sum(G * rows @
    cols.T) = sum((G @ cols) * rows), which reuses G @ cols: no extra [k, N] elementwise pass). Adds G.T @ rows into
    grad_cols_unscaled ([N, D] in the statistics dtype; the caller multiplies by scale once at the end) unless it is
    None (columns without gradient, such as a queue's).
    """
    grad_logits = grad_logits.to(rows.dtype)  # bf16/fp16 features: low-precision matmuls, float32 results
    grad_rows_unscaled = _mm_stats(grad_logits, cols)
    grad_scale = (grad_rows_unscaled * rows).sum(dtype=grad_rows_unscaled.dtype)
    if grad_cols_unscaled is None:
        pass
    elif grad_cols_unscaled.dtype == rows.dtype:
        grad_cols_unscaled.addmm_(grad_logits.T, rows)
    else:  # accumulate over chunks in float32: B / K bf16 additions would each round
        grad_cols_unscaled.add_(_mm_stats(grad_logits.T, rows))
    return grad_rows_unscaled.mul_(scale), grad_scale


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
            grad_image[start:stop], chunk_grad_scale = _backprop_chunk(
                grad_logits.mul_(coef), image[start:stop], text, scale, grad_text_unscaled
            )
            grad_scale += chunk_grad_scale
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
            grad_rows[start:stop], chunk_grad_scale = _backprop_chunk(
                grad_logits.mul_(coef), rows[start:stop], cols, scale, grad_cols_unscaled
            )
            grad_scale += chunk_grad_scale
        grad_cols = grad_cols_unscaled.mul_(scale).to(cols.dtype)
        return grad_rows, grad_cols, grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype), None, None


_NEG_INF = float("-inf")


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf -> 0 (a new tensor): the shift for exp(x - lse) of rows whose every entry is excluded, so they give 0."""
    return x.masked_fill(x == _NEG_INF, 0.0)


def _lse_inplace(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 of [k, c] x that may hold -inf (excluded entries); -inf for a row with none left.

    Overwrites x. The per-row shift (not one global bound) keeps exp() from underflowing for rows far below the
    largest logit.
    """
    row_max = _finite_or_zero(x.amax(dim=1, keepdim=True))
    return x.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max.squeeze(1))


def _exclude_in_tile(
    logits: torch.Tensor,
    row_start: int,
    col_start: int,
    offset: int | None,
    row_ids: torch.Tensor | None,
    col_ids: torch.Tensor | None,
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """Sets the positives and the duplicate-caption columns of one [k, c] tile to -inf, in place.

    The tile holds rows [row_start, row_start + k) against columns [col_start, col_start + c) of a block whose
    column offset + i is row i's positive (offset None: a block without positives, e.g. a queue). Returns (first,
    positives, duplicates): tile rows first .. first + len(positives) - 1 have their positive logit in this tile
    (positives None when no row does), and duplicates [k] int64 counts the excluded columns whose id equals the row's
    (the positive's own column included: its id is the row's id), None without ids.
    """
    k, c = logits.shape
    first, positives, duplicates = 0, None, None
    if offset is not None:
        first = max(0, col_start - offset - row_start)
        last = min(k, col_start + c - offset - row_start)
        if first < last:
            shift = row_start + offset - col_start
            diagonal = logits[first:last, first + shift : last + shift].diagonal()
            positives = diagonal.clone()
            diagonal.fill_(_NEG_INF)
    if row_ids is not None:
        same = row_ids[row_start : row_start + k, None] == col_ids[None, col_start : col_start + c]
        logits.masked_fill_(same, _NEG_INF)
        duplicates = same.sum(dim=1)
    return first, positives, duplicates


def _column_blocks(cols, queue, col_ids, queue_ids, offset):
    """[(columns [n, D], ids [n] or None, offset of the positives or None)]: the batch block, then the queue's."""
    blocks = [(cols, col_ids, offset)]
    if queue is not None and queue.shape[0] > 0:
        blocks.append((queue, queue_ids, None))
    return blocks


def _tiles(rows, blocks, scale, chunk_size, buffer):
    """Yields (row_start, row_stop, block index, col_start, logits [k, c]) over [K, K] tiles, rows outermost.

    Every tile is a contiguous view of the one flat `buffer` ([>= K*K] elements), overwritten by the next tile.
    The logits are `_logits`' numbers; the scale is folded into the rows once, not once per tile.
    """
    scaled_rows = (rows.to(_stats_dtype(rows.dtype)) * scale).to(rows.dtype)
    for row_start in range(0, rows.shape[0], chunk_size):
        row_stop = min(row_start + chunk_size, rows.shape[0])
        for index, (cols, _, _) in enumerate(blocks):
            for col_start in range(0, cols.shape[0], chunk_size):
                col_stop = min(col_start + chunk_size, cols.shape[0])
                out = buffer[: (row_stop - row_start) * (col_stop - col_start)].view(row_stop - row_start, -1)
                logits = _mm_stats(scaled_rows[row_start:row_stop], cols[col_start:col_stop].T, out=out)
                yield row_start, row_stop, index, col_start, logits


class _NegativesTiled(torch.autograd.Function):
    """One direction of HN-NCE / InfoNCE over batch columns, queue columns and per-row extra columns, tiled.

    Per row i with positive logit p_i and the set N_i of its negatives (every batch and queue column except the
    positive and, with ids, except columns whose id equals row i's; plus its finite extra logits):
        A_i = logsumexp_{j in N_i} (1 + beta) l_ij,   B_i = logsumexp_{j in N_i} beta l_ij,   n_i = |N_i|
        S_i = log n_i + A_i - B_i   (= log sum_j w_ij exp(l_ij) with w_ij = n_i exp(beta l_ij) / sum_k exp(beta l_ik))
        loss_i = logaddexp(p_i, S_i) - p_i,   returned: mean_i loss_i
    beta = 0 gives S_i = logsumexp_{N_i} l_ij, i.e. InfoNCE. d loss_i / d l_ij = sigma_i ((1 + beta) softmax_A_ij -
    beta softmax_B_ij) with sigma_i = exp(S_i - logaddexp(p_i, S_i)): the gradient through the weights included.

    Inputs: rows [B, D]; cols [N, D] whose column offset + i is row i's positive (with gradient, e.g. gathered
    features); queue [K, D] or None (no gradient is computed for it); extra_logits [B, M] or None, already scaled
    logits of per-row extra columns (-inf = excluded), differentiable; logit_scale (1 element); row_ids [B],
    col_ids [N], queue_ids [K] int64 or None (all None or row_ids and col_ids given, queue_ids with a queue).
    Only O(B) statistics are saved; forward and backward each hold two [chunk_size, chunk_size] tiles.
    """

    @staticmethod
    def forward(
        ctx, rows, cols, queue, extra_logits, logit_scale, row_ids, col_ids, queue_ids, offset, chunk_size, beta
    ):
        batch, scale = rows.shape[0], logit_scale.reshape(())
        stats_dtype, device = _stats_dtype(rows.dtype), rows.device
        blocks = _column_blocks(cols, queue, col_ids, queue_ids, offset)
        lse_a = torch.full((batch,), _NEG_INF, dtype=stats_dtype, device=device)
        lse_b = torch.full((batch,), _NEG_INF, dtype=stats_dtype, device=device)
        positives = torch.empty(batch, dtype=stats_dtype, device=device)
        # Excluded columns per row: the positive, and with ids every column with the row's id (which counts it too).
        excluded = torch.zeros(batch, dtype=torch.int64, device=device) if row_ids is not None else 1
        tile_elements = min(chunk_size, batch) * chunk_size
        buffer = torch.empty(tile_elements, dtype=stats_dtype, device=device)
        scratch = torch.empty(tile_elements, dtype=stats_dtype, device=device)
        for row_start, row_stop, index, col_start, logits in _tiles(rows, blocks, scale, chunk_size, buffer):
            _, ids, block_offset = blocks[index]
            first, found, duplicates = _exclude_in_tile(logits, row_start, col_start, block_offset, row_ids, ids)
            if found is not None:
                positives[row_start + first : row_start + first + found.shape[0]] = found
            if duplicates is not None:
                excluded[row_start:row_stop] += duplicates
            rows_here = slice(row_start, row_stop)
            if beta:
                weighted = torch.mul(logits, beta, out=scratch[: logits.numel()].view_as(logits))
                lse_b[rows_here] = torch.logaddexp(lse_b[rows_here], _lse_inplace(weighted))
            lse_a[rows_here] = torch.logaddexp(
                lse_a[rows_here], _lse_inplace(logits.mul_(1.0 + beta) if beta else logits)
            )
        count = sum(block[0].shape[0] for block in blocks) - excluded
        if extra_logits is not None:
            extra = extra_logits.detach().to(stats_dtype)
            count = count + torch.isfinite(extra).sum(dim=1)
            if beta:
                lse_b = torch.logaddexp(lse_b, _lse_inplace(extra * beta))
            lse_a = torch.logaddexp(lse_a, _lse_inplace(extra * (1.0 + beta)))
        if beta:
            count = torch.as_tensor(count, device=device).to(stats_dtype).expand(batch)
            # No negative left (every column a duplicate of the positive): S = -inf and the row's loss is 0.
            log_weighted = torch.where(count > 0, count.log() + lse_a - lse_b, _NEG_INF)
        else:
            log_weighted = lse_a
        log_denominator = torch.logaddexp(positives, log_weighted)
        ctx.offset, ctx.chunk_size, ctx.beta = offset, chunk_size, beta
        ctx.save_for_backward(
            rows, cols, queue, extra_logits, logit_scale, row_ids, col_ids, queue_ids,
            positives, lse_a, lse_b, log_weighted, log_denominator,
        )  # fmt: skip
        return (log_denominator - positives).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        (rows, cols, queue, extra_logits, logit_scale, row_ids, col_ids, queue_ids,
         positives, lse_a, lse_b, log_weighted, log_denominator) = ctx.saved_tensors  # fmt: skip
        beta, scale, stats_dtype = ctx.beta, logit_scale.reshape(()), lse_a.dtype
        coef = grad_loss.to(stats_dtype) / rows.shape[0]
        sigma = (log_weighted - log_denominator).exp()
        coef_a, coef_b = (sigma * (coef * (1.0 + beta)))[:, None], (sigma * (coef * beta))[:, None]
        shift_a, shift_b = _finite_or_zero(lse_a)[:, None], _finite_or_zero(lse_b)[:, None]
        grad_positives = ((positives - log_denominator).exp() - 1.0) * coef
        blocks = _column_blocks(cols, queue, col_ids, queue_ids, ctx.offset)
        grad_cols_unscaled = torch.zeros_like(cols, dtype=stats_dtype) if ctx.needs_input_grad[1] else None
        grad_rows = torch.empty_like(rows)
        grad_rows_chunk = torch.zeros(min(ctx.chunk_size, rows.shape[0]), rows.shape[1], dtype=stats_dtype,
                                      device=rows.device)  # fmt: skip
        grad_scale = torch.zeros((), dtype=stats_dtype, device=rows.device)
        tile_elements = grad_rows_chunk.shape[0] * ctx.chunk_size
        buffer = torch.empty(tile_elements, dtype=stats_dtype, device=rows.device)
        scratch = torch.empty(tile_elements, dtype=stats_dtype, device=rows.device)
        last_row_start = -1
        for row_start, row_stop, index, col_start, logits in _tiles(rows, blocks, scale, ctx.chunk_size, buffer):
            block_cols, ids, block_offset = blocks[index]
            if row_start != last_row_start:  # a new row chunk: hand out the finished one
                if last_row_start >= 0:
                    grad_rows[last_row_start:row_start] = grad_rows_chunk[: row_start - last_row_start]
                grad_rows_chunk.zero_()
                last_row_start = row_start
            first, found, _ = _exclude_in_tile(logits, row_start, col_start, block_offset, row_ids, ids)
            rows_here = slice(row_start, row_stop)
            if beta:
                grad_logits = torch.mul(logits, 1.0 + beta, out=scratch[: logits.numel()].view_as(logits))
                grad_logits.sub_(shift_a[rows_here]).exp_().mul_(coef_a[rows_here])
                grad_logits.sub_(logits.mul_(beta).sub_(shift_b[rows_here]).exp_().mul_(coef_b[rows_here]))
            else:  # softmax - onehot, in place
                grad_logits = logits.sub_(shift_a[rows_here]).exp_().mul_(coef_a[rows_here])
            if found is not None:
                shift = row_start + block_offset - col_start
                grad_logits[first : first + found.shape[0], first + shift :].diagonal().copy_(
                    grad_positives[row_start + first : row_start + first + found.shape[0]]
                )
            cols_here = slice(col_start, col_start + logits.shape[1])
            tile_grad_cols = grad_cols_unscaled[cols_here] if index == 0 and grad_cols_unscaled is not None else None
            tile_grad_rows, tile_grad_scale = _backprop_chunk(
                grad_logits, rows[rows_here], block_cols[cols_here], scale, tile_grad_cols
            )
            grad_rows_chunk[: row_stop - row_start] += tile_grad_rows
            grad_scale += tile_grad_scale
        grad_rows[last_row_start:] = grad_rows_chunk[: rows.shape[0] - last_row_start]
        grad_extra = None
        if extra_logits is not None and ctx.needs_input_grad[3]:
            extra = extra_logits.detach().to(stats_dtype)
            grad_extra = ((1.0 + beta) * extra - shift_a).exp() * coef_a
            if beta:
                grad_extra = grad_extra - (beta * extra - shift_b).exp() * coef_b
            grad_extra = grad_extra.to(extra_logits.dtype)
        grad_cols = grad_cols_unscaled.mul_(scale).to(cols.dtype) if grad_cols_unscaled is not None else None
        grad_scale = grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype)
        return grad_rows, grad_cols, None, grad_extra, grad_scale, None, None, None, None, None, None
