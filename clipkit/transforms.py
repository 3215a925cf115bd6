"""Train images leave the loader workers as uint8 and are normalised where the model runs.

open_clip's train transform ends with ToTensor (uint8 -> float / 255) and Normalize. Done in the workers, every
batch crosses process boundaries (shared memory) and the host-to-device copy as float32: 4 bytes per pixel channel
instead of 1, and the workers spend CPU on per-image float math. `split_uint8` cuts those two steps off the
transform; `DeviceNormalize` applies the same operations, in the same order, to the whole batch on its device, so
the result is bit-identical to the per-image transform (tests/test_transforms.py).
"""

from typing import Callable, Sequence, Tuple

import torch
from torchvision import transforms as T


class DeviceNormalize:
    """uint8 [B, C, H, W] -> float32, exactly as ToTensor then Normalize(mean, std) would make each image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects uint8 images, got {images.dtype}")
        if self.mean.device != images.device:  # once: not a host-to-device copy per batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = images.to(torch.float32).div_(255)  # ToTensor
        return x.sub_(self.mean).div_(self.std)  # Normalize


def split_uint8(transform: Callable) -> Tuple[Callable, DeviceNormalize | None]:
    """(transform ending in PILToTensor, DeviceNormalize) when `transform` is a Compose ending in ToTensor +
    Normalize (open_clip's are); otherwise (transform, None), unchanged."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return transform, None
    return T.Compose(steps[:-2] + [T.PILToTensor()]), DeviceNormalize(steps[-1].mean, steps[-1].std)
