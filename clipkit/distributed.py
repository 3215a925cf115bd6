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


def gather_detached(x: torch.Tensor) -> torch.Tensor:
    """All-gather a per-rank tensor along dim 0 without gradient, e.g. caption ids or a queue's new keys.

    x: [B, ...] of any dtype (float features, int64 ids), the same shape on every rank. Returns a new [W*B, ...]
    tensor on x's device, rank r's rows at [r*B, (r+1)*B); every rank gets the same tensor. The collective runs on
    the backend's device (as all_reduce_sum). Single process: x.detach() (no copy).
    """
    world = rank_world()[1]
    if world == 1:
        return x.detach()
    local = x.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=0).to(x.device)


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


def all_gather_json(obj: Any) -> list:
    """Every rank's JSON-serialisable `obj`, as a list indexed by rank, on every rank (JSON, not pickle, as
    `broadcast_object`). Single process: [obj]."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    device = _comm_device()
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(device)
    length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    size = int(max(n.item() for n in lengths))
    padded = torch.zeros(size, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [json.loads(c[: int(n.item())].cpu().numpy().tobytes().decode("utf-8")) for c, n in zip(chunks, lengths)]


def barrier() -> None:
    """Every rank waits here for all the others (no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- DeepSpeed parameters
# Under DeepSpeed a parameter may exist in several copies: the module's (bf16 under bf16 training; partitioned over
# ranks under ZeRO-3, as `param.ds_tensor`) and the optimizer's fp32 master (partitioned over ranks under ZeRO 1-3, a
# fragment per rank at `param._hp_mapping`, or `param._z3_optimizer` under ZeRO-3). These helpers are the only code
# that touches those copies; each says whether it is a collective.


def gathered_parameters(params, enabled: bool):
    """Context in which ZeRO-3 partitioned `params` are whole on every rank (a collective); a no-op when disabled."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params))


def full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The optimizer's fp32 master copy of `param`, whole, on every rank (a collective under ZeRO 1-3: every rank must
    call it for the same parameter). None for a parameter DeepSpeed keeps no master of (frozen, or no DeepSpeed)."""
    if not param.requires_grad:
        return None
    # `_hp_mapping` exists (None on ranks not holding a fragment) on every rank for every parameter the optimizer
    # owns, so every rank takes the same branch here and meets the others in the collective.
    if not hasattr(param, "ds_id") and not hasattr(param, "_hp_mapping"):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def clamp_param_(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamps every copy of `param` that this rank holds, in place: the module's (or its ZeRO-3 partition) and this
    rank's fragment of the fp32 master. No collective and no host sync: each rank clamps its own copies, which are
    replicas or disjoint partitions of one value, so the result equals clamping the whole parameter once."""
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: the module parameter is a partition; so is the master
            param.ds_tensor.clamp_(low, high)
            if param.data.numel():  # gathered right now (small parameters stay gathered: ZeRO-3 "persistence")
                param.data.clamp_(low, high)
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            local = safe_get_local_fp32_param(param)
            if local is not None and local.numel():
                safe_set_local_fp32_param(param, local.clamp(low, high))
            return
        param.data.clamp_(low, high)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's fragment of the master
            mapping.get_hp_fragment().clamp_(low, high)


def read_param(param: torch.nn.Parameter, zero3: bool) -> torch.Tensor:
    """A detached copy of the whole module parameter (a collective under ZeRO-3, where every rank must call it)."""
    with gathered_parameters([param], enabled=zero3):
        return param.detach().clone()


def full_fp32_state_dict(module: torch.nn.Module, zero3: bool,
                         frozen: dict | None = None) -> dict:
    """The module's state dict in float32 from the optimizer's fp32 masters (a collective: every rank calls it).

    Under DeepSpeed bf16 the module's own weights are the bf16 rounding of the masters; this returns the masters.
    Parameters without a master (frozen ones) come from `frozen` (name -> tensor, e.g. copied before DeepSpeed cast
    the module), else from the module (gathered under ZeRO-3). Buffers come from the module. Tensors are on the CPU.
    """
    frozen = frozen or {}
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    out = {}
    for name in module.state_dict(keep_vars=True):
        if name in params:
            master = full_fp32_param(params[name])
            if master is None:
                master = frozen[name] if name in frozen else read_param(params[name], zero3)
            shape = getattr(params[name], "ds_shape", params[name].shape)  # ZeRO-3 keeps the whole shape aside
            out[name] = master.detach().to("cpu", torch.float32).reshape(shape)
        elif name in buffers:
            out[name] = buffers[name].detach().to("cpu")
    return out
