"""Negatives beyond the batch and image views (issue 11): what a training step adds to plain InfoNCE, and its state.

Options (all off by default; see README "Negatives beyond the batch"):
- a FIFO queue of image and text features (MoCo, He et al. 2020; ALBEF, Li et al. 2021), filled from a momentum
  (EMA) copy of both towers or, with momentum 0, from the online model's detached features (cross-batch memory);
- ALBEF's momentum distillation: (1 - alpha) * InfoNCE + alpha * the loss against the momentum model's soft targets;
- HN-NCE's hard-negative weighting (Radenovic et al. 2023), in ContrastiveLoss itself;
- NegCLIP's structured caption negatives (Yuksekgonul et al. 2023), made in the loader workers, as extra image->text
  columns;
- duplicate-caption masking: an identical caption of another sample (same token ids) is not a negative;
- SLIP's image-image SimCLR term (Mu et al. 2021) on two augmented views, through a small head on the image
  features that trains with the model and is left out of the export.

The step makes ONE model forward: the images, then the two views of each image, and the captions, then their
negatives, are concatenated (open_clip encodes the two modalities separately, so their batch sizes may differ), and
the features are split afterwards. `Recipe` owns the queue, the momentum model and the head's place in the model;
its state goes into each checkpoint as recipe.safetensors (the same on every rank).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from clipkit.losses import FeatureQueue, NTXentLoss, SimCLRHead, caption_ids_from_tokens, itc_distillation_loss
from clipkit.train.config import TrainConfig

log = logging.getLogger("clipkit.train")

STATE_FILE = "recipe.safetensors"
SSL_HEAD = "ssl_head"  # the SLIP head's attribute on the model: trained with it, left out of the export


def state_part(state: Dict[str, torch.Tensor], part: str) -> Dict[str, torch.Tensor]:
    """The tensors of one part ("queue" or "momentum") of a recipe.safetensors state, with the part's prefix cut."""
    prefix = f"{part}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def recipe_flags(cfg: TrainConfig) -> Dict[str, Any]:
    """The recipe settings a resume must match (they shape the queue, the momentum model and the loader's extras)."""
    return {"--queue-size": cfg.queue_size, "--momentum": momentum_of(cfg), "--distill-alpha": cfg.distill_alpha,
            "--hard-negative-beta": cfg.hard_negative_beta, "--caption-negatives": cfg.caption_negatives,
            "--mask-duplicate-captions": cfg.mask_duplicate_captions, "--image-ssl-weight": cfg.image_ssl_weight,
            "--ssl-temperature": cfg.ssl_temperature, "--aug-scale": cfg.aug_scale, "--color-jitter": cfg.color_jitter,
            "--grayscale": cfg.grayscale, "--blur": cfg.blur}


def momentum_of(cfg: TrainConfig) -> float:
    """--momentum, or 0.995 (ALBEF's) when a queue or distillation needs keys and the flag was not given."""
    if cfg.momentum is not None:
        return cfg.momentum
    return 0.995 if cfg.queue_size or cfg.distill_alpha else 0.0


def uses_recipe(cfg: TrainConfig) -> bool:
    return bool(cfg.queue_size or cfg.distill_alpha or cfg.hard_negative_beta or cfg.caption_negatives
                or cfg.mask_duplicate_captions or cfg.image_ssl_weight)


def attach_ssl_head(model: nn.Module, cfg: TrainConfig, embed_dim: int) -> None:
    """Before the optimizer exists: the SLIP head becomes a submodule, so it trains (and is checkpointed) with the
    model. The export leaves it out (see `exportable`)."""
    if cfg.image_ssl_weight:
        setattr(model, SSL_HEAD, SimCLRHead(embed_dim))


