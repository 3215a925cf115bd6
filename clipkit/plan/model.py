"""What the planner counts from the model itself, on the meta device (no weights are allocated, any size is cheap):
parameter counts, FLOPs of the towers' forward + backward per sample (torch's FlopCounterMode), and the activation
memory a training forward keeps for backward per sample (the tensors autograd saves, seen through
`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters left out).

Attention is counted on PyTorch's math SDPA backend, where its matmuls are visible to the counter (a fused kernel does
the same FLOPs). Per-sample numbers are the difference between a batch of 2 and a batch of 1, so nothing that does
not grow with the batch is counted as per-sample.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass(frozen=True)
class ModelProfile:
    name: str
    params: int  # all parameters
    trainable: int  # parameters with requires_grad
    persistent: int  # parameters in tensors of <= ZERO3_PERSISTENCE elements: ZeRO-3 keeps those whole on every rank
    embed_dim: int  # D of the features the loss sees
    image_size: Tuple[int, int]
    context_length: int
    tower_flops: float  # forward + backward of both towers, per sample
    forward_flops: float  # forward only, per sample
    activation_bytes: float  # saved for backward per sample, in the training precision
    recompute_bytes: float  # with grad checkpointing: the largest block's activations, recomputed in backward
    precision: str
    grad_checkpointing: bool

    def to_dict(self) -> Dict:
        return asdict(self)


def registered(model: str) -> Tuple[str, Dict]:
    """(name open_clip knows the config by, config dict) for a registered name or a JSON config path."""
    import open_clip

    from clipkit.models import _register_config, resolve_model_config

    name, cfg = resolve_model_config(model)
    if open_clip.get_model_config(name) != cfg:
        import tempfile
        from pathlib import Path

        name = _register_config(name, cfg, Path(tempfile.mkdtemp(prefix="clipkit_plan_")))
    return name, cfg


def meta_model(model: str, precision: str = "fp32", grad_checkpointing: bool = False):
    """(open_clip model on the meta device in training mode and the training dtype, its config dict)."""
    import open_clip

    name, cfg = registered(model)
    net = open_clip.create_model(name, device="meta", output_dict=True, nonscalar_logit_scale=True)
    net = net.to(DTYPES[precision]).train()
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    return net, cfg


def _inputs(cfg: Dict, batch: int, dtype: torch.dtype):
    size = cfg["vision_cfg"].get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    context = cfg["text_cfg"].get("context_length", 77)
    images = torch.zeros(batch, 3, h, w, device="meta", dtype=dtype)
    texts = torch.zeros(batch, context, dtype=torch.long, device="meta")
    return images, texts, (h, w), context


def _tower_loss(out) -> torch.Tensor:
    """A stand-in loss that only sums the features: its own FLOPs are O(B*D), so fwd+bwd counts the towers."""
    return (out["image_features"].float().sum() + out["text_features"].float().sum()) * out["logit_scale"].sum()


def _count_flops(net, cfg, batch: int, dtype) -> Tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) of one training step of the towers on `batch` samples."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    images, texts, _, _ = _inputs(cfg, batch, dtype)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = net(images, texts)
        forward = float(counter.get_total_flops())
        _tower_loss(out).backward()
    net.zero_grad(set_to_none=True)
    return forward, float(counter.get_total_flops())


def _saved_bytes(net, cfg, batch: int, dtype, vision_only: bool = False) -> float:
    """Bytes of the distinct storages autograd saves for backward in one training forward (parameters excluded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {p.untyped_storage()._cdata for p in net.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    images, texts, _, _ = _inputs(cfg, batch, dtype)
    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.visual(images) if vision_only else net(images, texts)
    return float(sum(saved.values()))


@functools.lru_cache(maxsize=32)
def profile_model(model: str, precision: str = "bf16", grad_checkpointing: bool = False) -> ModelProfile:
    """Counts params, FLOPs and activation bytes of `model` (a registered open_clip/clipkit name or a JSON path)."""
    net, cfg = meta_model(model, precision)
    dtype = DTYPES[precision]
    _, _, image_size, context = _inputs(cfg, 1, dtype)
    (fw1, fb1), (fw2, fb2) = (_count_flops(net, cfg, b, dtype) for b in (1, 2))
    act = [_saved_bytes(net, cfg, b, dtype) for b in (1, 2)]
    recompute = 0.0
    if grad_checkpointing:
        # Saved with checkpointing: the block inputs; backward then recomputes one block at a time, whose saved
        # activations exist on top: the larger tower's per-block share of the plain count.
        full = act[1] - act[0]
        vision = _saved_bytes(net, cfg, 2, dtype, vision_only=True) - _saved_bytes(net, cfg, 1, dtype, vision_only=True)
        vision_layers, text_layers = (max(int(cfg[k].get("layers") or 1), 1) for k in ("vision_cfg", "text_cfg"))
        recompute = max(vision / vision_layers, max(full - vision, 0.0) / text_layers)
        net.set_grad_checkpointing(True)
        act = [_saved_bytes(net, cfg, b, dtype) for b in (1, 2)]
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    persistent = sum(p.numel() for p in net.parameters() if p.numel() <= ZERO3_PERSISTENCE)
    return ModelProfile(
        name=model, params=params, trainable=trainable, persistent=persistent, embed_dim=int(cfg["embed_dim"]),
        image_size=image_size,
        context_length=context, tower_flops=fb2 - fb1, forward_flops=fw2 - fw1,
        activation_bytes=act[1] - act[0], recompute_bytes=recompute, precision=precision,
        grad_checkpointing=grad_checkpointing)
