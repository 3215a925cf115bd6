"""Memory of one rank during a training step: model states by ZeRO stage, the step's transient buffers, activations
and the loss; and the largest local batch that fits.

Model states (persistent, bytes; P parameters, Pt trainable, N data-parallel ranks, w = 4 for fp32 weights, 2 for
bf16), as DeepSpeed 0.19 lays them out when clipkit hands it torch's AdamW (checked tensor by tensor in
tests/test_plan_memory.py):

| stage | parameters | fp32 master weights | Adam m and v |
|---|---|---|---|
| 0 | w P | fp32: none (the weights are the master); bf16: 4 Pt | 8 Pt |
| 1, 2 | w P | 4 Pt / N | 8 Pt / N |
| 3 | w (P / N + Pp) | 4 Pt / N | 8 Pt / N |

(Pp: parameters in tensors of at most 1e5 elements, which ZeRO-3 keeps whole on every rank beside their partition:
DeepSpeed's stage3_param_persistence_threshold.)

Transient (during backward and the optimizer step: gradients, DeepSpeed's flattened reduce buckets, fp32 gradient
partitions, ZeRO-3's gathered parameters, plus a fixed per-process part): fixed + a P + b P / N bytes, fitted by
`bench/plan_memory.py` to runs of two model sizes on 1 and 2 CPU processes, for each stage and precision, and read
from the calibration file (with fp32, b came out ~0; with bf16 the fp32 gradient partitions shrink with N).
DeepSpeed's buckets (5e8 elements by default) are larger than every CLIP model up to ViT-g, so the per-parameter
figure does not reach their cap; it is not modelled.

Peak = states + transient + activations (saved per sample x local batch, counted on the model; with grad
checkpointing plus one recomputed block) + the loss's peak (counted on fake tensors, see clipkit/plan/loss.py).
Activations and every gradient are counted live at once, which over-states the true peak a little (gradients appear
while activations are freed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict

from clipkit.plan.loss import loss_peak_bytes
from clipkit.plan.model import ModelProfile

WEIGHT_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class RankMemory:
    parameters: float
    master_weights: float
    optimizer: float
    transient: float  # gradients and communication buffers during the step
    activations: float
    loss: float

    @property
    def states(self) -> float:
        return self.parameters + self.master_weights + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.transient + self.activations + self.loss

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "states": self.states, "total": self.total}


def model_states(params: int, trainable: int, stage: int, world: int, precision: str,
                 persistent: int = 0) -> Dict[str, float]:
    """Persistent bytes per rank (see the module's table; `persistent` = Pp)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    w = WEIGHT_BYTES[precision]
    shard = world if stage >= 1 else 1
    master = 4.0 * trainable / shard if (stage >= 1 or precision == "bf16") else 0.0
    parameters = w * (params / world + persistent) if stage == 3 else w * params
    return {"parameters": parameters, "master_weights": master,
            "optimizer": 8.0 * trainable / shard}


def transient_bytes(params: int, stage: int, precision: str, calibration: Dict, world: int = 1) -> float:
    """Gradients and DeepSpeed's step buffers: fixed + per-parameter + per-parameter-per-rank bytes, fitted to
    measured runs (calibration "zero_transient", bench/plan_memory.py)."""
    table = calibration.get("zero_transient", {}).get(precision)
    if not table or str(stage) not in table:
        raise ValueError(f"the calibration file has no measured transient memory for ZeRO-{stage} {precision}: run "
                         "bench/plan_memory.py --calibration FILE")
    entry = table[str(stage)]
    return (float(entry.get("fixed_bytes", 0.0)) + float(entry["bytes_per_param"]) * params
            + float(entry.get("bytes_per_param_per_rank", 0.0)) * params / world)


def rank_memory(profile: ModelProfile, local_batch: int, world: int, stage: int, calibration: Dict,
                chunk_size: int | None = None) -> RankMemory:
    states = model_states(profile.params, profile.trainable, stage, world, profile.precision, profile.persistent)
    return RankMemory(
        parameters=states["parameters"], master_weights=states["master_weights"], optimizer=states["optimizer"],
        transient=transient_bytes(profile.params, stage, profile.precision, calibration, world),
        activations=profile.activation_bytes * local_batch + profile.recompute_bytes,
        loss=loss_peak_bytes(local_batch, world, profile.embed_dim, chunk_size, profile.precision))


def largest_batch(fits: Callable[[int], bool], limit: int = 1 << 20) -> int:
    """The largest b in [0, limit] with fits(b) (fits must be monotone: true up to some b, false after)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_local_batch(profile: ModelProfile, world: int, stage: int, calibration: Dict, capacity_bytes: float,
                    chunk_size: int | None = None) -> int:
    """The largest per-rank batch whose predicted peak fits in `capacity_bytes`.

    Everything but the loss is linear in the batch. The loss's memory (counted on fake tensors, ~1 s a count) is a
    quadratic in the batch at a fixed world size (tensors of [B, W*B], [B, D], [W*B, D]): it is counted at three
    batches, the answer found on the fitted curve, then confirmed by counting at it and one above (bisection when
    the fit is off)."""
    import numpy as np

    def total(b: int) -> float:
        return rank_memory(profile, b, world, stage, calibration, chunk_size).total

    fixed = rank_memory(profile, 0, world, stage, calibration, chunk_size)
    without_loss = fixed.total - fixed.loss
    per_sample = max(profile.activation_bytes, 1.0)
    hi = largest_batch(lambda n: without_loss + per_sample * n <= capacity_bytes) + 1  # never fits
    if hi == 1:
        return 0
    xs = sorted({max(1, (hi - 1) // 4), max(1, (hi - 1) // 2), hi - 1})
    loss = [total(x) - without_loss - per_sample * x for x in xs]
    coef = np.polyfit(xs, loss, len(xs) - 1)
    guess = largest_batch(lambda n: without_loss + per_sample * n + float(np.polyval(coef, n)) <= capacity_bytes,
                          limit=hi - 1)
    lo = guess if total(guess) <= capacity_bytes else 0
    hi = guess + 1 if total(guess + 1) > capacity_bytes else hi
    while hi - lo > 1:  # total(lo) fits (or lo = 0), total(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= capacity_bytes else (lo, mid)
    return lo
