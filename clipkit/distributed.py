"""All cross-rank communication of clipkit.

Every function here has a single-process path (torch.distributed not initialised, or a world of one) that computes the
same math as the multi-rank path, so callers never branch on "am I distributed". Works with the gloo backend on CPU and
with NCCL on GPU (tensors handed to a collective must then live on the current CUDA device).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) in a single process."""
    if not is_dist():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and the single-process path) use CPU.
    if is_dist() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All-gather a per-rank batch along dim 0, keeping the gradient.

    x: [B, D] (any float dtype), the same B on every rank. Returns [W*B, D], rank r's rows at [r*B, (r+1)*B).
    The backward sums the incoming gradients of every rank and hands each rank its own slice (reduce-scatter), so a
    loss computed on the gathered tensor trains the local features: open_clip's `gather_with_grad=True`.
    Single process: returns x itself.
    """
    if rank_world()[1] == 1:
        return x
    # Imported here: torch.distributed.nn pulls in RPC bits that a single-process user never needs.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks: a new tensor on t's device, no gradient, `t` not modified. Single process: a copy.

    The collective runs on the backend's device (a CPU tensor is moved to the GPU for NCCL and back), so callers can
    reduce host-side counters and device-side losses alike.
    """
    if rank_world()[1] == 1:
        return t.detach().clone()
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor, no gradient), e.g. to log one loss value. Needs a float dtype."""
    world = rank_world()[1]
    out = all_reduce_sum(t)
    return out / world if world > 1 else out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one rank (all-reduce MAX).

    Used for the non-finite-loss check: if one rank skipped the optimizer step and the others did not, the replicas
    would silently diverge (and DeepSpeed/DDP would hang in the next gradient all-reduce), so all ranks decide together.
    """
    if rank_world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a JSON-serialisable object (dict, list, str, numbers, bools, None) from rank `src` to every rank.

    Returns the object as rank `src` had it (non-src ranks may pass anything, e.g. None). JSON rather than
    `dist.broadcast_object_list`, which pickles: clipkit loads no pickles (see STYLE.md / security rules).
    Single process: returns `obj` unchanged (not round-tripped through JSON).
    """
    rank, world = rank_world()
    if world == 1:
        return obj
    device = _comm_device()
    if rank == src:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(device)
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    # Two broadcasts: receivers must know the payload size before they can allocate the buffer.
    dist.broadcast(length, src=src)
    if rank != src:
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src)
    return json.loads(payload.cpu().numpy().tobytes().decode("utf-8"))
