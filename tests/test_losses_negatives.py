"""ContrastiveLoss beyond the batch (issue 11) against float64 references written out here.

HN-NCE weighting, queue columns, per-row caption-negative columns and duplicate-caption masking, alone and together,
plain and chunked, 1 and 2 processes: loss and the gradients of every input (features, negatives, logit_scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.losses import ContrastiveLoss, caption_ids_from_tokens, duplicate_caption_mask
from tests._two_ranks import WORLD, run_on_two_ranks
from tests.test_losses import _LargestAllocation

RTOL, ATOL = 1e-6, 1e-12
LOCAL_BATCH, DIM, QUEUE, NEGATIVES = 13, 24, 37, 3
OPTIONS = {
    "batch": {},
    "queue": {"queue": True},
    "negatives": {"negatives": True},
    "duplicates": {"ids": True},
    "all": {"queue": True, "negatives": True, "ids": True},
}


def _problem(seed: int = 0, batch: int = WORLD * LOCAL_BATCH, dtype=torch.float64) -> dict:
    """A global batch with correlated pairs, a queue, 3 caption negatives per pair and caption ids with repeats."""
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)

    image = unit(batch, DIM)
    text = F.normalize(unit(batch, DIM) + 0.7 * image, dim=-1)
    # Negatives near their own image, as perturbed captions are near the real one: they matter to the loss.
    negatives = F.normalize(unit(batch, NEGATIVES, DIM) + 0.5 * image[:, None], dim=-1)
    return {
        "image": image,
        "text": text,
        "scale": torch.tensor([12.5], dtype=dtype),
        "negatives": negatives,
        "image_queue": unit(QUEUE, DIM),
        "text_queue": unit(QUEUE, DIM),
        # 6 distinct captions over 26 pairs and 37 queue entries: every row has duplicates, some in the queue.
        "ids": torch.randint(0, 6, (batch,), generator=gen),
        "queue_ids": torch.randint(0, 6, (QUEUE,), generator=gen),
    }


def _reference_direction(rows, cols, scale, beta, offset, extra=None, row_ids=None, col_ids=None):
    """Issue 11's HN-NCE formula, row by row: cols are all columns (batch, then queue); extra: [B, M, D] per row."""
    losses = []
    for i in range(rows.shape[0]):
        logits = scale * (cols @ rows[i])
        positive = logits[offset + i]
        keep = torch.ones(cols.shape[0], dtype=torch.bool)
        keep[offset + i] = False
        if row_ids is not None:
            keep &= col_ids != row_ids[i]
        negatives = logits[keep]
        if extra is not None:
            negatives = torch.cat([negatives, scale * (extra[i] @ rows[i])])
        n = negatives.shape[0]
        weights = n * torch.exp(beta * negatives) / torch.exp(beta * negatives).sum()
        losses.append(-torch.log(torch.exp(positive) / (torch.exp(positive) + (weights * torch.exp(negatives)).sum())))
    return torch.stack(losses).mean()


def _reference_loss(p: dict, leaves: dict, beta: float, options: dict, rows: slice = slice(None)) -> torch.Tensor:
    """Both directions for the pairs `rows` of the global batch (a rank's slice) against every column."""
    image, text, scale = leaves["image"], leaves["text"], leaves["scale"]
    offset = rows.start or 0
    text_cols, image_cols = text, image
    row_ids = col_ids = None
    if options.get("queue"):
        text_cols, image_cols = torch.cat([text, p["text_queue"]]), torch.cat([image, p["image_queue"]])
    if options.get("ids"):
        row_ids = p["ids"][rows]
        col_ids = torch.cat([p["ids"], p["queue_ids"]]) if options.get("queue") else p["ids"]
    extra = leaves["negatives"][rows] if options.get("negatives") else None
    image_to_text = _reference_direction(image[rows], text_cols, scale, beta, offset, extra, row_ids, col_ids)
    text_to_image = _reference_direction(text[rows], image_cols, scale, beta, offset, None, row_ids, col_ids)
    return 0.5 * (image_to_text + text_to_image)


def _leaves(p: dict, rows: slice = slice(None)) -> dict:
    return {k: p[k][rows].detach().clone().requires_grad_() for k in ("image", "text", "negatives")} | {
        "scale": p["scale"].detach().clone().requires_grad_()
    }


def _ours(loss_fn, leaves: dict, p: dict, options: dict, rows: slice = slice(None)) -> torch.Tensor:
    kwargs = {}
    if options.get("queue"):
        kwargs.update(image_queue=p["image_queue"], text_queue=p["text_queue"])
    if options.get("negatives"):
        kwargs["text_negatives"] = leaves["negatives"]
    if options.get("ids"):
        kwargs["caption_ids"] = p["ids"][rows]
        if options.get("queue"):
            kwargs["queue_caption_ids"] = p["queue_ids"]
    return loss_fn(leaves["image"], leaves["text"], leaves["scale"], **kwargs)


