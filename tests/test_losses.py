"""Losses and cross-rank helpers against open_clip: float64 on CPU, plus bf16 features, plus CUDA where there is one.

Two-process checks run ONE torch.multiprocessing spawn (gloo on 127.0.0.1) shared by several tests; each rank computes
open_clip's loss and ours on the same inputs in the same process and saves the results for the parent to compare.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipClipLoss
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
from torch.utils._python_dispatch import TorchDispatchMode

from clipkit import distributed
from clipkit.losses import ContrastiveLoss, SigLipLoss, build_loss

RTOL, ATOL = 1e-5, 1e-12
WORLD = 2
LOCAL_BATCH = 13  # per rank; not divisible by the chunk size below, so the ragged last chunk is exercised
DIST_CHUNK = 5


def _features(batch: int, dim: int, seed: int, dtype=torch.float64):
    """L2-normalised image/text features and an exponentiated logit scale, as a CLIP model produces them."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    # Correlate the pairs so the positives matter (random pairs give a near-uniform softmax).
    text = F.normalize(text + 0.7 * image, dim=-1)
    return image, text, torch.tensor([12.5], dtype=dtype)


def _loss_and_grads(loss_fn, image, text, *scalars):
    """Loss value and gradients w.r.t. every input: [loss, d_image, d_text, d_scalar...]."""
    leaves = [x.detach().clone().requires_grad_() for x in (image, text, *scalars)]
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


def _assert_all_close(actual, expected):
    for name, a, e in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------- 1 process


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64, 500])  # 48 % 7 != 0; 64 and 500 > B
def test_clip_loss_matches_open_clip_single_process(chunk_size):
    image, text, scale = _features(48, 24, seed=0)
    expected = _loss_and_grads(OpenClipClipLoss(), image, text, scale)
    actual = _loss_and_grads(ContrastiveLoss(chunk_size=chunk_size), image, text, scale)
    _assert_all_close(actual, expected)


def test_chunked_equals_unchunked_float32_and_0dim_scale():
    image, text, scale = _features(300, 64, seed=1, dtype=torch.float32)
    scale = torch.tensor(100.0)  # open_clip's clamp value: the largest logits a trained model produces
    plain = _loss_and_grads(ContrastiveLoss(), image, text, scale)
    chunked = _loss_and_grads(ContrastiveLoss(chunk_size=64), image, text, scale)
    assert chunked[3].shape == scale.shape
    for a, e in zip(chunked, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_loss_is_finite_for_extreme_logits():
    # Every pair anti-aligned at scale 100: all logits near -100, exp() of which underflows float32 unless the
    # logsumexp is shifted per row/column. A global shift would give inf/nan here.
    image, _, _ = _features(64, 16, seed=2, dtype=torch.float32)
    text = -image
    scale = torch.tensor([100.0])
    expected = _loss_and_grads(OpenClipClipLoss(), image, text, scale)
    actual = _loss_and_grads(ContrastiveLoss(chunk_size=8), image, text, scale)
    assert all(torch.isfinite(x).all() for x in actual)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_siglip_matches_open_clip_single_process():
    image, text, scale = _features(40, 24, seed=3)
    bias = torch.tensor([-10.0], dtype=torch.float64)
    expected = _loss_and_grads(OpenClipSigLipLoss(), image, text, scale, bias)
    actual = _loss_and_grads(SigLipLoss(), image, text, scale, bias)
    _assert_all_close(actual, expected)


def test_build_loss():
    assert isinstance(build_loss("clip"), ContrastiveLoss)
    assert build_loss("clip", chunk_size=256).chunk_size == 256
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(ValueError, match="unknown loss 'infonce'.*clip, siglip"):
        build_loss("infonce")
    with pytest.raises(ValueError, match="clip' loss only"):
        build_loss("siglip", chunk_size=128)
    with pytest.raises(ValueError, match="positive"):
        ContrastiveLoss(chunk_size=0)


def test_distributed_helpers_single_process():
    assert not distributed.is_dist()
    assert distributed.rank_world() == (0, 1)
    x = torch.randn(3, 4)
    assert distributed.gather_features(x) is x
    torch.testing.assert_close(distributed.all_reduce_mean(x), x)
    torch.testing.assert_close(distributed.all_reduce_sum(x), x)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 64])
def test_bf16_features_match_float64_loss_of_the_same_values(device, chunk_size):
    # bf16 features as under autocast: matmuls in bf16, softmax statistics in float32. The reference is the float64
    # loss of the same bf16-rounded values, so only our arithmetic's error is measured. 1/0.07 (CLIP's initial scale)
    # is not a bf16 number, so a scale rounded to bf16 would add its 0.2% error.
    image, text, _ = (x.to(device) for x in _features(300, 64, seed=6))
    image16, text16 = image.bfloat16(), text.bfloat16()
    scale = torch.tensor([1 / 0.07], dtype=torch.float64, device=device)
    reference = _loss_and_grads(OpenClipClipLoss(), image16.double(), text16.double(), scale)
    actual = _loss_and_grads(ContrastiveLoss(chunk_size=chunk_size), image16, text16, scale.float())
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == torch.bfloat16
    # Error relative to the largest entry: bf16 logits and grads carry ~3 significant digits. open_clip's ClipLoss
    # under CPU autocast errs by up to 6e-4, 9e-3, 8e-3 and 7e-4 on these inputs (seeds 6-8).
    for name, a, e, bound in zip(["loss", "d_image", "d_text", "d_scale"], actual, reference, [1e-3, 2e-2, 2e-2, 2e-3]):
        error = ((a.double() - e).abs().max() / e.abs().max()).item()
        assert error < bound, f"{name}: relative error {error:.2e} >= {bound}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_size", [None, 64])
