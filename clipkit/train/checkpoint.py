"""Training checkpoints: complete-or-ignored, keep-last-N, exact resume, refuse what does not match.

Layout: OUTPUT/checkpoints/step_NNNNNNNN/
    pytorch_model/ ...        DeepSpeed (or accelerate) model + optimizer states, per rank
    scheduler.bin, random_states_R.pkl   accelerate's scheduler and per-rank RNG states
    trainer_state.json        step, data position, counters, and the fingerprint a resume must match
    config.yaml               the resolved run config
    COMPLETE                  written last, by rank 0, after every rank finished writing

A directory without COMPLETE is a checkpoint that was being written when the run died (torchtitan's rule: a
checkpoint counts only once its metadata is written); it is never resumed from.

DeepSpeed loads its optimizer shards with `torch.load(weights_only=False)`. Before handing a checkpoint to it, every
pickle-based file is first opened with `weights_only=True` and an explicit allowlist of the classes DeepSpeed and
accelerate store, so a file carrying a malicious `__reduce__` payload is refused before anything unpickles it unsafely.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from clipkit import distributed as dist
from clipkit.train.errors import EXIT_CHECKPOINT, UserError

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, unsafe, or from a run that differs)."""

    exit_code = EXIT_CHECKPOINT


def checkpoints_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file() and (Path(path) / STATE_FILE).is_file()


def list_checkpoints(output_dir) -> List[Path]:
    """All step_* dirs, oldest first (complete or not)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_complete(output_dir) -> Path | None:
    done = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    return done[-1] if done else None


def _safe_globals() -> list:
    """Classes accelerate (RNG states: numpy arrays) and DeepSpeed (ZeRO optimizer shards) put in their pickles."""
    import numpy as np

    allowed = [np.ndarray, np.dtype] + [type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64", "bool")]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


def verify_pickles(path: Path) -> None:
    """Refuses a checkpoint if any pickle-based file in it holds anything but tensors and allowlisted classes."""
    allowed = _safe_globals()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.suffix in _PICKLE_SUFFIXES:
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"refusing checkpoint {path}: {f.name} does not load with weights_only=True "
                    f"(it holds objects outside the allowlist, possibly a code-execution payload): {e}") from e


def recipe_flags(cfg) -> Dict[str, Any]:
    from clipkit.train.recipe import recipe_flags as flags

    return flags(cfg)


def fingerprint(model_cfg: Dict[str, Any], cfg, world_size: int, shards: List[str],
                sizes: List[int | None] | None = None) -> Dict[str, Any]:
    """What a checkpoint must share with the run that resumes it for the resume to be exact.

    `data` holds every setting the data position depends on, keyed by its flag: the shard list (count and a hash of
    the file names in order, so a moved dataset directory still resumes, and their sample count, which the epoch's
    split over workers depends on), the seed, the shuffle buffer, resampled
    mode and its epoch size, and the image-pixel cap (it decides which samples are skipped)."""
    from clipkit.hf_text import portable_model_cfg

    names = "\n".join(os.path.basename(s.rstrip("/")) for s in shards)
    known = sizes is not None and all(n is not None for n in sizes)
    samples = f"{sum(sizes):,} samples" if known else "unknown sample count"
    # An HF text tower counts by its hub id, not by where it is installed: a run dir moved to another machine resumes.
    model_cfg = portable_model_cfg(model_cfg, getattr(cfg, "hf_text_model_id", None))
    # dropout on or off in a frozen text tower changes the losses, trainable LayerNorms the optimizer state (only
    # runs with --lock-text carry these keys)
    text = {"frozen_text_dropout": cfg.frozen_text_dropout,
            "lock_text_freeze_layer_norm": getattr(cfg, "lock_text_freeze_layer_norm", True),
            } if getattr(cfg, "lock_text", False) else {}
    return {
        **text,
        "model_cfg": model_cfg,
        "loss": cfg.loss,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": world_size,
        "workers": cfg.workers,
        "resampled": cfg.resampled,
        "data": {
            "--train-data": f"{len(shards)} shards ({samples}), names sha256 "
                            f"{hashlib.sha256(names.encode()).hexdigest()[:16]}",
            "--seed": cfg.seed,
            "--shuffle-buffer": cfg.shuffle_buffer,
            "--epoch-split": getattr(cfg, "epoch_split", "auto"),
            "--train-num-samples": cfg.train_num_samples if cfg.resampled else None,
            "--max-image-pixels": cfg.max_image_pixels,
        },
        "recipe": recipe_flags(cfg),
    }


def _differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) == current.get(key):
            continue
        if key == "model_cfg":
            diffs.append("model config differs (checkpoint: "
                         f"{json.dumps(saved.get(key), sort_keys=True)[:300]}, this run: "
                         f"{json.dumps(current.get(key), sort_keys=True)[:300]})")
        elif key in ("data", "recipe") and isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
            a, b = saved[key], current[key]
            diffs += [f"{flag}: checkpoint has {a.get(flag)!r}, this run has {b.get(flag)!r}"
                      for flag in sorted(set(a) | set(b)) if a.get(flag) != b.get(flag)]
        else:
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return diffs


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """Maps --resume to a checkpoint dir. 'auto' with no checkpoint yet is a fresh start (logged); an explicit path that
    is missing or incomplete is an error."""
    if not resume:
        return None
    if resume == "auto":
        path = latest_complete(output_dir)
        incomplete = [p.name for p in list_checkpoints(output_dir) if not is_complete(p)]
        if incomplete:
            log.warning("ignoring incomplete checkpoint(s) (no %s marker; written when a run died): %s",
                        COMPLETE, ", ".join(incomplete))
        if path is None:
            log.warning("--resume auto: no complete checkpoint in %s, starting from scratch",
                        checkpoints_root(output_dir))
        return path
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker: it was being written when the run "
            f"stopped). Use an older one, or --resume auto to pick the newest complete checkpoint.")
    return path


def read_state(path: Path, expected_fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    try:
        with open(Path(path) / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: {STATE_FILE} is unreadable ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume from {path}: {STATE_FILE} is not a JSON object")
    diffs = _differences(state.get("fingerprint", {}), expected_fingerprint)
    if diffs:
        raise CheckpointError(f"cannot resume exactly from {path}: " + "; ".join(diffs))
    return state


def save(accelerator, output_dir, step: int, state: Dict[str, Any], config_yaml: str, keep_last: int,
         before_complete: Callable[[int], None] | None = None,
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Writes a checkpoint on all ranks; marks it complete last; prunes to the newest `keep_last` complete ones.
    `before_complete(step)` runs on rank 0 right before the marker is written (tests' fault injection);
    `write_extra(dir)` on rank 0 writes state that is the same on every rank (the recipe's queue and momentum)."""
    path = checkpoint_path(output_dir, step)
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a leftover from a run that died while writing this very step
    dist.barrier()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        _write_atomic(path / STATE_FILE, json.dumps(state, indent=2))
        _write_atomic(path / "config.yaml", config_yaml)
        if write_extra is not None:
            write_extra(path)
    dist.barrier()
    if accelerator.is_main_process:
        if before_complete is not None:
            before_complete(step)
        _write_atomic(path / COMPLETE, f"step {step}\n")
        prune(output_dir, keep_last)
    dist.barrier()
    return path


def prune(output_dir, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    # incomplete dirs older than the newest complete one can never be resumed from
    if complete:
        for p in list_checkpoints(output_dir):
            if not is_complete(p) and p.name < complete[-1].name:
                shutil.rmtree(p, ignore_errors=True)


def load(accelerator, path: Path) -> None:
    verify_pickles(path)
    accelerator.load_state(str(path))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