def _loss_and_grads(loss: torch.Tensor, leaves: dict) -> dict:
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return {"loss": loss.detach()} | grads


def _assert_close(actual: dict, expected: dict, factor: float = 1.0, keys=("loss", "image", "text", "negatives")):
    for key in keys:
        scale_by = 1.0 if key == "loss" else factor
        torch.testing.assert_close(actual[key], scale_by * expected[key], rtol=RTOL, atol=ATOL, msg=key)


# ---------------------------------------------------------------------------------------------------------- 1 process


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_float64_on_cuda_matches_the_reference(chunk_size):
    p = _problem()
    ref_leaves = _leaves(p)
    expected = _loss_and_grads(_reference_loss(p, ref_leaves, 0.5, OPTIONS["all"]), ref_leaves)
    p = {k: v.cuda() for k, v in p.items()}
    our_leaves = _leaves(p)
    actual = _loss_and_grads(_ours(ContrastiveLoss(chunk_size, 0.5), our_leaves, p, OPTIONS["all"]), our_leaves)
    _assert_close(
        {k: v.cpu() for k, v in actual.items()}, expected, keys=("loss", "image", "text", "negatives", "scale")
    )


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [None, 4, 7, 64])  # 26 rows, 26 + 37 columns: ragged tiles; 64 > both
def test_loss_and_gradients_match_float64_reference(options, beta, chunk_size):
    p, opts = _problem(), OPTIONS[options]
    ref_leaves, our_leaves = _leaves(p), _leaves(p)
    expected = _loss_and_grads(_reference_loss(p, ref_leaves, beta, opts), ref_leaves)
    actual = _loss_and_grads(_ours(ContrastiveLoss(chunk_size, beta), our_leaves, p, opts), our_leaves)
    _assert_close(actual, expected, keys=("loss", "image", "text", "negatives", "scale"))
    if beta and options == "batch":
        # Positive control: the weighting changes the loss (so the reference comparison above is not vacuous).
        plain = _ours(ContrastiveLoss(chunk_size), _leaves(p), p, opts).detach()
        assert (plain - actual["loss"]).abs() > 1e-3


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_queue_loss_equals_infonce_over_concatenated_columns(chunk_size):
    p = _problem(seed=1)
    ref_leaves, our_leaves = _leaves(p), _leaves(p)
    image, text, scale = ref_leaves["image"], ref_leaves["text"], ref_leaves["scale"]
    labels = torch.arange(image.shape[0])
    expected = 0.5 * (
        F.cross_entropy(scale * image @ torch.cat([text, p["text_queue"]]).T, labels)
        + F.cross_entropy(scale * text @ torch.cat([image, p["image_queue"]]).T, labels)
    )
    expected = _loss_and_grads(expected, ref_leaves)
    actual = _loss_and_grads(_ours(ContrastiveLoss(chunk_size), our_leaves, p, OPTIONS["queue"]), our_leaves)
    _assert_close(actual, expected, keys=("loss", "image", "text", "scale"))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_duplicate_captions_leave_the_denominator_in_both_directions(chunk_size):
    p = _problem(seed=2, batch=6)
    ids = torch.tensor([10, 11, 10, 12, 13, 11])  # pairs 0 and 2 share a caption, so do 1 and 5
    ref_leaves, our_leaves = _leaves(p), _leaves(p)
    image, text, scale = ref_leaves["image"], ref_leaves["text"], ref_leaves["scale"]
    dropped = {0: 2, 2: 0, 1: 5, 5: 1}  # row -> the duplicate column it must not see

    def direction(rows, cols):
        losses = []
        for i in range(6):
            keep = [j for j in range(6) if j != dropped.get(i)]
            logits = scale * cols[keep] @ rows[i]
            losses.append(F.cross_entropy(logits[None], torch.tensor([keep.index(i)])))
        return torch.stack(losses).mean()

    expected = _loss_and_grads(0.5 * (direction(image, text) + direction(text, image)), ref_leaves)
    loss = ContrastiveLoss(chunk_size)(our_leaves["image"], our_leaves["text"], our_leaves["scale"], caption_ids=ids)
    _assert_close(_loss_and_grads(loss, our_leaves), expected, keys=("loss", "image", "text", "scale"))
    # Distinct ids change nothing: the option only drops what equals the positive.
    distinct = ContrastiveLoss(chunk_size)(image, text, scale, caption_ids=torch.arange(6))
    torch.testing.assert_close(distinct, ContrastiveLoss(chunk_size)(image, text, scale), rtol=RTOL, atol=ATOL)
    mask = duplicate_caption_mask(ids, torch.cat([ids, torch.tensor([11, 99])]))
    assert mask.nonzero().tolist() == [[0, 2], [1, 5], [1, 6], [2, 0], [5, 1], [5, 6]]


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_rows_whose_every_negative_is_a_duplicate_have_zero_loss(beta, chunk_size):
    p = _problem(seed=3, batch=8)
    leaves = _leaves(p)
    loss = ContrastiveLoss(chunk_size, beta)(
        leaves["image"], leaves["text"], leaves["scale"], caption_ids=torch.zeros(8, dtype=torch.int64)
    )
    out = _loss_and_grads(loss, leaves)
    assert out["loss"].item() == 0.0
    for key in ("image", "text", "scale"):
        assert torch.isfinite(out[key]).all() and out[key].abs().max() == 0, key


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_caption_negatives_are_extra_image_to_text_columns_only(chunk_size):
    p = _problem(seed=4, batch=10)
    ref_leaves, our_leaves = _leaves(p), _leaves(p)
    image, text, scale, negatives = (ref_leaves[k] for k in ("image", "text", "scale", "negatives"))
    labels = torch.arange(10)
    image_to_text = torch.cat([scale * image @ text.T, scale * torch.einsum("bd,bmd->bm", image, negatives)], dim=1)
    expected = 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(scale * text @ image.T, labels))
    expected = _loss_and_grads(expected, ref_leaves)
    actual = _loss_and_grads(_ours(ContrastiveLoss(chunk_size), our_leaves, p, OPTIONS["negatives"]), our_leaves)
    _assert_close(actual, expected, keys=("loss", "image", "text", "negatives", "scale"))


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])  # CUDA: bf16 tiles use the float32-output (out_dtype) matmul
@pytest.mark.parametrize("chunk_size", [None, 32])
def test_bf16_features_with_every_option_match_float64_of_the_same_values(chunk_size, device):
    p = {k: v.to(device) for k, v in _problem(seed=6, batch=128).items()}
    low = {k: (v.bfloat16() if v.is_floating_point() and k != "scale" else v) for k, v in p.items()}
    high = {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}
    ref_leaves, our_leaves = _leaves(high), _leaves(low)
    expected = _loss_and_grads(_ours(ContrastiveLoss(None, 0.5), ref_leaves, high, OPTIONS["all"]), ref_leaves)
    our_leaves["scale"] = p["scale"].float().requires_grad_()
    actual = _loss_and_grads(_ours(ContrastiveLoss(chunk_size, 0.5), our_leaves, low, OPTIONS["all"]), our_leaves)
    assert actual["loss"].dtype == torch.float32 and actual["image"].dtype == torch.bfloat16
    # Bounds relative to the largest entry, as in tests/test_losses.py; measured on seeds 6-8: loss <= 5e-4, feature
    # grads <= 1.5e-2, scale grad <= 2.9e-3 (it is a sum of cancelling terms, so its relative error runs higher).
    for key, bound in [("loss", 1e-3), ("image", 3e-2), ("text", 3e-2), ("negatives", 3e-2), ("scale", 6e-3)]:
        error = ((actual[key].double() - expected[key]).abs().max() / expected[key].abs().max()).item()
        assert error < bound, f"{key}: relative error {error:.2e} >= {bound}"


