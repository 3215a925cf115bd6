"""Training compute of a model, the x axis of scaling laws (Cherti et al. 2023, "Reproducible scaling laws for
contrastive language-image learning": compute = GMACs per sample x samples seen).

GMACs per sample are counted by torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`) on one training-
mode forward of an image and its caption (a full context of text tokens), with attention on PyTorch's math backend:
a fused attention kernel (or nn.MultiheadAttention's inference fast path) would hide its matmuls from the counter.
Training costs 3 forwards (forward + backward at twice the forward), so a training sample costs 3x a forward one.
"""

from typing import Dict

TRAINING_FACTOR = 3  # forward + backward (2x forward) per sample


def forward_gmacs(model: str, batch: int = 2) -> float:
    """Multiply-accumulates (1e9) of one forward of one (image, caption) pair of model config `model` (a registered
    name or a JSON path), averaged over a batch of `batch` zero inputs. The contrastive loss is not counted (it
    depends on the batch size and is small next to the towers)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipkit.models import create_model

    net, cfg, _, _, _ = create_model(model)
    net.train()  # the counted forward is the one training runs (no inference fast paths)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    images = torch.zeros(batch, 3, *size)
    texts = torch.zeros(batch, cfg["text_cfg"].get("context_length", 77), dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(images, texts)
    return counter.get_total_flops() / 2 / batch / 1e9  # a MAC is 2 FLOPs


def training_gmacs_per_sample(model: str) -> float:
    """GMACs one training sample costs: TRAINING_FACTOR x `forward_gmacs`."""
    return TRAINING_FACTOR * forward_gmacs(model)


def compute_table(models) -> Dict[str, float]:
    """{model: training GMACs per sample} for each model config, each counted once."""
    return {m: training_gmacs_per_sample(m) for m in dict.fromkeys(models)}