def test_clip_loss_on_cuda_matches_open_clip_float64(chunk_size):
    image, text, scale = (x.cuda() for x in _features(300, 64, seed=6))
    expected = _loss_and_grads(OpenClipClipLoss(), image, text, scale)
    _assert_all_close(_loss_and_grads(ContrastiveLoss(chunk_size=chunk_size), image, text, scale), expected)


# ------------------------------------------------------------------------------------------------- memory (B x B)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward ops both dispatch through here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensors(loss_fn, batch: int):
    """(largest tensor created in forward, in backward, largest tensor saved for backward), in elements."""
    image, text, scale = (x.requires_grad_() for x in _features(batch, 32, seed=4, dtype=torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _LargestAllocation() as forward_mode:
            loss = loss_fn(image, text, scale)
    with _LargestAllocation() as backward_mode:
        loss.backward()
    assert image.grad is not None and text.grad is not None and scale.grad is not None
    return forward_mode.largest, backward_mode.largest, max(saved)


def test_chunked_path_never_materialises_batch_squared():
    batch, chunk = 512, 64
    # Positive control: the plain path builds [B, B] logits in forward, saves them, and builds [B, B] in backward;
    # the detector must see all three, or the check below would prove nothing.
    plain = _largest_tensors(ContrastiveLoss(), batch)
    assert all(n >= batch * batch for n in plain), plain
    chunked = _largest_tensors(ContrastiveLoss(chunk_size=chunk), batch)
    assert all(n <= chunk * batch for n in chunked), chunked


# ------------------------------------------------------------------------------------------------------ 2 processes


def _free_port() -> int:
    from tests._train import free_port

    return free_port()


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: open_clip and clipkit on this rank's slice of a global batch, results saved to out_dir/rank{r}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, text, scale = _features(WORLD * LOCAL_BATCH, 24, seed=5)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        image, text = image[rows], text[rows]
        bias = torch.tensor([-10.0], dtype=torch.float64)
        payload = {"step": 7, "name": "ünï", "sizes": [1, 2.5, None]}
        reference = OpenClipClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        results = {
            "clip_open_clip": _loss_and_grads(reference, image, text, scale),
            "clip_plain": _loss_and_grads(ContrastiveLoss(), image, text, scale),
            "clip_chunked": _loss_and_grads(ContrastiveLoss(chunk_size=DIST_CHUNK), image, text, scale),
            "siglip_open_clip": _loss_and_grads(
                OpenClipSigLipLoss(rank=rank, world_size=WORLD), image, text, scale, bias
            ),
            "siglip_ours": _loss_and_grads(SigLipLoss(), image, text, scale, bias),
            "rank_world": torch.tensor(distributed.rank_world()),
            "gathered": distributed.gather_features(torch.full((2, 3), float(rank))),
            "reduce_sum": distributed.all_reduce_sum(torch.tensor([rank + 1.0])),
            "reduce_mean": distributed.all_reduce_mean(torch.tensor([rank + 1.0])),
            "any_true": torch.tensor(distributed.any_rank(rank == 1)),
            "any_false": torch.tensor(distributed.any_rank(False)),
            "broadcast_ok": torch.tensor(distributed.broadcast_object(payload if rank == 0 else None) == payload),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()  # both done before the group is torn down (see tests/_two_ranks.py)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_rank_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["clip_plain", "clip_chunked"])
def test_clip_loss_matches_open_clip_two_processes(two_ranks, variant):
    for rank_results in two_ranks:
        _assert_all_close(rank_results[variant], rank_results["clip_open_clip"])


@pytest.mark.slow
def test_two_process_clip_loss_equals_global_batch_loss(two_ranks):
    # The local-loss formulation partitions the rows of the global [W*B, W*B] problem: the mean of the rank losses is
    # the single-process loss of the global batch; each rank's feature gradient (summed over ranks by the gather's
    # backward) is W times the global gradient of its slice, and the mean of the scale gradients is the global one.
    image, text, scale = _features(WORLD * LOCAL_BATCH, 24, seed=5)
    loss, d_image, d_text, d_scale = _loss_and_grads(OpenClipClipLoss(), image, text, scale)
    chunked = [r["clip_chunked"] for r in two_ranks]
    torch.testing.assert_close(torch.stack([c[0] for c in chunked]).mean(), loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([c[1] for c in chunked]), WORLD * d_image, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([c[2] for c in chunked]), WORLD * d_text, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.stack([c[3] for c in chunked]).mean(0), d_scale, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_siglip_matches_open_clip_two_processes(two_ranks):
    for rank_results in two_ranks:
        _assert_all_close(rank_results["siglip_ours"], rank_results["siglip_open_clip"])
    # Both ranks together cover every pair of the global batch once: sum of rank losses = W * global loss. A wrapper
    # that failed to pass rank/world_size to open_clip would only see local pairs and miss this.
    image, text, scale = _features(WORLD * LOCAL_BATCH, 24, seed=5)
    global_loss = OpenClipSigLipLoss()(image, text, scale, torch.tensor([-10.0], dtype=torch.float64))
    rank_sum = sum(r["siglip_ours"][0] for r in two_ranks)
    torch.testing.assert_close(rank_sum, WORLD * global_loss, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_distributed_helpers_two_processes(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["rank_world"].tolist() == [rank, WORLD]
        torch.testing.assert_close(r["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        torch.testing.assert_close(r["reduce_sum"], torch.tensor([3.0]))
        torch.testing.assert_close(r["reduce_mean"], torch.tensor([1.5]))
        assert r["any_true"].item() and not r["any_false"].item()
        assert r["broadcast_ok"].item()