def test_chunked_loss_with_a_queue_never_materialises_rows_times_columns():
    batch, queue, dim, chunk = 64, 1000, 8, 16
    p = {k: v.float() if v.is_floating_point() else v for k, v in _problem(seed=5, batch=batch).items()}
    gen = torch.Generator().manual_seed(0)
    p["image_queue"], p["text_queue"] = (F.normalize(torch.randn(queue, DIM, generator=gen), dim=-1) for _ in "it")
    p["queue_ids"] = torch.randint(0, 6, (queue,), generator=gen)
    p |= {k: p[k][..., :dim].contiguous() for k in ("image", "text", "negatives", "image_queue", "text_queue")}

    def largest(loss_fn):
        leaves = _leaves(p)
        with _LargestAllocation() as forward:
            loss = _ours(loss_fn, leaves, p, OPTIONS["all"])
        with _LargestAllocation() as backward:
            loss.backward()
        return forward.largest, backward.largest

    full = batch * (batch + queue)
    assert all(n >= full for n in largest(ContrastiveLoss(None, 0.5))), "positive control: plain builds B x (B+K)"
    # The biggest tensors left are the queue itself ([K, D] = 8000 elements) and [K, K] tiles (256).
    assert all(n <= queue * dim for n in largest(ContrastiveLoss(chunk, 0.5)))


