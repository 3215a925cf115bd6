"""The GPU table: peak dense TFLOP/s (clipkit.flops.PEAK_TFLOPS, vendors' data sheets, no sparsity), memory, and the
bandwidth one GPU gets for collectives inside a node (NVLink/PCIe, one direction) and across nodes (the node's
network cards divided by its GPUs: typical cluster builds, override with --interconnect).

Memory is what `torch.cuda.mem_get_info` reports as total on the card (GiB), less the CUDA context and allocator
reserve the planner leaves free (RESERVED_GIB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

RESERVED_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation: not available to tensors


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_key: str  # key into clipkit.flops.PEAK_TFLOPS
    memory_gib: float
    intra_node_gbs: float  # GB/s per GPU, one direction (NVLink or PCIe)
    inter_node_gbs: float  # GB/s per GPU across nodes (network cards of a node / its GPUs)
    gpus_per_node: int
    note: str

    def peak_tflops(self, precision: str) -> float:
        from clipkit.flops import PEAK_TFLOPS

        return PEAK_TFLOPS[self.peak_key]["bf16" if precision == "bf16" else "fp32"]


GPUS: Dict[str, Gpu] = {g.name: g for g in (
    Gpu("v100", "V100", 32.0, 150.0, 12.5, 8, "SXM2 32 GB, NVLink 2 (300 GB/s both ways), 4x EDR 100 Gb/s per node; "
                                             "fp16 tensor cores (no bf16)"),
    Gpu("a100-40gb", "A100", 40.0, 300.0, 25.0, 8, "SXM4, NVLink 3 (600 GB/s both ways), 8x HDR 200 Gb/s per node"),
    Gpu("a100", "A100", 80.0, 300.0, 25.0, 8, "SXM4 80 GB, NVLink 3 (600 GB/s both ways), 8x HDR 200 Gb/s per node"),
    Gpu("h100", "H100", 79.6, 450.0, 50.0, 8, "SXM5 80 GB, NVLink 4 (900 GB/s both ways), 8x NDR 400 Gb/s per node"),
    Gpu("h200", "H200", 140.4, 450.0, 50.0, 8, "SXM 141 GB, NVLink 4 (900 GB/s both ways), 8x NDR 400 Gb/s per node"),
    Gpu("l40s", "L40S", 44.4, 32.0, 3.1, 8, "48 GB, PCIe 4.0 x16, 2x 100 Gb/s per node"),
)}


def get_gpu(name: str) -> Gpu:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown --gpu {name!r}: one of {', '.join(GPUS)}")
    return GPUS[key]
