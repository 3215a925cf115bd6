"""Checks of a run's files and paths before any process group, model or loader is built.

Every rank runs the same checks on the same inputs, so a bad input stops every rank at start-up with the same
`UserError` (see clipkit.train.errors) and none is left waiting in a collective. What is checked: the model config
(registered name, or a JSON file that parses), `--hf-text-model`, `--pretrained` (exists and its index reads),
`--output-dir`, the shard spec, the zero-shot dataset spec and templates, resampled mode's epoch size against one
global batch, and `--resume` (the checkpoint exists, is complete, and was written by a run with the same
fingerprint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from clipkit.train import checkpoint as ckpt
from clipkit.train.config import TrainConfig
from clipkit.train.errors import ConfigError, DataError


@dataclass
class Preflight:
    """What the checks found, handed to the Trainer so nothing is resolved twice."""

    world_size: int
    model_cfg: Dict[str, Any]
    shards: List[str]
    sizes: List[int | None] | None  # samples per shard (epoch mode; None for a remote shard without sizes.json)
    fingerprint: Dict[str, Any]
    resume_from: Path | None
    resume_state: Dict[str, Any] | None


def launched_world_size() -> int:
    """The world size the launcher (accelerate / torchrun) set up, before any process group exists; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def preflight(cfg: TrainConfig, world_size: int | None = None) -> Preflight:
    from clipkit.data import count_samples, expand_urls, shard_sizes
    from clipkit.models import resolve_model_config

    world = world_size or launched_world_size()
    try:
        _, model_cfg = resolve_model_config(cfg.model, cfg.hf_text_model)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip('"')) from e
    if cfg.pretrained:
        _check_pretrained(cfg.pretrained)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: {parent} is not writable")
    try:
        shards = expand_urls(cfg.train_data, allow_unsafe_urls=cfg.allow_unsafe_urls)
    except ValueError as e:
        raise ConfigError(f"--train-data: {e}") from e
    if cfg.zeroshot_data:
        _check_dataset_spec(cfg.zeroshot_data)
        _check_templates(cfg.zeroshot_templates)
    _check_zero3(cfg)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if cfg.resampled:
        if cfg.train_num_samples is not None and cfg.train_num_samples < global_batch:
            raise ConfigError(f"--train-num-samples {cfg.train_num_samples:,} is fewer than one global batch of "
                              f"{global_batch:,} ({_batch_text(cfg, world)}): raise it or lower --batch-size")
        if cfg.train_num_samples is None:
            n = count_samples(shards, allow_unsafe_urls=cfg.allow_unsafe_urls)
            if n < global_batch:
                raise DataError(f"the shards hold {n:,} samples, fewer than one global batch of {global_batch:,} "
                                f"({_batch_text(cfg, world)}): set --train-num-samples, lower --batch-size or add "
                                "data")
    sizes = None if cfg.resampled or cfg.epoch_split == "shards" else shard_sizes(
        shards, cfg.allow_unsafe_urls, read_remote=cfg.epoch_split == "samples")
    fp = ckpt.fingerprint(model_cfg, cfg, world, shards, sizes)
    resume_from = ckpt.resolve_resume(cfg.resume, out)
    state = ckpt.read_state(resume_from, fp) if resume_from is not None else None
    return Preflight(world, model_cfg, shards, sizes, fp, resume_from, state)


def _check_pretrained(path: str) -> None:
    """The weights file exists and its index reads: a safetensors header, or a torch zip archive opened with
    weights_only=True and mmap (nothing is read beyond the index; a pickle that needs more than tensors is refused here,
    as it would be by the real load)."""
    if not Path(path).is_file():
        raise ConfigError(f"--pretrained {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("it holds no tensors")
        else:
            import torch

            try:
                torch.load(path, map_location="meta", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                torch.load(path, map_location="meta", weights_only=True)  # the legacy (pre-zip) format: read it
    except Exception as e:  # safetensors, zipfile and unpickling errors all mean "not a weights file we can load"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--pretrained {path}: not a readable weights file ({reason[:200]}): pass an open_clip "
                          "checkpoint (.safetensors, or a .pt/.bin state dict)") from e


def _check_templates(spec: str) -> None:
    from clipkit.eval.templates import load_templates

    if spec in ("dataset", "auto"):  # the data set's own: known once it is read
        return
    try:
        load_templates(spec)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--zeroshot-templates: {e}") from e


def _check_zero3(cfg: TrainConfig) -> None:
    """ZeRO-3 partitions the online weights, so there is nothing whole to copy into, or average into, an EMA model."""
    from clipkit.train.recipe import momentum_of

    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if stage.strip() == "3" and (cfg.queue_size or cfg.distill_alpha) and momentum_of(cfg) > 0:
        raise ConfigError("a momentum model (--queue-size / --distill-alpha with --momentum > 0) is not supported "
                          "under ZeRO-3, which partitions the weights it averages: use ZeRO 0-2 (--momentum 0 runs "
                          "under ZeRO-3, but its queue of the online model's own features collapsed a fresh model "
                          "in BENCHMARKS.md's runs)")


def _batch_text(cfg: TrainConfig, world: int) -> str:
    return f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} process(es)"


def _check_dataset_spec(spec: str) -> None:
    from clipkit.eval.datasets import parse_spec

    try:
        _, path, _ = parse_spec(spec)
    except ValueError as e:
        raise ConfigError(f"--zeroshot-data: {e}") from e
    if not Path(path).exists():
        raise ConfigError(f"--zeroshot-data {spec}: {path} does not exist")