def exportable(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The CLIP model's weights only (the SLIP head dropped)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(SSL_HEAD + ".")}


class Recipe:
    def __init__(self, cfg: TrainConfig, net: nn.Module, embed_dim: int, device: torch.device):
        """net: the online model, unwrapped, after accelerate/DeepSpeed prepared it (the momentum copy is made from
        its weights, in float32)."""
        from clipkit.train.momentum import MomentumModel

        self.cfg = cfg
        self.momentum = MomentumModel(net, momentum_of(cfg)) if (cfg.queue_size or cfg.distill_alpha) else None
        if self.momentum is not None and self.momentum.model is not None:
            self.momentum.model.to(device)
        self.queue = None
        if cfg.queue_size:
            if self.momentum.momentum == 0:
                log.warning("--queue-size %d with --momentum 0: the queue holds the online model's own features from "
                            "the first step; a fresh model collapsed this way on Fashion-MNIST (as MoCo reports for "
                            "m = 0; BENCHMARKS.md 'Fashion-MNIST arms'): prefer --momentum 0.995", cfg.queue_size)
            self.queue = FeatureQueue(cfg.queue_size, embed_dim, device=device,
                                      track_caption_ids=cfg.mask_duplicate_captions)
        self.ssl = NTXentLoss(cfg.ssl_temperature) if cfg.image_ssl_weight else None
        self._pending: Tuple[Any, Any] = (None, None)  # this step's keys and caption ids, for after_step

    # ------------------------------------------------------------------ the step's inputs and loss
    def inputs(self, images: torch.Tensor, texts: torch.Tensor, batch: Dict[str, Any], normalize) -> Tuple:
        """(images [B(1+2v), 3, H, W], texts [B(1+N), L]) for the step's one forward: the batch, then its SSL views
        (v = 1 with --image-ssl-weight), and the captions, then their negatives."""
        dev = images.device
        if self.ssl is not None:
            views = batch["views"].to(dev, non_blocking=True)  # uint8 [B, 2, 3, H, W]
            views = normalize(views.flatten(0, 1)) if normalize is not None else views.flatten(0, 1).float()
            views = views.to(images.dtype).view(views.shape[0] // 2, 2, *views.shape[1:])
            images = torch.cat([images, views[:, 0], views[:, 1]])
        if self.cfg.caption_negatives:
            texts = torch.cat([texts, batch["neg_text"].to(dev, non_blocking=True).flatten(0, 1)])
        return images, texts

    def loss(self, net: nn.Module, loss_fn, images, texts, img_all, txt_all, scale) -> Tuple[torch.Tensor, Dict]:
        """The step's loss and its terms (0-dim tensors, for metrics.jsonl).

        images, texts: the batch's own inputs ([B, ...]); img_all, txt_all: the forward's features of `inputs()`.
        """
        cfg, batch = self.cfg, texts.shape[0]
        img, txt = img_all[:batch], txt_all[:batch]
        negatives = None
        if cfg.caption_negatives:
            negatives = txt_all[batch:].view(batch, cfg.caption_negatives, -1)
        ids = caption_ids_from_tokens(texts).to(img.device) if cfg.mask_duplicate_captions else None
        q_img = q_txt = q_ids = None
        if self.queue is not None:
            q_img, q_txt, q_ids = self.queue.columns()
        itc = loss_fn(img, txt, scale, image_queue=q_img, text_queue=q_txt, text_negatives=negatives,
                      caption_ids=ids, queue_caption_ids=q_ids if ids is not None else None)
        terms: Dict[str, torch.Tensor] = {"loss_itc": itc.detach()}
        total = itc
        keys = None
        if self.momentum is not None:
            model = self.momentum.model
            key_images = images if model is None else images.to(next(model.parameters()).dtype)
            keys = self.momentum.keys(key_images, texts, img, txt)
        if cfg.distill_alpha:
            distill = itc_distillation_loss(img, txt, keys[0], keys[1], scale, 1.0, image_queue=q_img,
                                            text_queue=q_txt, caption_ids=ids,
                                            queue_caption_ids=q_ids if ids is not None else None)
            total = (1 - cfg.distill_alpha) * total + cfg.distill_alpha * distill
            terms["loss_distill"] = distill.detach()
        if self.ssl is not None:
            head = getattr(net, SSL_HEAD)
            view_a, view_b = img_all[batch:2 * batch], img_all[2 * batch:3 * batch]
            ssl = self.ssl(head(view_a), head(view_b))
            total = total + cfg.image_ssl_weight * ssl
            terms["loss_ssl"] = ssl.detach()
        with torch.no_grad():
            sims = img.detach().float() @ txt.detach().float().T
            terms["pos_sim"] = sims.diagonal().mean()
            off = sims.sum() - sims.diagonal().sum()
            terms["neg_sim"] = off / max(1, sims.numel() - batch)
        self._pending = (keys, ids)
        return total, terms

    def after_step(self, net: nn.Module) -> None:
        """After the optimizer step: the EMA update, then this step's keys into the queue (a collective)."""
        keys, ids = self._pending
        if self.momentum is not None:
            self.momentum.update(net)
        if self.queue is not None:
            self.queue.enqueue(keys[0], keys[1], ids)
        self._pending = (None, None)

    def metrics(self) -> Dict[str, float]:
        return {"queue_fill": self.queue.fill_fraction} if self.queue is not None else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = {}
        if self.queue is not None:
            state.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        if self.momentum is not None:
            state.update({f"momentum.{k}": v for k, v in self.momentum.state_dict().items()})
        return state

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if state:
            save_file(state, str(Path(directory) / STATE_FILE))

    def load(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        if not self.state_dict():
            return
        if not path.is_file():
            from clipkit.train.checkpoint import CheckpointError

            raise CheckpointError(f"cannot resume from {directory}: no {STATE_FILE} (queue / momentum state)")
        from safetensors.torch import load_file

        state = load_file(str(path))
        dev = next(iter(self.state_dict().values())).device
        if self.queue is not None:
            self.queue.load_state_dict({k: v.to(dev) for k, v in state_part(state, "queue").items()})
        if self.momentum is not None:
            self.momentum.load_state_dict({k: v.to(dev) for k, v in state_part(state, "momentum").items()})

    def momentum_export(self) -> Dict[str, torch.Tensor]:
        """The EMA weights for `--export-momentum` (the SLIP head left out)."""
        if self.momentum is None or self.momentum.model is None:
            raise ValueError("--export-momentum needs a momentum model (--queue-size or --distill-alpha with "
                             "--momentum > 0)")
        return exportable(self.momentum.model.state_dict())


def logit_scale_init(cfg: TrainConfig) -> float:
    """ln(1 / --temperature-init): the initial logit_scale (CLIP: ln(1 / 0.07))."""
    return math.log(1.0 / cfg.temperature_init)
