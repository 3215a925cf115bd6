"""One plan: a run's memory, FLOPs, time, cost and data side, from the model (counted), the GPU table and the
calibration file (measured). `make_plan(PlanRequest(...))` returns a JSON-able dict; clipkit/plan/cli.py prints it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

from clipkit.plan import comm, data
from clipkit.plan.flops import compute_seconds, cpu_flops_per_core, gpu_mfu, step_flops
from clipkit.plan.gpus import RESERVED_GIB, get_gpu
from clipkit.plan.loss import loss_cost
from clipkit.plan.memory import WEIGHT_BYTES, max_local_batch, rank_memory
from clipkit.plan.model import profile_model

GIB = 2**30


@dataclass
class PlanRequest:
    model: str = "ViT-B-16"
    samples: float = 1e9  # samples seen
    global_batch: int = 32768
    gpus: int = 256  # data-parallel ranks (processes on CPU)
    gpu: str = "h100"  # a key of clipkit.plan.gpus.GPUS, or "cpu"
    zero: int = 2
    loss_chunk_size: int | None = None
    precision: str = "bf16"
    grad_checkpointing: bool = False
    interconnect_gbs: float | None = None  # per-GPU network GB/s across nodes (default: the GPU table's)
    gpus_per_node: int | None = None
    mfu: float | None = None
    memory_gib: float | None = None  # usable memory per rank (default: the GPU's less RESERVED_GIB; host RAM on CPU)
    cpu_cores: int | None = None  # CPU runs: cores all processes share (default: this machine's)
    urls: float | None = None  # data prep: URLs in the dump
    prep_nodes: int = 1
    prep_cores_per_node: int = 32
    samples_per_shard: int = 10000

    def validate(self) -> PlanRequest:
        if self.gpus < 1 or self.global_batch < 1 or self.samples <= 0:
            raise ValueError("--gpus, --global-batch and --samples must be positive")
        if self.global_batch % self.gpus:
            near = self.gpus * max(1, self.global_batch // self.gpus)
            raise ValueError(f"--global-batch {self.global_batch} is not a multiple of --gpus {self.gpus}: every rank "
                             f"takes the same local batch (e.g. --global-batch {near})")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.precision not in WEIGHT_BYTES:
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.gpu != "cpu":
            get_gpu(self.gpu)
        return self


def _device(req: PlanRequest, calibration: Dict) -> Dict[str, Any]:
    """Compute rate, memory per rank and interconnect of the device the plan runs on."""
    if req.gpu == "cpu":
        import os

        per_core, source = cpu_flops_per_core(calibration)
        cores = req.cpu_cores or os.cpu_count() or 1
        if req.memory_gib:
            memory = req.memory_gib * GIB
        else:
            import psutil

            memory = psutil.virtual_memory().total / req.gpus
        # The processes share the cores (one node): each rank computes at its share of them.
        return {"name": "cpu", "flops_per_s": per_core * cores / req.gpus, "rate_source": source, "cores": cores,
                "memory_bytes": memory, "gpus_per_node": req.gpus, "bandwidth_gbs": None}
    gpu = get_gpu(req.gpu)
    mfu, source = gpu_mfu(calibration, gpu.name, req.mfu)
    per_node = req.gpus_per_node or gpu.gpus_per_node
    return {"name": gpu.name, "note": gpu.note, "peak_tflops": gpu.peak_tflops(req.precision), "mfu": mfu,
            "mfu_source": source, "flops_per_s": gpu.peak_tflops(req.precision) * 1e12 * mfu,
            "memory_bytes": (req.memory_gib or gpu.memory_gib - RESERVED_GIB) * GIB, "gpus_per_node": per_node,
            "bandwidth_gbs": comm.bandwidth_gbs(gpu, req.gpus, per_node, req.interconnect_gbs)}


def make_plan(req: PlanRequest, calibration: Dict) -> Dict[str, Any]:
    req.validate()
    profile = profile_model(req.model, req.precision, req.grad_checkpointing)
    device = _device(req, calibration)
    n, b = req.gpus, req.global_batch // req.gpus
    memory = rank_memory(profile, b, n, req.zero, calibration, req.loss_chunk_size)
    capacity = device["memory_bytes"]
    flops = step_flops(profile, b, n, req.loss_chunk_size)
    compute_s = compute_seconds(flops["executed"], device["flops_per_s"])
    loss_now = loss_cost(b, n, profile.embed_dim, req.loss_chunk_size, req.precision)
    zero_bytes = comm.zero_bytes(profile.params, n, req.zero, WEIGHT_BYTES[req.precision])
    comm_bytes = zero_bytes + loss_now.allgather_bytes
    comm_s = comm.transfer_seconds(comm_bytes, device["bandwidth_gbs"]) if device["bandwidth_gbs"] else 0.0
    step_s = max(compute_s, comm_s)
    steps = math.ceil(req.samples / req.global_batch)
    wall_s = steps * step_s
    from clipkit.losses import RECOMMENDED_CHUNK_SIZE

    chunk = req.loss_chunk_size or RECOMMENDED_CHUNK_SIZE
    full, chunked = (loss_cost(b, n, profile.embed_dim, k, req.precision) for k in (None, chunk))
    plan: Dict[str, Any] = {
        "request": asdict(req),
        "model": {**profile.to_dict(), "flops_per_sample": flops["model"] / b},
        "device": device,
        "memory_per_rank": {**memory.to_dict(), "capacity": capacity, "fits": memory.total <= capacity,
                            "max_local_batch": max_local_batch(profile, n, req.zero, calibration, capacity,
                                                               req.loss_chunk_size)},
        "zero_by_stage": {s: rank_memory(profile, b, n, s, calibration, req.loss_chunk_size).to_dict()
                          for s in (0, 1, 2, 3)},
        "loss": {"local_batch": b, "columns": b * n, "full_logits": asdict(full), "chunked": asdict(chunked),
                 "chunk_size": chunk, "used": "chunked" if req.loss_chunk_size else "full_logits",
                 "share_of_step_flops": flops["loss"] / flops["model"]},
        "step": {"local_batch": b, "flops": flops, "compute_s": compute_s, "comm_bytes": comm_bytes,
                 "zero_comm_bytes": zero_bytes, "feature_allgather_bytes": loss_now.allgather_bytes,
                 "comm_s": comm_s, "step_s": step_s, "bound": "communication" if comm_s > compute_s else "compute",
                 "samples_per_s": req.global_batch / step_s, "samples_per_s_per_rank": b / step_s},
        "run": {"steps": steps, "wall_hours": wall_s / 3600, "gpu_hours": wall_s / 3600 * n,
                "total_flops": flops["model"] * n * steps},
        "data": {"loader": data.loader_side(req.global_batch / step_s, n, device["gpus_per_node"]),
                 "shards": data.shard_side(req.samples, profile.image_size[0], calibration, req.samples_per_shard)},
    }
    if req.urls:
        plan["data"]["prep"] = data.prep_side(req.urls, req.prep_nodes, req.prep_cores_per_node, calibration)
    return plan
