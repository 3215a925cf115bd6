"""FeatureQueue (FIFO contents, wrap-around, resume, errors, 2 ranks) and ALBEF's momentum distillation (float64)."""

from __future__ import annotations

from collections import deque

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipkit.losses import ContrastiveLoss, FeatureQueue
from clipkit.losses.distill import distillation_targets, itc_distillation_loss, momentum_distillation_loss
from tests._two_ranks import WORLD, run_on_two_ranks

RTOL, ATOL = 1e-6, 1e-12


def _keys(start: int, count: int, dim: int = 3) -> torch.Tensor:
    """Rows whose every entry is the sample's running number: queue contents are readable."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).contiguous()


def _queued_numbers(queue: FeatureQueue) -> list[int]:
    image, text, ids = queue.columns()
    assert torch.equal(image, text) and torch.equal(ids, image[:, 0].long())
    return image[:, 0].long().tolist()


# ----------------------------------------------------------------------------------------------------------- queue


def test_queue_is_fifo_across_wrap_around():
    queue = FeatureQueue(5, 3, track_caption_ids=True)
    assert queue.fill_fraction == 0 and queue.columns()[0].shape == (0, 3)
    seen: deque[int] = deque(maxlen=5)
    expected_slots = [[0, 1, 2], [5, 1, 2, 3, 4], [5, 6, 7, 8, 4]]  # written out: slots after each enqueue of 3
    for step in range(9):
        keys = _keys(3 * step, 3)
        queue.enqueue(keys, keys, keys[:, 0].long())
        seen.extend(range(3 * step, 3 * step + 3))
        if step < len(expected_slots):
            assert _queued_numbers(queue) == expected_slots[step]
        assert sorted(_queued_numbers(queue)) == sorted(seen)  # exactly the last K samples
        assert queue.ptr == 3 * (step + 1) % 5 and queue.filled == min(5, 3 * (step + 1))
    assert queue.fill_fraction == 1.0


def test_a_batch_larger_than_the_queue_keeps_its_last_entries():
    queue = FeatureQueue(4, 3, track_caption_ids=True)
    queue.enqueue(_keys(0, 1), _keys(0, 1), torch.tensor([0]))
    queue.enqueue(_keys(1, 7), _keys(1, 7), torch.arange(1, 8))
    assert sorted(_queued_numbers(queue)) == [4, 5, 6, 7] and queue.ptr == 0 and queue.filled == 4


def test_queue_state_dict_resumes_exactly_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)) for _ in range(5)]
    straight = FeatureQueue(7, 8, track_caption_ids=True)
    for i, (image, text) in enumerate(batches[:3]):
        straight.enqueue(image, text, torch.full((3,), i))
    save_file(straight.state_dict(), tmp_path / "queue.safetensors")
    resumed = FeatureQueue(7, 8, track_caption_ids=True)
    resumed.load_state_dict(load_file(tmp_path / "queue.safetensors"))
    for i, (image, text) in enumerate(batches[3:], start=3):
        for queue in (straight, resumed):
            queue.enqueue(image, text, torch.full((3,), i))
    for a, b in zip(straight.columns(), resumed.columns()):
        assert torch.equal(a, b)
    assert (straight.ptr, straight.filled) == (resumed.ptr, resumed.filled) == (1, 7)


def test_queue_errors():
    for size in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="queue size must be a positive int"):
            FeatureQueue(size, 8)
    queue = FeatureQueue(4, 8)
    with pytest.raises(ValueError, match=r"same \[B, 8\] shape"):
        queue.enqueue(torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="without track_caption_ids"):
        queue.enqueue(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="enqueue needs caption_ids"):
        FeatureQueue(4, 8, track_caption_ids=True).enqueue(torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"'image' has shape \(4, 8\), this queue \(5, 8\).*--queue-size"):
        FeatureQueue(5, 8).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="queue state has keys"):
        FeatureQueue(4, 8, track_caption_ids=True).load_state_dict(queue.state_dict())


# ---------------------------------------------------------------------------------------------------- distillation


def _logits(seed: int, rows: int = 6, cols: int = 9):
    gen = torch.Generator().manual_seed(seed)
    online = (4 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)).requires_grad_()
    momentum = (4 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)).requires_grad_()
    return online, momentum, torch.tensor([0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distillation_loss_and_gradient_match_the_written_out_formula(alpha):
    online, momentum, positives = _logits(0)
    exp_m = torch.exp(momentum.detach())
    onehot = torch.zeros(6, 9, dtype=torch.float64)
    onehot[torch.arange(6), positives] = 1.0
    targets = alpha * exp_m / exp_m.sum(1, keepdim=True) + (1 - alpha) * onehot
    torch.testing.assert_close(distillation_targets(momentum, positives, alpha), targets, rtol=RTOL, atol=ATOL)
    probs = torch.exp(online.detach()) / torch.exp(online.detach()).sum(1, keepdim=True)
    expected = -(targets * torch.log(probs)).sum(1).mean()
    loss = momentum_distillation_loss(online, momentum, positives, alpha)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(online.grad, (probs - targets) / 6, rtol=RTOL, atol=ATOL)  # softmax - target
    assert momentum.grad is None  # targets carry no gradient into the momentum model
    if alpha == 0:
        torch.testing.assert_close(loss.detach(), F.cross_entropy(online.detach(), positives), rtol=RTOL, atol=ATOL)


def test_distillation_excludes_duplicate_columns_from_both_softmaxes():
    online, momentum, positives = _logits(1)
    exclude = torch.zeros(6, 9, dtype=torch.bool)
    exclude[0, 7] = exclude[3, 1] = True
    keep = ~exclude
    targets = distillation_targets(momentum, positives, 0.4, exclude)
    assert targets[exclude].abs().max() == 0 and torch.allclose(targets.sum(1), torch.ones(6, dtype=torch.float64))
    expected = []
    for i in range(6):
        o, m = online[i][keep[i]], momentum[i][keep[i]].detach()
        t = 0.4 * m.softmax(0) + 0.6 * F.one_hot(keep[i][: positives[i]].sum(), o.shape[0]).double()
        expected.append(-(t * o.log_softmax(0)).sum())
    actual = momentum_distillation_loss(online, momentum, positives, 0.4, exclude)
    torch.testing.assert_close(actual, torch.stack(expected).mean(), rtol=RTOL, atol=ATOL)


def _itc_problem(batch: int = 8, queue: int = 11, dim: int = 16):
    gen = torch.Generator().manual_seed(3)

    def unit(n):
        return F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)

    image = unit(batch)
    text = F.normalize(unit(batch) + image, dim=-1)
    return {
        "image": image,
        "text": text,
        "momentum_image": F.normalize(image + 0.1 * unit(batch), dim=-1),
        "momentum_text": F.normalize(text + 0.1 * unit(batch), dim=-1),
        "image_queue": unit(queue),
        "text_queue": unit(queue),
        "scale": torch.tensor([10.0], dtype=torch.float64),
        "ids": torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])[:batch],
        "queue_ids": torch.arange(queue) % 7,
    }


def _itc_reference(p: dict, alpha: float, rows: slice, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """ALBEF's formula spelled out: columns [all batch, queue]; duplicates of the positive left out."""
    col_ids = torch.cat([p["ids"], p["queue_ids"]])
    losses = []
    for online_rows, online_cols, key_rows, key_cols, queue in (
        (image, text, p["momentum_image"], p["momentum_text"], p["text_queue"]),
        (text, image, p["momentum_text"], p["momentum_image"], p["image_queue"]),
    ):
        per_row = []
        for i in range(rows.start, rows.stop):
            keep = [j for j in range(col_ids.shape[0]) if j == i or col_ids[j] != p["ids"][i]]
            online = (p["scale"] * torch.cat([online_cols, queue]) @ online_rows[i])[keep]
            momentum = (p["scale"] * torch.cat([key_cols, queue]) @ key_rows[i])[keep]
            onehot = torch.zeros(len(keep), dtype=torch.float64)
            onehot[keep.index(i)] = 1.0
            targets = alpha * torch.exp(momentum) / torch.exp(momentum).sum() + (1 - alpha) * onehot
            per_row.append(-(targets * torch.log(torch.exp(online) / torch.exp(online).sum())).sum())
        losses.append(torch.stack(per_row).mean())
    return 0.5 * (losses[0] + losses[1])


