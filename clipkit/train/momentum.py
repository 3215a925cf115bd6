"""The momentum (EMA) model that produces queue keys: MoCo's key encoder, ALBEF's momentum towers.

After every optimizer step, `theta_k = M * theta_k + (1 - M) * theta_q` over all parameters of both towers (He et
al. 2020, https://arxiv.org/abs/1911.05722, eq. 2; ALBEF uses M = 0.995). The copy is not trained (requires_grad
False), so it is in no optimizer and gets no weight decay; buffers (e.g. BatchNorm statistics) are copied from the
online model at each update. It is a plain object, not an nn.Module attribute of the model, so nothing that walks
the model's parameters (optimizer, DeepSpeed, checkpoint export of the online model) sees it.

M = 0 keeps no copy: keys are the online model's detached features of the same step ("cross-batch memory", Wang et
al. 2020, https://arxiv.org/abs/1912.06798), which costs no second forward.

Works on a plain nn.Module holding the full parameters (single process, DDP, ZeRO-1/2 where each rank holds all
weights). Under ZeRO-3 the parameters of the online module are partitioned placeholders, so neither the deepcopy
nor the update below would see real weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumModel:
    """EMA copy of a CLIP model (anything with encode_image / encode_text, e.g. open_clip's CLIP) for queue keys.

    model: the online model (unwrapped nn.Module). momentum: M in [0, 1); 0 = no copy, keys are online features.
    dtype: the copy's parameter dtype (default float32: with M = 0.995 each update moves a weight by 0.5% of its
    distance to the online one, which bf16's 8-bit mantissa would mostly round away).
    """

    def __init__(self, model: nn.Module, momentum: float, dtype: torch.dtype | None = torch.float32):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"momentum must be in [0, 1) (0 = online features, no EMA copy; MoCo/ALBEF use 0.995-0.999), "
                f"got {momentum!r}"
            )
        self.momentum = float(momentum)
        self.model: nn.Module | None = None
        if self.momentum > 0:
            self.model = copy.deepcopy(model)
            if dtype is not None:
                self.model.to(dtype)
            self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """theta_k = M * theta_k + (1 - M) * theta_q for every parameter; buffers copied. Call after each optimizer
        step, on every rank, with the same (unwrapped) online model the copy was made from. No-op for M = 0."""
        if self.model is None:
            return
        online = dict(model.named_parameters())
        ema = dict(self.model.named_parameters())
        if online.keys() != ema.keys():
            raise ValueError("update() got a model with other parameters than the one the momentum copy was made of")
        keys = list(ema)
        ema_params = [ema[k] for k in keys]
        torch._foreach_mul_(ema_params, self.momentum)
        torch._foreach_add_(ema_params, [online[k].to(ema[k].dtype) for k in keys], alpha=1.0 - self.momentum)
        for (_, ema_buffer), (_, buffer) in zip(self.model.named_buffers(), model.named_buffers()):
            ema_buffer.copy_(buffer)
        self.model.train(model.training)

    @torch.no_grad()
    def keys(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys: ([B, D] image, [B, D] text), L2-normalised, no gradient.

        images: [B, 3, H, W] and texts: [B, L] token ids, the step's inputs; image_features, text_features: [B, D]
        the online model's normalised features of them. M > 0: the momentum model's encode_image / encode_text
        (normalize=True) of the inputs, in the features' dtype; M = 0: the online features, detached.
        """
        if self.model is None:
            return image_features.detach(), text_features.detach()
        image_keys = self.model.encode_image(images, normalize=True)
        text_keys = self.model.encode_text(texts, normalize=True)
        return image_keys.to(image_features.dtype), text_keys.to(text_features.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momentum model's state_dict() (tensors only, safetensors-compatible); empty for M = 0."""
        return {} if self.model is None else self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores state_dict() (strict: the same architecture). For M = 0 only an empty state is accepted."""
        if self.model is None:
            if state:
                raise ValueError("momentum 0 keeps no EMA weights, but the checkpoint holds some (momentum changed?)")
            return
        if not state:
            raise ValueError("the checkpoint holds no momentum weights, but momentum > 0 needs them (M changed?)")
        self.model.load_state_dict(state, strict=True)
