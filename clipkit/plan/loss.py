"""The contrastive loss's cost on one rank, counted by running clipkit's own `ContrastiveLoss` (forward + backward) on
fake tensors: no memory is allocated, so any batch is cheap to count.

- memory: torch's MemTracker (torch.distributed._tools.mem_tracker) peak over the loss's forward + backward, on
  FakeTensorMode tensors; the features' gradients are included, the input features are not (they belong to the
  towers). Across ranks the loss gathers every rank's features: a fake process group (torch's "fake" backend) of
  `world` ranks makes the collectives shape-correct no-ops, so the gathered [W*B, D] tensors are counted too.
- FLOPs: torch's FlopCounterMode over the same forward + backward.
- all-gather bytes: what one rank receives per step, forward (features) plus backward (their gradients).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LossCost:
    peak_bytes: float  # extra memory of forward + backward on one rank
    flops: float  # forward + backward on one rank
    allgather_bytes: float  # received by one rank per step (features forward, their gradients backward)


@contextlib.contextmanager
def fake_world(world: int):
    """A fake default process group of `world` ranks (this process is rank 0) for the duration of the block."""
    if world == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner counts the loss in its own fake process group: call it outside a distributed "
                           "run")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(local_batch: int, dim: int, chunk_size: int | None, dtype: torch.dtype):
    from clipkit.losses import ContrastiveLoss

    image = torch.randn(local_batch, dim, dtype=dtype).requires_grad_()
    text = torch.randn(local_batch, dim, dtype=dtype).requires_grad_()
    log_scale = torch.tensor([2.659], requires_grad=True)

    def step():
        ContrastiveLoss(chunk_size=chunk_size)(image, text, log_scale.exp()).backward()

    step.input_bytes = sum(t.numel() * t.element_size() for t in (image, text))
    return step


@functools.lru_cache(maxsize=1024)
def loss_peak_bytes(local_batch: int, world: int, dim: int, chunk_size: int | None = None,
                    precision: str = "bf16") -> float:
    """Peak extra memory of the loss's forward + backward on one of `world` ranks (MemTracker on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with fake_world(world), FakeTensorMode():
        step = _run(local_batch, dim, chunk_size, DTYPES[precision])
        tracker = MemTracker()
        with tracker:
            step()
        peak = sum(float(per_device["Total"]) for per_device in tracker.get_tracker_snapshot("peak").values())
        # The tracker registers the input features when the loss first reads them and counts them in its peak; they
        # are the towers' outputs, not the loss's (a measured baseline holds them already).
        return peak - step.input_bytes


@functools.lru_cache(maxsize=256)
def loss_flops(local_batch: int, world: int, dim: int, chunk_size: int | None = None, precision: str = "bf16") -> float:
    """FLOPs of the loss's forward + backward on one of `world` ranks (FlopCounterMode on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with fake_world(world), FakeTensorMode():
        step = _run(local_batch, dim, chunk_size, DTYPES[precision])
        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())


def loss_cost(local_batch: int, world: int, dim: int, chunk_size: int | None = None,
              precision: str = "bf16") -> LossCost:
    """Peak memory, FLOPs and all-gather bytes of the InfoNCE loss on one of `world` ranks with `local_batch` pairs
    of `dim`-dim features in `precision` (the features' dtype; the loss keeps its statistics in float32)."""
    element = torch.tensor([], dtype=DTYPES[precision]).element_size()
    gathered = 2 * (world - 1) * local_batch * dim * element  # image + text features from the other ranks
    return LossCost(peak_bytes=loss_peak_bytes(local_batch, world, dim, chunk_size, precision),
                    flops=loss_flops(local_batch, world, dim, chunk_size, precision), allgather_bytes=2.0 * gathered)
