"""Run settings for training: one typed dataclass, loadable from YAML (safe_load), overridable on the command line.

Precedence: dataclass default < `--config FILE.yaml` < command-line flags. The resolved config is written as
`config.yaml` in the output dir and inside every checkpoint.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, get_args, get_origin

import yaml


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("clipkit-tiny", "registered open_clip/clipkit model config name, or a path to a JSON model config")
    hf_text_model: str | None = _f(None, "local Hugging Face model dir used as the text tower (e.g. all-MiniLM-L6-v2)")
    lock_text: bool = _f(False, "LiT: freeze the text tower, train the image tower and projections")
    pretrained: str | None = _f(None, "initial CLIP weights (safetensors / weights-only torch file)")
    # data
    train_data: str | None = _f(None, "WebDataset shard spec: brace-expanded paths/URLs, several joined with '::'")
    train_num_samples: int | None = _f(None, "samples per epoch (resampled mode; default: counted from the shards)")
    resampled: bool = _f(False, "sample shards with replacement (no epochs over the data) instead of epoch mode")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker (0 = off)")
    workers: int = _f(2, "data loader worker processes per training process")
    max_skip_rate: float = _f(0.1, "stop the run when more than this fraction of samples is skipped as bad")
    max_image_pixels: int = _f(8192 * 8192, "reject images whose header claims more pixels (decompression bombs)")
    allow_unsafe_urls: bool = _f(False, "allow 'pipe:' and other non-file/http shard URL schemes")
    # optimisation
    batch_size: int = _f(64, "batch size per process (per micro-step)")
    grad_accum: int = _f(1, "micro-steps per optimizer step; negatives span the whole accumulated batch")
    steps: int = _f(100, "optimizer steps to train in total")
    stop_at: int | None = _f(None, "stop after this step with a checkpoint (the schedule still spans --steps); "
                                      "for time-limited jobs, continued with --resume auto")
    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.2, "AdamW weight decay (not applied to gains, biases, logit_scale/logit_bias)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW eps")
    warmup: int = _f(10, "linear warm-up steps, then cosine decay to 0")
    grad_clip: float | None = _f(1.0, "clip the global gradient norm (None = off)")
    loss: str = _f("clip", "clip (symmetric InfoNCE) or siglip", choices=("clip", "siglip"))
    loss_chunk_size: int | None = _f(None, "memory-efficient InfoNCE: logits computed in row chunks of this size")
    precision: str = _f("fp32", "fp32 or bf16 (mixed precision via DeepSpeed/accelerate)", choices=("fp32", "bf16"))
    seed: int = _f(0, "random seed (model init, data order)")
    max_nonfinite_steps: int = _f(5, "stop after this many consecutive steps skipped for a non-finite loss")
    # output
    output_dir: str = _f("runs/clipkit", "run directory: metrics.jsonl, TensorBoard events, checkpoints, final/")
    save_every: int = _f(0, "save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, "keep this many newest complete checkpoints (>= 2: the newest may be mid-write)")
    resume: str | None = _f(None, "'auto' (newest complete checkpoint in output dir, if any) or a checkpoint path")
    log_every: int = _f(1, "write metrics every N steps")
    tensorboard: bool = _f(True, "write TensorBoard events to OUTPUT/tensorboard")
    progress: bool = _f(True, "show a progress bar on rank 0")
    report: bool = _f(True, "write RUN/report.html at the end of the run")
    # eval during training
    zeroshot_data: str | None = _f(None, "dataset spec for zero-shot eval during training (see eval/zeroshot.py)")
    zeroshot_every: int = _f(0, "run zero-shot eval every N steps (0 = only at the end, if zeroshot_data is set)")
    zeroshot_templates: str = _f("simple", "prompt templates for zero-shot eval: openai, simple or a file")
    zeroshot_max_samples: int | None = _f(None, "cap the zero-shot eval set (None = all)")

    def validate(self) -> "TrainConfig":
        if not self.train_data:
            raise ValueError("--train-data is required (WebDataset shards, e.g. 'shards/{00000..00009}.tar')")
        for name in ("batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.keep_last < 2:
            raise ValueError(f"--keep-last must be >= 2 (the newest checkpoint may be mid-write), got {self.keep_last}")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"--loss must be clip or siglip, got {self.loss!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ValueError(f"--max-skip-rate must be in [0, 1], got {self.max_skip_rate}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field):
    t = f.type
    if get_origin(t) is not None:  # Optional[X]
        args = [a for a in get_args(t) if a is not type(None)]
        t = args[0]
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a CLIP model with accelerate + DeepSpeed. Launch with "
                    "`accelerate launch --config_file train/accelerate/cpu_zero2.yaml train/main.py ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"])
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=t, choices=f.metadata.get("choices"), **kw)
    return parser


def parse_config(argv: List[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(load_yaml(config_path))
    values.update(args)
    return TrainConfig(**values).validate()


def load_yaml(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return data


def save_yaml(cfg: TrainConfig, path: Path, extra: Dict[str, Any] | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(json.dumps(data)), f, sort_keys=False)
