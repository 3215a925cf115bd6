"""SLIP's SimCLR term: NT-Xent against a written-out float64 reference, 1 and 2 processes; the MLP head."""

from __future__ import annotations

import pytest
import torch

from clipkit.losses import NTXentLoss, SimCLRHead
from tests._two_ranks import WORLD, run_on_two_ranks

RTOL, ATOL = 1e-6, 1e-12
LOCAL = 6


def _views(batch: int = WORLD * LOCAL, dim: int = 10, seed: int = 0):
    """Two un-normalised views per image, correlated, float64."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    view_a = 2.0 * base + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    view_b = 0.5 * base + 0.2 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return view_a, view_b


def _reference(view_a, view_b, tau, rows=None):
    """SimCLR's eq. 1: z = the 2N normalised views; row k's positive is its other view, the denominator all views
    but itself. rows: which images' two views to average over (a rank's), default all."""
    n = view_a.shape[0]
    z = torch.cat([view_a / view_a.norm(dim=1, keepdim=True), view_b / view_b.norm(dim=1, keepdim=True)])
    sim = z @ z.T / tau
    rows = range(n) if rows is None else rows
    losses = []
    for k in [*rows, *(n + i for i in rows)]:
        positive = (k + n) % (2 * n)
        others = [j for j in range(2 * n) if j != k]
        losses.append(-torch.log(torch.exp(sim[k, positive]) / torch.exp(sim[k, others]).sum()))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_the_written_out_reference(tau):
    view_a, view_b = _views()
    leaves = [view_a.clone().requires_grad_(), view_b.clone().requires_grad_()]
    ref_leaves = [view_a.clone().requires_grad_(), view_b.clone().requires_grad_()]
    loss = NTXentLoss(tau)(*leaves)
    expected = _reference(*ref_leaves, tau)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=RTOL, atol=ATOL)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=RTOL, atol=ATOL)


def test_nt_xent_float32_under_autocast_and_errors():
    view_a, view_b = (v.float() for v in _views())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = NTXentLoss()(view_a.bfloat16(), view_b.bfloat16())
    assert loss.dtype == torch.float32
    expected = _reference(view_a.bfloat16().double(), view_b.bfloat16().double(), 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="SSL temperature must be a finite number > 0"):
            NTXentLoss(tau)
    with pytest.raises(ValueError, match="two views of the same"):
        NTXentLoss()(view_a, view_b[:3])


def test_head_maps_each_sample_on_its_own():
    head = SimCLRHead(10, hidden_dim=16, out_dim=4).double()
    x = _views()[0]
    out = head(x)
    assert out.shape == (12, 4)
    # No cross-sample statistics (LayerNorm, not BatchNorm): splitting the batch over ranks changes nothing (up to
    # float64 rounding of the batched matmul; BatchNorm would change rows by O(1)).
    torch.testing.assert_close(torch.cat([head(x[:5]), head(x[5:])]), out, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in head.parameters()) == 10 * 16 + 16 + 2 * 16 + 16 * 4 + 4


# ------------------------------------------------------------------------------------------------------ 2 processes


def _two_rank_worker(rank: int) -> dict:
    view_a, view_b = _views()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    leaves = [view_a[rows].clone().requires_grad_(), view_b[rows].clone().requires_grad_()]
    loss = NTXentLoss(0.1)(*leaves)
    loss.backward()
    return {"loss": loss.detach(), "d_a": leaves[0].grad, "d_b": leaves[1].grad}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_two_ranks(_two_rank_worker, tmp_path_factory.mktemp("ssl"))


@pytest.mark.slow
def test_two_processes_compute_the_global_batch_loss(two_ranks):
    view_a, view_b = (v.requires_grad_() for v in _views())
    global_loss = _reference(view_a, view_b, 0.1)
    global_loss.backward()
    for rank, r in enumerate(two_ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        rank_loss = _reference(view_a.detach(), view_b.detach(), 0.1, rows=range(rows.start, rows.stop))
        torch.testing.assert_close(r["loss"], rank_loss, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["d_a"], WORLD * view_a.grad[rows], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["d_b"], WORLD * view_b.grad[rows], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.stack([r["loss"] for r in two_ranks]).mean(), global_loss.detach())
