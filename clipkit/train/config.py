"""Run settings for training: one typed dataclass, loadable from YAML (safe_load), overridable on the command line.

Precedence: dataclass default < `--config FILE.yaml` < command-line flags. The resolved config is written as
`config.yaml` in the output dir and inside every checkpoint.
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, get_args, get_origin

import yaml

from clipkit.train.errors import ConfigError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("clipkit-tiny", "registered open_clip/clipkit model config name, or a path to a JSON model config")
    hf_text_model: str | None = _f(None, "local Hugging Face model dir used as the text tower (e.g. all-MiniLM-L6-v2)")
    lock_text: bool = _f(False, "freeze the text tower (its projection stays trainable): for a pretrained text tower "
                                "such as --hf-text-model; the reverse of LiT, which locks the image tower")
    hf_text_model_id: str | None = _f(None, "hub id final/ records for --hf-text-model (ORG/NAME, e.g. "
                                            "sentence-transformers/all-MiniLM-L6-v2; default: the id the dir's model "
                                            "card loads, else config.json's _name_or_path): final/ then loads on any "
                                            "machine, see README 'Pretrained text towers'")
    frozen_text_dropout: bool = _f(False, "with --lock-text: the frozen tower trains in train mode, its dropout on "
                                          "(as open_clip_train); the default pins it in eval mode, which measured "
                                          "as accurate or more and faster (BENCHMARKS.md 'Frozen pretrained text "
                                          "tower'). The exported model is in eval mode either way")
    lock_text_freeze_layer_norm: bool = _f(True, "with --lock-text and an --hf-text-model: freeze the tower's "
                                                 "LayerNorm gains and biases too; --no-lock-text-freeze-layer-norm "
                                                 "trains them (open_clip_train's default)")
    lock_image: bool = _f(False, "LiT (Zhai et al. 2022): freeze the image tower (open_clip's lock_image_tower), train "
                                 "the text tower; use with --pretrained weights or a pretrained timm tower")
    lock_image_unlocked_groups: int = _f(0, "with --lock-image: leave this many last layer groups of the image tower "
                                            "trainable")
    lock_image_freeze_bn_stats: bool = _f(False, "with --lock-image: also freeze BatchNorm running statistics")
    pretrained: str | None = _f(None, "initial CLIP weights (safetensors / weights-only torch file)")
    # data
    train_data: str | None = _f(None, "WebDataset shard spec: brace-expanded paths/URLs, several joined with '::'")
    train_num_samples: int | None = _f(None, "samples per epoch (resampled mode; default: counted from the shards)")
    resampled: bool = _f(False, "sample shards with replacement (no epochs over the data) instead of epoch mode")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker (0 = off)")
    epoch_split: str = _f("auto", "how an epoch is split over ranks and loader workers: samples (equal shares of "
                                  "unequal shards; needs every shard's size: sizes.json, _stats.json or local tar "
                                  "headers), shards (whole shards per worker), or auto (samples when the sizes are "
                                  "known without reading remote shards, else shards)",
                          choices=("auto", "samples", "shards"))
    workers: int = _f(2, "data loader worker processes per training process")
    max_skip_rate: float = _f(0.1, "stop the run when more than this fraction of samples is skipped as bad (checked "
                                   "once --skip-rate-min-samples samples were read, over all ranks)")
    skip_rate_min_samples: int = _f(200, "samples to read (all ranks) before --max-skip-rate is applied: a few bad "
                                         "samples at the very start should not stop a run")
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
    # negatives beyond the batch, image views (issue 11; README "Negatives beyond the batch")
    queue_size: int = _f(0, "image and text queues of this many features each, extra negatives in both directions "
                            "(MoCo/ALBEF; 0 = off)")
    momentum: float | None = _f(None, "EMA momentum of the key encoder for the queue and distillation (default 0.995 "
                                      "when either is on; 0 = the online model's detached features, which collapsed a "
                                      "fresh model: README)")
    distill_alpha: float = _f(0.0, "ALBEF's momentum distillation weight alpha (0 = off; ALBEF: 0.4)")
    hard_negative_beta: float = _f(0.0, "HN-NCE's hard-negative weighting beta (0 = plain InfoNCE)")
    caption_negatives: int = _f(0, "structured negatives per caption (word-order and attribute swaps), extra "
                                   "image->text columns (NegCLIP; 0 = off)")
    mask_duplicate_captions: bool = _f(False, "leave identical captions of other samples (same token ids) out of "
                                              "the denominators, batch and queue")
    aug_scale: str | None = _f(None, "RandomResizedCrop scale LO,HI (default: open_clip's 0.9,1.0; SimCLR: 0.08,1)")
    color_jitter: float = _f(0.0, "probability of SimCLR's colour jitter (0.4, 0.4, 0.4, 0.1)")
    grayscale: float = _f(0.0, "probability of a grayscale image")
    blur: float = _f(0.0, "probability of a Gaussian blur")
    image_ssl_weight: float = _f(0.0, "weight of SLIP's image-image SimCLR term on two augmented views (0 = off)")
    ssl_temperature: float = _f(0.1, "temperature of the SimCLR term (SLIP: 0.1)")
    temperature_init: float = _f(0.07, "initial temperature (logit_scale = ln(1 / T); CLIP: 0.07)")
    fixed_temperature: bool = _f(False, "keep the temperature at --temperature-init (not learned)")
    export_momentum: bool = _f(False, "final/ gets the momentum (EMA) model's weights instead of the online model's")
    precision: str = _f("fp32", "fp32 or bf16 (mixed precision via DeepSpeed/accelerate)", choices=("fp32", "bf16"))
    seed: int = _f(0, "random seed (model init, data order)")
    threads: int | None = _f(None, "intra-op CPU threads per process (default: OMP_NUM_THREADS if you set it, else "
                                   "the node's physical cores / processes on the node)")
    packed_attention: bool = _f(True, "run open_clip's transformer blocks' self-attention as one packed q/k/v "
                                      "projection + scaled_dot_product_attention instead of nn.MultiheadAttention: the "
                                      "same function and parameters without its layout copies (clipkit.fast_attention)")
    malloc_tuning: bool = _f(True, "keep freed memory for the next step (glibc mallopt: no mmap'd blocks, 1 GiB trim "
                                   "threshold) instead of re-faulting it each step; off when you preloaded another "
                                   "allocator or set MALLOC_*_ / GLIBC_TUNABLES (clipkit.train.allocator)")
    compile: bool = _f(False, "torch.compile each tower (regional: one compiled transformer block, reused)")
    trim_text_padding: bool = _f(True, "cut each text batch at its longest caption (rounded up to 8 tokens) before the "
                                       "text tower: the same features and gradients for less compute, where the "
                                       "tower qualifies (clipkit.text_padding); tflops/mfu still count the full "
                                       "context")
    grad_checkpointing: bool = _f(False, "recompute activations in backward (open_clip's set_grad_checkpointing): less "
                                         "memory for large per-GPU batches, ~30%% more compute")
    peak_tflops: float | None = _f(None, "peak dense TFLOP/s of one device for the mfu column of metrics.jsonl "
                                         "(default: a table of known GPUs; none on CPU)")
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
    debug: bool = _f(False, "print the traceback of a user error too (or set CLIPKIT_DEBUG=1)")
    # eval during training
    zeroshot_data: str | None = _f(None, "dataset spec for zero-shot eval during training (see eval/zeroshot.py)")
    zeroshot_every: int = _f(0, "run zero-shot eval every N steps (0 = only at the end, if zeroshot_data is set)")
    zeroshot_templates: str = _f("simple", "prompt templates for zero-shot eval: openai, simple or a file")
    zeroshot_max_samples: int | None = _f(None, "cap the zero-shot eval set (None = all)")

    def validate(self) -> "TrainConfig":
        """Checks every value on its own (no files are read: see clipkit.train.preflight); raises ConfigError."""
        if not self.train_data:
            raise ConfigError("--train-data is required (WebDataset shards, e.g. 'shards/{00000..00009}.tar')")
        at_least = {"batch_size": 1, "grad_accum": 1, "steps": 1, "keep_last": 2, "log_every": 1, "warmup": 0,
                    "workers": 0, "save_every": 0, "shuffle_buffer": 0, "zeroshot_every": 0, "max_nonfinite_steps": 1,
                    "skip_rate_min_samples": 0, "max_image_pixels": 1, "lock_image_unlocked_groups": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                extra = " (the newest checkpoint may be mid-write)" if name == "keep_last" else ""
                raise ConfigError(f"{_flag(name)} must be >= {low}{extra}, got {getattr(self, name)}")
        for name in ("train_num_samples", "loss_chunk_size", "threads", "zeroshot_max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{_flag(name)} must be a finite number > 0, got {getattr(self, name)}")
        if not (self.wd >= 0 and math.isfinite(self.wd)):
            raise ConfigError(f"--wd must be >= 0, got {self.wd}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ConfigError(f"--stop-at must be in [1, --steps={self.steps}], got {self.stop_at}")
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"--loss must be clip or siglip, got {self.loss!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ConfigError(f"--max-skip-rate must be in [0, 1], got {self.max_skip_rate}")
        if self.lock_image and self.lock_text:
            raise ConfigError("--lock-image and --lock-text together leave only the projections to train: pick one")
        if self.hf_text_model_id is not None:
            from clipkit.hf_text import check_hub_id

            if not self.hf_text_model:
                raise ConfigError("--hf-text-model-id names the hub id of --hf-text-model: pass --hf-text-model DIR "
                                  "too")
            try:
                check_hub_id(self.hf_text_model_id)
            except ValueError as e:
                raise ConfigError(f"--hf-text-model-id: {e}") from e
        self._validate_recipe()
        if self.zeroshot_every and not self.zeroshot_data:
            raise ConfigError("--zeroshot-every needs --zeroshot-data (a dataset spec, see eval/zeroshot.py)")
        return self

    def _validate_recipe(self) -> None:
        from clipkit.augment import parse_scale

        if self.queue_size < 0 or self.caption_negatives < 0:
            name = "queue_size" if self.queue_size < 0 else "caption_negatives"
            raise ConfigError(f"{_flag(name)} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1) (0 = online features; MoCo/ALBEF: 0.995-0.999), got "
                              f"{self.momentum}")
        for name in ("distill_alpha", "color_jitter", "grayscale", "blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        for name in ("hard_negative_beta", "image_ssl_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("ssl_temperature", "temperature_init"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{_flag(name)} must be a finite number > 0, got {getattr(self, name)}")
        try:
            parse_scale(self.aug_scale)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.distill_alpha and self.momentum == 0:
            raise ConfigError("--distill-alpha needs a momentum model: --momentum > 0 (or leave it at its default)")
        if self.export_momentum and not (self.queue_size or self.distill_alpha) or (
                self.export_momentum and self.momentum == 0):
            raise ConfigError("--export-momentum needs a momentum model (--queue-size or --distill-alpha, with "
                              "--momentum > 0)")
        from clipkit.train.recipe import uses_recipe

        if uses_recipe(self) and self.loss != "clip":
            raise ConfigError("the queue, distillation, hard negatives, caption negatives, duplicate masking and the "
                              "SSL term extend the InfoNCE loss: use them with --loss clip")
        if uses_recipe(self) and self.grad_accum > 1:
            raise ConfigError("--grad-accum > 1 does not combine with the queue, distillation, hard negatives, "
                              "caption negatives, duplicate masking or the SSL term yet: raise --batch-size or add "
                              "processes instead")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    try:
        return TrainConfig(**values).validate()
    except TypeError as e:  # a YAML value of the wrong type that the dataclass cannot hold
        raise ConfigError(f"--config {config_path}: {e}") from e


def load_yaml(path: str) -> Dict[str, Any]:
    """Settings from a YAML mapping (safe_load only); parse errors name the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}")
    types = {f.name: _field_type(f) for f in dataclasses.fields(TrainConfig)}
    return {name: _typed(path, name, value, types[name]) for name, value in data.items()}


def _typed(path: str, name: str, value: Any, want: type) -> Any:
    """A YAML value as the field's type (YAML has no argparse type check); ConfigError naming the setting."""
    if value is None or isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if want is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{path}: {name} must be {want.__name__}, got {value!r}")


def save_yaml(cfg: TrainConfig, path: Path, extra: Dict[str, Any] | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(json.dumps(data)), f, sort_keys=False)
