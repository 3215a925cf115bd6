"""Plan a run before spending on it: `python -m clipkit.plan` predicts memory, FLOPs, time, cost and the data side of
a CLIP training run at any scale, from the model itself (counted on the meta device and fake tensors), a GPU table,
and a calibration file of clipkit's own measured costs (written by the bench/ scripts).

One concept per module: model (params, FLOPs, activations counted from the model), loss (the contrastive loss's
memory, FLOPs and all-gather), memory (ZeRO model states, step peak, largest batch), flops (step FLOPs and compute
time), comm (collective bytes and time), gpus (the GPU table), data (loaders, shards, data prep), calibration (the
measured numbers), plan (one plan), cli (the command line).
"""

from clipkit.plan.plan import PlanRequest, make_plan

__all__ = ["PlanRequest", "make_plan"]
