"""FLOPs of a CLIP model per sample, counted by torch's FLOP counter, and the peak throughput of known devices.

Training FLOPs per sample are taken as 3x the forward's (backward ~ 2x forward: the usual estimate of Kaplan et al.
2020 and PaLM's MFU definition, Chowdhery et al. 2022); the contrastive loss's B x B matmuls are left out (under 1% at
the batch sizes people train with, and they depend on the global batch, not the sample).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

# Peak dense TFLOP/s per device from the vendors' data sheets (no sparsity). bf16: tensor cores; fp32: TF32.
PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp32": 494.0},  # SXM; the PCIe card is ~756 / 378
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 181.0},
    "A10": {"bf16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp32": 60.0},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores (V100 has no bf16)
}


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of one device for `precision` (bf16 | fp32): `override` if given, else the table entry
    whose name appears in the CUDA device name; None on CPU or for an unknown GPU."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks["bf16" if precision == "bf16" else "fp32"]
    return None


@torch.no_grad()
def forward_flops(model: nn.Module, image_size: int | tuple, context_length: int) -> Dict[str, int]:
    """FLOPs of one sample's forward through `model.encode_image` and `model.encode_text` (torch's FlopCounterMode on
    a batch of one, on the model's device and dtype): {"image": ..., "text": ..., "total": ...}.

    Counted in train mode, the mode training runs in: in eval mode nn.MultiheadAttention takes a fused kernel the
    counter does not see (its attention FLOPs would be missing). Buffers (BatchNorm statistics) are put back."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    images = torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    texts = torch.zeros(1, context_length, dtype=torch.long, device=param.device)
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train()
    try:
        counts = {}
        for name, fn, arg in (("image", model.encode_image, images), ("text", model.encode_text, texts)):
            # torch's counter knows the CUDA attention kernels, not the CPU one: counted with the same formula
            counter = FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop})
            with counter:
                fn(arg)
            counts[name] = int(counter.get_total_flops())
    finally:
        model.train(was_training)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    counts["total"] = counts["image"] + counts["text"]
    return counts


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def train_flops_per_sample(model: nn.Module, image_size: int | tuple, context_length: int) -> int:
    """3 x the forward FLOPs of one sample (see the module docstring)."""
    return 3 * forward_flops(model, image_size, context_length)["total"]
