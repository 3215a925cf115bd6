"""Bytes each GPU sends per optimizer step, and how long that takes.

Ring collectives over N ranks move (N-1)/N of the buffer per rank for a reduce-scatter or an all-gather and twice
that for an all-reduce (NCCL's ring algorithm). DeepSpeed per step, with w bytes per gradient/weight element:
- ZeRO-0: all-reduce of the gradients: 2 (N-1)/N P w;
- ZeRO-1 and 2: reduce-scatter of the gradients, all-gather of the updated weights: 2 (N-1)/N P w;
- ZeRO-3: weights all-gathered in forward and again in backward, gradients reduce-scattered: 3 (N-1)/N P w.
The loss adds the all-gather of image and text features and, in backward, of their gradients (clipkit/plan/loss.py).
The bandwidth is the node's NVLink when every rank is on one node, else the per-GPU share of the network (the
slowest link of a flat ring; NCCL's tree and hierarchical algorithms do better, so this is an upper bound on time).
"""

from __future__ import annotations

from clipkit.plan.gpus import Gpu

ZERO_VOLUME = {0: 2.0, 1: 2.0, 2: 2.0, 3: 3.0}  # buffers of P w moved per step, times (N-1)/N


def zero_bytes(params: int, world: int, stage: int, weight_bytes: int) -> float:
    """Bytes one rank sends per step for gradients and weights under ZeRO `stage`."""
    if world <= 1:
        return 0.0
    return ZERO_VOLUME[stage] * (world - 1) / world * params * weight_bytes


def bandwidth_gbs(gpu: Gpu, world: int, gpus_per_node: int, inter_node_gbs: float | None = None) -> float:
    """GB/s one rank gets for collectives: NVLink/PCIe inside a node, the network share across nodes."""
    if world <= gpus_per_node:
        return gpu.intra_node_gbs
    return inter_node_gbs if inter_node_gbs else gpu.inter_node_gbs


def transfer_seconds(nbytes: float, gbs: float) -> float:
    return nbytes / (gbs * 1e9) if nbytes else 0.0
