"""The training loop: accelerate + DeepSpeed (ZeRO 0-3), exact mid-epoch resume, one readable step function.

Launch: `accelerate launch --config_file train/accelerate/cpu_zero2.yaml train/main.py --train-data ... --steps ...`,
or plain `python train/main.py ...` for one process without DeepSpeed.
"""

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from clipkit import distributed as dist
from clipkit.data import GOOD_REASONS, REASONS, DataPosition, build_train_loader, count_samples
from clipkit.losses import build_loss
from clipkit.models import create_model, export_open_clip, preprocess_cfg_of
from clipkit.train import checkpoint as ckpt
from clipkit.train.config import TrainConfig, save_yaml
from clipkit.train.faults import Faults
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler
from clipkit.transforms import split_uint8

log = logging.getLogger("clipkit.train")
LOGIT_SCALE_MAX = math.log(100.0)


class TrainingStopped(RuntimeError):
    """Raised when the run must stop: too many bad samples or too many non-finite steps in a row."""


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Our flags win over the launcher's config file: accelerate reads these when it builds the DeepSpeed plugin.
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ or "ACCELERATE_USE_DEEPSPEED" in os.environ:
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(cfg.grad_accum)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(cfg.grad_clip or 0.0)
    handlers = []
    if not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # launched by accelerate/torchrun
        # Without this, accelerate + DeepSpeed on CPU pick a backend under which every process thinks it is alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step ourselves
    )
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["gradient_clipping"] = cfg.grad_clip or 0.0
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def clamp_logit_scale(model, accelerator) -> float:
    """Clamps logit_scale to [0, ln 100] (CLIP paper) and returns it.

    Under DeepSpeed two copies exist: the optimizer's fp32 master (what the next step starts from) and the module
    parameter (what forward and the export read; partitioned under ZeRO-3). Both are clamped."""
    p = accelerator.unwrap_model(model).logit_scale
    if not is_deepspeed(accelerator):
        with torch.no_grad():
            p.clamp_(0, LOGIT_SCALE_MAX)
        return float(p.detach().reshape(-1)[0])
    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    value = safe_get_full_fp32_param(p)  # collective under ZeRO: every rank calls it, every rank gets the same value
    clamped = value.clamp(0, LOGIT_SCALE_MAX)
    if not torch.equal(clamped, value):
        if zero_stage(accelerator) == 3:
            # DeepSpeed 0.19's set_full_hp_param mis-slices a 1-element parameter split over several ranks; each rank
            # clamps its own partition instead (the other ranks' partitions hold only padding).
            safe_set_local_fp32_param(p, safe_get_local_fp32_param(p).clamp(0, LOGIT_SCALE_MAX))
        else:
            safe_set_full_fp32_param(p, clamped)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero_stage(accelerator) == 3):
            with torch.no_grad():
                p.data.copy_(clamped.to(p.dtype).reshape(p.shape))
    return float(clamped.reshape(-1)[0])