def test_bad_values_are_refused():
    p = _problem(batch=4)
    image, text, scale = p["image"], p["text"], p["scale"]
    for beta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="hard_negative_beta must be a finite number >= 0"):
            ContrastiveLoss(hard_negative_beta=beta)
    with pytest.raises(ValueError, match=r"text_queue must have shape \[\*, 24\], got \(5, 3\)"):
        ContrastiveLoss()(image, text, scale, text_queue=torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"text_negatives must have shape \[4, \*, 24\]"):
        ContrastiveLoss()(image, text, scale, text_negatives=p["negatives"][:3])
    with pytest.raises(ValueError, match="caption_ids must be a 1-d integer tensor"):
        ContrastiveLoss()(image, text, scale, caption_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"caption_ids must have shape \[4\]"):
        ContrastiveLoss()(image, text, scale, caption_ids=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs queue_caption_ids"):
        ContrastiveLoss()(image, text, scale, text_queue=p["text_queue"], caption_ids=p["ids"][:4])
    with pytest.raises(ValueError, match=r"queue_caption_ids must have shape \[37\]"):
        ContrastiveLoss()(
            image, text, scale, text_queue=p["text_queue"], caption_ids=p["ids"][:4], queue_caption_ids=p["ids"]
        )


def test_caption_ids_from_tokens_are_equal_exactly_for_equal_token_rows():
    tokens = torch.tensor([[49406, 320, 1746, 49407, 0], [49406, 320, 2368, 49407, 0], [49406, 320, 1746, 49407, 0]])
    ids = caption_ids_from_tokens(tokens)
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]
    assert torch.equal(caption_ids_from_tokens(tokens.int()), ids)  # the same for int32 token ids
    assert caption_ids_from_tokens(torch.arange(20000).reshape(5000, 4)).unique().numel() == 5000
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\] integer"):
        caption_ids_from_tokens(torch.zeros(3, 2))


def test_empty_queue_and_zero_negatives_are_the_plain_loss():
    p = _problem(batch=8)
    image, text, scale = p["image"], p["text"], p["scale"]
    empty = torch.zeros(0, DIM, dtype=torch.float64)
    plain = ContrastiveLoss()(image, text, scale)
    no_negatives = p["negatives"][:, :0]
    out = ContrastiveLoss()(image, text, scale, image_queue=empty, text_queue=empty, text_negatives=no_negatives)
    assert out.item() == plain.item()


# ------------------------------------------------------------------------------------------------------ 2 processes

TWO_RANK_VARIANTS = {  # name: (chunk_size, beta, options)
    "hn_plain": (None, 1.0, "batch"),
    "hn_chunked": (5, 1.0, "batch"),
    "queue_chunked": (5, 0.0, "queue"),
    "all_plain": (None, 0.5, "all"),
    "all_chunked": (5, 0.5, "all"),
}


def _two_rank_worker(rank: int) -> dict:
    p = _problem()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for name, (chunk_size, beta, options) in TWO_RANK_VARIANTS.items():
        leaves = _leaves(p, rows)
        out = _loss_and_grads(_ours(ContrastiveLoss(chunk_size, beta), leaves, p, OPTIONS[options], rows), leaves)
        results |= {f"{name}/{k}": v for k, v in out.items()}
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_two_ranks(_two_rank_worker, tmp_path_factory.mktemp("negatives"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(TWO_RANK_VARIANTS))
def test_two_processes_match_the_float64_reference_of_the_global_batch(two_ranks, variant):
    _, beta, options = TWO_RANK_VARIANTS[variant]
    p = _problem()
    # Each rank's loss is the reference over its own rows against all columns; the mean over ranks is the global
    # loss; each rank's gradients (the gather's backward sums all ranks' contributions) are W times the global
    # gradient of its slice, and the mean of the scale gradients is the global one.
    global_leaves = _leaves(p)
    expected = _loss_and_grads(_reference_loss(p, global_leaves, beta, OPTIONS[options]), global_leaves)
    ranks = [{k.split("/")[1]: v for k, v in r.items() if k.startswith(variant + "/")} for r in two_ranks]
    for rank, actual in enumerate(ranks):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        rank_reference = _reference_loss(p, _leaves(p), beta, OPTIONS[options], rows)
        torch.testing.assert_close(actual["loss"], rank_reference.detach(), rtol=RTOL, atol=ATOL)
        sliced = {k: v[rows] for k, v in expected.items() if k in ("image", "text", "negatives")}
        _assert_close(actual, sliced | {"loss": rank_reference.detach()}, factor=WORLD)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), expected["loss"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.stack([r["scale"] for r in ranks]).mean(0), expected["scale"], rtol=RTOL, atol=0)