def _itc_ours(p: dict, alpha: float, rows: slice, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return itc_distillation_loss(
        image,
        text,
        p["momentum_image"][rows],
        p["momentum_text"][rows],
        p["scale"],
        alpha,
        image_queue=p["image_queue"],
        text_queue=p["text_queue"],
        caption_ids=p["ids"][rows],
        queue_caption_ids=p["queue_ids"],
    )


def test_itc_distillation_with_queue_and_duplicates_matches_float64_reference():
    p = _itc_problem()
    everything = slice(0, 8)
    leaves = [p["image"].clone().requires_grad_(), p["text"].clone().requires_grad_()]
    ref_leaves = [p["image"].clone().requires_grad_(), p["text"].clone().requires_grad_()]
    ours = _itc_ours(p, 0.4, everything, *leaves)
    expected = _itc_reference(p, 0.4, everything, *ref_leaves)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(ours.detach(), expected.detach(), rtol=RTOL, atol=ATOL)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=RTOL, atol=ATOL)
    # alpha = 0 is ContrastiveLoss with the same queue and duplicate masking.
    hard = _itc_ours(p, 0.0, everything, p["image"], p["text"])
    for chunk_size in (None, 3):
        contrastive = ContrastiveLoss(chunk_size)(
            p["image"],
            p["text"],
            p["scale"],
            image_queue=p["image_queue"],
            text_queue=p["text_queue"],
            caption_ids=p["ids"],
            queue_caption_ids=p["queue_ids"],
        )
        torch.testing.assert_close(hard, contrastive, rtol=RTOL, atol=ATOL)


