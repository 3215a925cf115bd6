"""The accelerate Accelerator of a run, with clipkit's flags written into its DeepSpeed config."""

import os

import torch

from clipkit.train.config import TrainConfig


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Our flags win over the launcher's config file: accelerate reads these when it builds the DeepSpeed plugin.
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ or "ACCELERATE_USE_DEEPSPEED" in os.environ:
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(cfg.grad_accum)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(cfg.grad_clip or 0.0)
    handlers = []
    if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # launched by accelerate/torchrun
        # Without this, accelerate + DeepSpeed on CPU pick a backend under which every process thinks it is alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step ourselves
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["gradient_clipping"] = cfg.grad_clip or 0.0
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)
