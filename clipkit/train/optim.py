"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

import math
from typing import List

import torch
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, norms and the temperature/bias scalars get no weight decay (as open_clip_train does)."""
    return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
            or "logit_scale" in name or "logit_bias" in name)


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(model: nn.Module, lr: float, wd: float, betas=(0.9, 0.98), eps=1e-6) -> torch.optim.Optimizer:
    """AdamW with PyTorch's fused kernel (CPU and CUDA): one pass over each parameter instead of foreach's several
    (about 3x less optimizer time for clipkit-tiny on CPU; see BENCHMARKS.md "Training throughput")."""
    return torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=betas, eps=eps, fused=True)


def warmup_cosine(warmup: int, total: int):
    """LR multiplier for step s (0-based): linear warm-up from 1/warmup to 1 over `warmup` steps, cosine to 0 at
    `total`."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
