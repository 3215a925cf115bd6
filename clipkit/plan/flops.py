"""FLOPs of a training step and how long the step's compute takes.

FLOPs are torch's FlopCounterMode counts (clipkit/plan/model.py for the towers, clipkit/plan/loss.py for the loss),
so a sample costs what the counter sees for one real forward + backward of the same model and loss. Time on a GPU:
FLOPs / (peak dense TFLOP/s x MFU), MFU taken from a measured GPU run in the calibration file when there is one,
else ASSUMED_MFU (printed as assumed). Grad checkpointing recomputes each forward once more: those FLOPs take time
but, by MFU's convention, do not count as model FLOPs. On CPU: FLOPs / (cores x the FLOP/s per core that
bench/train_throughput.py measured for clipkit's training step).
"""

from __future__ import annotations

from typing import Dict, Tuple

from clipkit.plan.loss import loss_cost
from clipkit.plan.model import ModelProfile

# Used only while the calibration has no GPU training run; roughly what well-tuned CLIP training reaches on A100/H100
# with bf16 and fused attention. Always printed with "assumed".
ASSUMED_MFU = 0.35


def step_flops(profile: ModelProfile, local_batch: int, world: int, chunk_size: int | None = None) -> Dict[str, float]:
    """FLOPs on one rank per step: towers, loss, recompute (grad checkpointing), model total and executed total."""
    towers = profile.tower_flops * local_batch
    loss = loss_cost(local_batch, world, profile.embed_dim, chunk_size, profile.precision).flops
    recompute = profile.forward_flops * local_batch if profile.grad_checkpointing else 0.0
    return {"towers": towers, "loss": loss, "recompute": recompute, "model": towers + loss,
            "executed": towers + loss + recompute}


def gpu_mfu(calibration: Dict, gpu_name: str, override: float | None = None) -> Tuple[float, str]:
    """(MFU, where it comes from): --mfu, else a measured GPU run (the same GPU preferred), else ASSUMED_MFU."""
    if override:
        return float(override), "given with --mfu"
    runs = calibration.get("gpu_train") or {}
    runs = runs.get("runs", [runs]) if isinstance(runs, dict) else runs
    measured = [r for r in runs if isinstance(r, dict) and r.get("mfu")]
    same = [r for r in measured if gpu_name.split("-")[0].lower() in str(r.get("gpu", "")).lower()]
    if same or measured:
        r = (same or measured)[0]
        return float(r["mfu"]), f"measured: {r.get('model')} on {r.get('gpu')} (calibration gpu_train)"
    return ASSUMED_MFU, "assumed: the calibration has no GPU training run yet (bench/gpu_train.sh measures one)"


def cpu_flops_per_core(calibration: Dict) -> Tuple[float, str]:
    """Sustained FLOP/s of one core in clipkit's CPU training step (calibration cpu_train)."""
    run = calibration.get("cpu_train")
    if not run:
        raise ValueError("the calibration file has no cpu_train section: run bench/train_throughput.py "
                         "--calibration FILE")
    return float(run["flops_per_s_per_core"]), (f"measured: {run['model']} batch {run['batch_size']}, "
                                                f"{run['samples_per_s']:.1f} samples/s on {run['cores']} cores")


def compute_seconds(executed_flops: float, flops_per_s: float) -> float:
    return executed_flops / flops_per_s