def test_distillation_errors():
    online, momentum, positives = _logits(2)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            momentum_distillation_loss(online, momentum, positives, alpha)
    with pytest.raises(ValueError, match="same"):
        momentum_distillation_loss(online, momentum[:, :3], positives, 0.4)
    p = _itc_problem()
    with pytest.raises(ValueError, match="both queues"):
        itc_distillation_loss(p["image"], p["text"], p["image"], p["text"], p["scale"], 0.4, text_queue=p["text_queue"])


# ------------------------------------------------------------------------------------------------------ 2 processes

LOCAL = 4


def _two_rank_worker(rank: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(WORLD * LOCAL, 3, generator=gen) for _ in range(3)]
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    queue = FeatureQueue(10, 3, track_caption_ids=True)
    for step, keys in enumerate(batches):
        queue.enqueue(keys[mine], -keys[mine], torch.arange(step * 8, step * 8 + 8)[mine])
    p = _itc_problem()
    image, text = p["image"][mine].clone().requires_grad_(), p["text"][mine].clone().requires_grad_()
    loss = _itc_ours(p, 0.4, mine, image, text)
    loss.backward()
    image_q, text_q, ids_q = queue.columns()
    return {"image_q": image_q, "text_q": text_q, "ids_q": ids_q, "ptr": torch.tensor(queue.ptr), "loss": loss.detach(),
            "d_image": image.grad, "d_text": text.grad}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_two_ranks(_two_rank_worker, tmp_path_factory.mktemp("queue"))


@pytest.mark.slow
def test_every_rank_holds_the_queue_of_the_global_batches(two_ranks):
    gen = torch.Generator().manual_seed(0)
    single = FeatureQueue(10, 3, track_caption_ids=True)
    for step in range(3):
        keys = torch.randn(WORLD * LOCAL, 3, generator=gen)
        single.enqueue(keys, -keys, torch.arange(step * 8, step * 8 + 8))
    image_q, text_q, ids_q = single.columns()
    for r in two_ranks:
        assert (
            torch.equal(r["image_q"], image_q) and torch.equal(r["text_q"], text_q) and torch.equal(r["ids_q"], ids_q)
        )
        assert r["ptr"].item() == single.ptr == 4


@pytest.mark.slow
def test_two_process_distillation_matches_the_reference_of_each_rank(two_ranks):
    p = _itc_problem()
    image, text = p["image"].clone().requires_grad_(), p["text"].clone().requires_grad_()
    global_loss = _itc_reference(p, 0.4, slice(0, 8), image, text)
    global_loss.backward()
    for rank, r in enumerate(two_ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        rank_loss = _itc_reference(p, 0.4, rows, p["image"], p["text"])
        torch.testing.assert_close(r["loss"], rank_loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["d_image"], WORLD * image.grad[rows], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["d_text"], WORLD * text.grad[rows], rtol=RTOL, atol=ATOL)