def model_outputs(model, images, texts):
    out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.faults = Faults.from_env()
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)

        from accelerate.utils import set_seed
        set_seed(cfg.seed)
        model, self.model_cfg, self.preprocess_train, self.preprocess_val, self.tokenizer = create_model(
            cfg.model, hf_text_model=cfg.hf_text_model, lock_text=cfg.lock_text, siglip=cfg.loss == "siglip",
            pretrained=cfg.pretrained, config_dir=self.out / "model_config")
        self.preprocess_cfg = preprocess_cfg_of(model)
        # workers send uint8 images; the last two steps of the transform run on the batch, on the device
        self.loader_transform, self.normalize = split_uint8(self.preprocess_train)
        optimizer = build_optimizer(model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
        scheduler = build_scheduler(optimizer, cfg.warmup, cfg.steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.loss_fn = build_loss(cfg.loss, cfg.loss_chunk_size)
        # DeepSpeed bf16 keeps the module's weights in bf16 and does not autocast: images must arrive in bf16 too
        # (float32 images meet bf16 conv weights otherwise). Without DeepSpeed, accelerate autocasts fp32 weights.
        self.image_dtype = torch.bfloat16 if is_deepspeed(self.accelerator) and cfg.precision == "bf16" else None

        self.fingerprint = ckpt.fingerprint(self.model_cfg, cfg, self.world)
        self.step = 0
        self.position = DataPosition(epoch=0)
        self.epoch_steps = 0           # optimizer steps taken in the current epoch
        self.skip_totals: Dict[str, int] = {}   # bad-sample counts of finished epochs
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        resume_from = ckpt.resolve_resume(cfg.resume, self.out)
        if resume_from is not None:
            self._restore(resume_from)
        self.steps_per_epoch = self._steps_per_epoch()
        self.metrics = MetricsLogger(self.out, cfg.tensorboard, self.step) if self.accelerator.is_main_process else None
        if self.accelerator.is_main_process:
            save_yaml(cfg, self.out / "config.yaml",
                      {"world_size": self.world, "zero_stage": zero_stage(self.accelerator)})

    # ---------------------------------------------------------------- state
    def _restore(self, path: Path) -> None:
        state = ckpt.read_state(path, self.fingerprint)
        ckpt.load(self.accelerator, path)
        self.step = state["step"]
        self.position = DataPosition.from_dict(state["position"])
        self.epoch_steps = state["epoch_steps"]
        self.skip_totals = state["skip_totals"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        log.info("resumed from %s at step %d (epoch %d, %d steps into it)", path, self.step, self.position.epoch,
                 self.epoch_steps)

    def _state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position.to_dict(),
            "epoch_steps": self.epoch_steps,
            "skip_totals": self.skip_totals,
            "nonfinite_total": self.nonfinite_total,
            "fingerprint": self.fingerprint,
        }

    def _steps_per_epoch(self) -> int | None:
        """Resampled mode has no natural epoch: --train-num-samples (or the shards' count) defines one."""
        if not self.cfg.resampled:
            return None
        n = self.cfg.train_num_samples or count_samples(self.cfg.train_data)
        return max(1, n // (self.cfg.batch_size * self.cfg.grad_accum * self.world))

    def save_checkpoint(self) -> Path:
        import yaml
        return ckpt.save(self.accelerator, self.out, self.step, self._state(),
                         yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.cfg.keep_last,
                         before_complete=self.faults.before_complete)

    # ---------------------------------------------------------------- data
    def _loader(self):
        cfg = self.cfg
        return build_train_loader(
            urls=cfg.train_data, preprocess=self.loader_transform, tokenizer=self.tokenizer,
            batch_size=cfg.batch_size, num_workers=cfg.workers, seed=cfg.seed, rank=self.rank, world_size=self.world,
            resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, position=self.position,
            max_pixels=cfg.max_image_pixels, allow_unsafe_urls=cfg.allow_unsafe_urls,
            batches_per_epoch=self.steps_per_epoch * cfg.grad_accum if self.steps_per_epoch else None)

    def _next_batches(self, it) -> List[dict] | None:
        """grad_accum batches, or None on every rank as soon as any rank's epoch ran out."""
        batches = []
        for _ in range(self.cfg.grad_accum):
            b = next(it, None)
            if b is None:
                break
            batches.append(b)
        epoch_over = len(batches) < self.cfg.grad_accum
        return None if dist.any_rank(epoch_over) else batches

    def _skip_counts(self) -> Dict[str, int]:
        """Raw samples by reason (see clipkit.data.REASONS), finished epochs and the current one."""
        totals = dict(self.skip_totals)
        for k, v in self.position.totals().items():
            totals[k] = totals.get(k, 0) + v
        return totals

    def _global_counts(self) -> Dict[str, int]:
        """`_skip_counts` summed over ranks (a collective: every rank calls it)."""
        local = self._skip_counts()
        summed = dist.all_reduce_sum(torch.tensor([local.get(r, 0) for r in REASONS], dtype=torch.float64))
        return {r: int(n) for r, n in zip(REASONS, summed.tolist())}

    def _check_skip_rate(self, counts: Dict[str, int]) -> int:
        good = sum(counts.get(k, 0) for k in GOOD_REASONS)
        t = dist.all_reduce_sum(torch.tensor([sum(counts.values()), good], dtype=torch.float64))
        seen, good = int(t[0]), int(t[1])
        skipped = seen - good
        if seen >= 200 and skipped / seen > self.cfg.max_skip_rate:
            bad = {k: v for k, v in counts.items() if k not in GOOD_REASONS}
            raise TrainingStopped(
                f"{skipped} of {seen} samples ({skipped / seen:.1%}) were skipped as bad, over --max-skip-rate "
                f"{self.cfg.max_skip_rate:.1%}: check the shards (counts by reason: {bad} on rank {self.rank})")
        return skipped

    # ---------------------------------------------------------------- step
    def _loss(self, img, txt, scale, bias):
        if self.cfg.loss == "siglip":
            return self.loss_fn(img, txt, scale, bias)
        return self.loss_fn(img, txt, scale)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.accelerator.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images)
        return images.to(self.image_dtype) if self.image_dtype is not None else images

    def train_step(self, batches: List[dict]) -> Dict[str, Any]:
        """batch -> forward -> loss -> finite check -> backward -> clip -> step -> schedule.

        With grad_accum > 1 the loss spans the whole accumulated batch (all its negatives): features of every
        micro-batch are computed without grad first, then each micro-batch is recomputed with grad against the cached
        rest (open_clip's accum_freq). logit_scale takes its gradient from the first micro-step only, so it gets the
        gradient of the full-batch loss exactly once.
        """
        acc, model, ga = self.accelerator, self.model, self.cfg.grad_accum
        dev = acc.device
        micro = [(self._images(b["image"]), b["text"].to(dev, non_blocking=True)) for b in batches]
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step is taken with
        poison = self.faults.poison(self.step + 1, self.rank)
        if ga == 1:
            img, txt, scale, bias = model_outputs(model, *micro[0])
            loss = self._loss(img, txt, scale, bias)
            loss_value = loss.detach().float()
        else:
            with torch.no_grad():
                cached = [model_outputs(model, *m) for m in micro]
                imgs = [c[0] for c in cached]
                txts = [c[1] for c in cached]
                loss_value = self._loss(torch.cat(imgs), torch.cat(txts), cached[-1][2], cached[-1][3]).float()
        if poison:
            loss_value = loss_value * float("nan")
        if dist.any_rank(not torch.isfinite(loss_value).all().item()):
            return {"loss": float("nan"), "nonfinite": True, "lr": lr}

        if ga == 1:
            with acc.accumulate(model):
                acc.backward(loss)
                self.faults.maybe_kill(self.step + 1, self.rank)
                grad_norm = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        else:
            for j, m in enumerate(micro):
                with acc.accumulate(model):
                    img, txt, scale, bias = model_outputs(model, *m)
                    img = torch.cat(imgs[:j] + [img] + imgs[j + 1:])
                    txt = torch.cat(txts[:j] + [txt] + txts[j + 1:])
                    if j > 0:
                        scale = scale.detach()
                        bias = bias.detach() if bias is not None else None
                    # accelerate/DeepSpeed divide by grad_accum; each micro-loss already is the full-batch loss.
                    acc.backward(self._loss(img, txt, scale, bias) * ga)
                    if j == ga - 1:
                        self.faults.maybe_kill(self.step + 1, self.rank)
                        grad_norm = self._clip()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        logit_scale = clamp_logit_scale(model, acc)
        return {"loss": dist.all_reduce_mean(loss_value).item(), "nonfinite": False, "logit_scale": logit_scale,
                "grad_norm": grad_norm, "lr": lr}

    def _clip(self) -> float | None:
        """DeepSpeed clips inside its step (gradient_clipping in its config); report the norm it computed."""
        if is_deepspeed(self.accelerator):
            return None
        if self.cfg.grad_clip and self.accelerator.sync_gradients:
            return float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        return None

    # ---------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        global_batch = cfg.batch_size * cfg.grad_accum * self.world
        last = min(cfg.steps, cfg.stop_at or cfg.steps)
        while self.step < last:
            loader = self._loader()
            it = iter(loader)
            t_data = time.perf_counter()
            while self.step < last:
                batches = self._next_batches(it)
                if batches is None:
                    self.position = loader.position  # counts of everything read, end records included
                    break
                t_step = time.perf_counter()
                data_time = t_step - t_data
                out = self.train_step(batches)
                self.step += 1
                self.epoch_steps += 1
                self.position = loader.position  # just after the last batch trained on
                self.faults.record_batches(self.step, self.rank, batches, out["nonfinite"])
                if out["nonfinite"]:
                    self.nonfinite_streak += 1
                    self.nonfinite_total += 1
                    log.warning("step %d: non-finite loss on some rank, step skipped on all ranks (%d in a row)",
                                self.step, self.nonfinite_streak)
                    if self.nonfinite_streak >= cfg.max_nonfinite_steps:
                        raise TrainingStopped(f"{self.nonfinite_streak} consecutive steps had a non-finite loss "
                                              f"(--max-nonfinite-steps {cfg.max_nonfinite_steps}): stopping at step "
                                              f"{self.step}; lower --lr or check the data")
                else:
                    self.nonfinite_streak = 0
                skipped = self._check_skip_rate(self._skip_counts())
                step_time = time.perf_counter() - t_data
                record = {
                    "step": self.step, "epoch": self.position.epoch, "loss": out["loss"],
                    "lr": out["lr"], "logit_scale": out.get("logit_scale"),
                    "samples_per_s": global_batch / max(step_time, 1e-9), "data_time": data_time,
                    "step_time": step_time, "skipped": skipped, "nonfinite_steps": self.nonfinite_total,
                }
                if out.get("grad_norm") is not None:
                    record["grad_norm"] = out["grad_norm"]
                if torch.cuda.is_available():
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1024**3  # this process, since start
                if (cfg.zeroshot_data and cfg.zeroshot_every and self.step % cfg.zeroshot_every == 0
                        and self.step < cfg.steps):  # the final eval runs in finish()
                    record.update(self.zeroshot())
                if self.metrics is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self.metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                t_data = time.perf_counter()
            if self.step < last:
                self._next_epoch()
        if bar is not None:
            bar.close()
        return self.finish()

    def _next_epoch(self) -> None:
        self.skip_totals = self._skip_counts()
        self.position = DataPosition(epoch=self.position.epoch + 1)
        self.epoch_steps = 0
        log.info("starting epoch %d at step %d", self.position.epoch, self.step)

    def zeroshot(self) -> Dict[str, float]:
        """Zero-shot eval on rank 0 (weights gathered first under ZeRO-3); all ranks wait for it."""
        from clipkit.eval.zeroshot import evaluate_zeroshot

        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        result: Dict[str, float] = {}

        def run():
            net.eval()
            with torch.no_grad():
                metrics = evaluate_zeroshot(net, self.tokenizer, self.preprocess_val, self.cfg.zeroshot_data,
                                            templates=self.cfg.zeroshot_templates, device=str(acc.device),
                                            max_samples=self.cfg.zeroshot_max_samples)
            net.train()
            return {f"zeroshot/{k}": v for k, v in metrics.items()}

        if zero_stage(acc) == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(net.parameters())):
                if acc.is_main_process:
                    result = run()
        elif acc.is_main_process:
            result = run()
        acc.wait_for_everyone()
        return result

    def finish(self) -> Dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        if not ckpt.is_complete(ckpt.checkpoint_path(self.out, self.step)):
            self.save_checkpoint()
        summary: Dict[str, Any] = {"step": self.step, "data_counts": self._global_counts(),
                                   "nonfinite_steps": self.nonfinite_total}
        done = self.step >= cfg.steps
        state_dict = acc.get_state_dict(self.model) if done else None  # gathers ZeRO-3 partitions (collective)
        if cfg.zeroshot_data and done:
            summary.update(self.zeroshot())
        if acc.is_main_process:
            if done:
                export_open_clip(state_dict, self.model_cfg, self.preprocess_cfg, self.out / "final")
            if summary.get("zeroshot/acc1") is not None and self.metrics is not None:
                self.metrics.log({"step": self.step, **{k: v for k, v in summary.items() if k.startswith("zeroshot/")}})
            with open(self.out / "summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            if self.metrics is not None:
                self.metrics.close()
            if cfg.report:  # RUN/report.html; a failure only logs a warning, never fails the run
                from clipkit.report import write_report_after_training
                write_report_after_training(self.out, device=str(acc.device))
        acc.wait_for_everyone()
        return summary


def train(cfg: TrainConfig) -> Dict[str, Any]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.accelerator.end_training()
