"""The training loop: accelerate + DeepSpeed (ZeRO 0-3), exact mid-epoch resume, one readable step function.

Launch: `accelerate launch --config_file train/accelerate/cpu_zero2.yaml train/main.py --train-data ... --steps ...`,
or plain `python train/main.py ...` for one process without DeepSpeed.

Per step, clipkit itself makes one all-reduce (a small float64 vector: the non-finite flag, the loss, the next step's
data status and the bad-sample counts) and one host sync (reading that vector back); metrics that need more (grad norm,
logit scale) are read only on logged steps. accelerate/DeepSpeed add their own gradient and parameter collectives.
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from clipkit import distributed as dist
from clipkit.data import GOOD_REASONS, REASONS, DataPosition, SampleExtras, build_train_loader, count_samples
from clipkit.data import default_stall_samples as stall_samples
from clipkit.fast_attention import pack_attention
from clipkit.losses import build_loss
from clipkit.models import create_model, export_open_clip, preprocess_cfg_of
from clipkit.text_padding import enable_short_text, trim_padding
from clipkit.train import checkpoint as ckpt
from clipkit.train.accel import is_deepspeed, make_accelerator, zero_stage
from clipkit.train.allocator import tune_malloc
from clipkit.train.config import TrainConfig, save_yaml
from clipkit.train.errors import DataError, NonFiniteError
from clipkit.train.faults import Faults
from clipkit.train.feed import EpochFeed, summed_status
from clipkit.train.metrics import MetricsLogger
from clipkit.train.optim import build_optimizer, build_scheduler
from clipkit.train.preflight import Preflight, preflight
from clipkit.train.recipe import Recipe, attach_ssl_head, exportable, logit_scale_init, uses_recipe
from clipkit.train.threads import apply_threads
from clipkit.transforms import split_uint8

log = logging.getLogger("clipkit.train")
LOGIT_SCALE_MAX = math.log(100.0)
_STEP_FIELDS = ("nonfinite", "loss")  # the step's own entries of the all-reduced vector, before the data status


def model_outputs(model, images, texts):
    out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")


def compile_towers(net: torch.nn.Module) -> None:
    """torch.compile, regionally: each transformer block of open_clip's towers is compiled in place (the blocks share
    their code, so one compilation serves them all); other towers (timm, Hugging Face) are compiled whole. In-place
    `Module.compile` keeps parameter names, so checkpoints and exports are unchanged."""
    compiled = 0
    for tower in (getattr(net, "visual", None), getattr(net, "transformer", None), getattr(net, "text", None)):
        if tower is None:
            continue
        blocks = getattr(getattr(tower, "transformer", tower), "resblocks", None)
        if blocks is not None:
            for block in blocks:
                block.compile()
                compiled += 1
        elif tower is not getattr(net, "transformer", None):
            tower.compile()
            compiled += 1
    log.info("--compile: %d module(s) compiled with torch.compile", compiled)


class Trainer:
    def __init__(self, cfg: TrainConfig, pre: Preflight | None = None):
        self.cfg = cfg
        threads = apply_threads(cfg.threads)
        malloc = tune_malloc(cfg.malloc_tuning)
        pre = pre or preflight(cfg)
        self.accelerator = make_accelerator(cfg)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        log.info("rank %d: %s", self.rank, threads)
        log.info("rank %d: %s", self.rank, malloc)
        self.faults = Faults.from_env()
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)

        from accelerate.utils import set_seed
        set_seed(cfg.seed)
        model, self.model_cfg, self.preprocess_train, self.preprocess_val, self.tokenizer = create_model(
            cfg.model, hf_text_model=cfg.hf_text_model, lock_text=cfg.lock_text, siglip=cfg.loss == "siglip",
            hf_text_model_id=cfg.hf_text_model_id, frozen_text_dropout=cfg.frozen_text_dropout,
            lock_text_freeze_layer_norm=cfg.lock_text_freeze_layer_norm,
            pretrained=cfg.pretrained, config_dir=self.out / "model_config", lock_image=cfg.lock_image,
            lock_image_unlocked_groups=cfg.lock_image_unlocked_groups,
            lock_image_freeze_bn_stats=cfg.lock_image_freeze_bn_stats,
            init_logit_scale=logit_scale_init(cfg) if cfg.loss == "clip" else None)  # SigLIP keeps its own init
        if cfg.fixed_temperature:
            model.logit_scale.requires_grad_(False)
        self.preprocess_cfg = preprocess_cfg_of(model)
        self.flops_per_sample = self._train_flops(model)
        self.short_text = cfg.trim_text_padding and enable_short_text(model, self.tokenizer)
        log.info("text batches cut at their longest caption: %s", "yes" if self.short_text else "no")
        if cfg.packed_attention:
            log.info("self-attention packed in %d transformer block(s) (clipkit.fast_attention)", pack_attention(model))
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.compile:
            compile_towers(model)
        # workers send uint8 images; the last two steps of the transform run on the batch, on the device
        self.loader_transform, self.normalize, self.extras = self._transforms()
        attach_ssl_head(model, cfg, self.model_cfg["embed_dim"])
        optimizer = build_optimizer(model, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
        scheduler = build_scheduler(optimizer, cfg.warmup, cfg.steps)
        # Frozen parameters have no fp32 master under DeepSpeed (bf16 casts the module): the export takes these.
        self.frozen_fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.deepspeed = is_deepspeed(self.accelerator)
        self.zero3 = zero_stage(self.accelerator) == 3
        self.loss_fn = build_loss(cfg.loss, cfg.loss_chunk_size, cfg.hard_negative_beta)
        net = self.accelerator.unwrap_model(self.model)
        self.recipe = Recipe(cfg, net, self.model_cfg["embed_dim"], self.accelerator.device) if uses_recipe(cfg) \
            else None
        # DeepSpeed bf16 keeps the module's weights in bf16 and does not autocast: images must arrive in bf16 too
        # (float32 images meet bf16 conv weights otherwise). Without DeepSpeed, accelerate autocasts fp32 weights.
        self.image_dtype = torch.bfloat16 if self.deepspeed and cfg.precision == "bf16" else None
        from clipkit.flops import peak_tflops
        self.peak_tflops = peak_tflops(self.accelerator.device, cfg.precision, cfg.peak_tflops)

        self.fingerprint = pre.fingerprint
        self.shards = pre.shards
        self.shard_sizes = pre.sizes
        self.step = 0
        self.position = DataPosition(epoch=0)
        self.pad_position: DataPosition | None = None
        self.epoch_steps = 0           # optimizer steps taken in the current epoch
        self.skip_totals: Dict[str, int] = {}   # bad-sample counts of finished epochs
        self.padded_total = 0          # samples trained a second time as pads (see clipkit.train.feed)
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        if pre.resume_from is not None:
            self._restore(pre.resume_from, pre.resume_state)
        self.steps_per_epoch = self._steps_per_epoch()
        self.metrics = MetricsLogger(self.out, cfg.tensorboard, self.step) if self.accelerator.is_main_process else None
        if self.accelerator.is_main_process:
            save_yaml(cfg, self.out / "config.yaml",
                      {"world_size": self.world, "zero_stage": zero_stage(self.accelerator)})

    # ---------------------------------------------------------------- state
    def _restore(self, path: Path, state: Dict[str, Any]) -> None:
        ckpt.load(self.accelerator, path)
        if self.recipe is not None:
            self.recipe.load(path)
        self.step = state["step"]
        # Each rank's own data state (checkpoints before per-rank states held rank 0's for every rank).
        mine = state["ranks"][self.rank] if "ranks" in state else state
        self.position = DataPosition.from_dict(mine["position"])
        pad = mine.get("pad_position")
        self.pad_position = DataPosition.from_dict(pad) if pad else None
        self.skip_totals = mine["skip_totals"]
        self.padded_total = mine.get("padded_total", 0)
        self.epoch_steps = state["epoch_steps"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        log.info("resumed from %s at step %d (epoch %d, %d steps into it)", path, self.step, self.position.epoch,
                 self.epoch_steps)

    def _state(self) -> Dict[str, Any]:
        """The trainer's state for a checkpoint (a collective: every rank's data state is gathered)."""
        mine = {
            "position": self.position.to_dict(),
            "pad_position": self.pad_position.to_dict() if self.pad_position is not None else None,
            "skip_totals": self.skip_totals,
            "padded_total": self.padded_total,
        }
        return {
            "step": self.step,
            "epoch_steps": self.epoch_steps,
            "nonfinite_total": self.nonfinite_total,
            "ranks": dist.all_gather_json(mine),  # rank r's data position, pads and counts at index r
            "fingerprint": self.fingerprint,
        }

    def _steps_per_epoch(self) -> int | None:
        """Resampled mode has no natural epoch: --train-num-samples (or the shards' count) defines one."""
        if not self.cfg.resampled:
            return None
        n = self.cfg.train_num_samples or count_samples(self.shards, self.cfg.allow_unsafe_urls)
        return n // (self.cfg.batch_size * self.cfg.grad_accum * self.world)  # >= 1: checked by preflight

    def save_checkpoint(self) -> Path:
        import yaml
        return ckpt.save(self.accelerator, self.out, self.step, self._state(),
                         yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.cfg.keep_last,
                         before_complete=self.faults.before_complete,
                         write_extra=self.recipe.save if self.recipe is not None else None)

    def _train_flops(self, model) -> int | None:
        """Training FLOPs per sample (3 x forward, torch's FLOP counter), for the tflops/mfu columns."""
        from clipkit.flops import train_flops_per_sample
        try:
            size = self.model_cfg["vision_cfg"].get("image_size", 224)
            context = self.model_cfg["text_cfg"].get("context_length", 77)
            return train_flops_per_sample(model, size, context)
        except Exception as e:  # an exotic tower the counter cannot trace: no tflops column, not a failed run
            log.warning("cannot count the model's FLOPs (%s): metrics.jsonl has no tflops/mfu", e)
            return None

    def _transforms(self):
        """(loader transform ending in uint8, DeviceNormalize or None, SampleExtras) for the loader workers."""
        from clipkit.augment import AugmentSettings, parse_scale, simclr_settings, train_transform

        cfg, size = self.cfg, self.model_cfg["vision_cfg"].get("image_size", 224)
        settings = AugmentSettings(parse_scale(cfg.aug_scale), cfg.color_jitter, cfg.grayscale, cfg.blur)
        transform = self.preprocess_train if settings.is_default else train_transform(size, self.preprocess_cfg,
                                                                                        settings)
        loader_transform, normalize = split_uint8(transform)
        views = None
        if cfg.image_ssl_weight:
            views, _ = split_uint8(train_transform(size, self.preprocess_cfg, simclr_settings()))
        return loader_transform, normalize, SampleExtras(views=views, caption_negatives=cfg.caption_negatives)

    # ---------------------------------------------------------------- data
    def _loader(self, position: DataPosition):
        cfg = self.cfg
        return build_train_loader(
            urls=self.shards, preprocess=self.loader_transform, tokenizer=self.tokenizer,
            batch_size=cfg.batch_size, num_workers=cfg.workers, seed=cfg.seed, rank=self.rank, world_size=self.world,
            resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, position=position,
            max_pixels=cfg.max_image_pixels, allow_unsafe_urls=cfg.allow_unsafe_urls, sizes=self.shard_sizes,
            split=cfg.epoch_split, extras=self.extras if self.extras else None,
            batches_per_epoch=self.steps_per_epoch * cfg.grad_accum if self.steps_per_epoch else None)

    def _skip_counts(self, position: DataPosition | None = None) -> Dict[str, int]:
        """Raw samples by reason (see clipkit.data.REASONS), finished epochs and the current one."""
        totals = dict(self.skip_totals)
        for k, v in (position or self.position).totals().items():
            totals[k] = totals.get(k, 0) + v
        return totals

    def _global_counts(self) -> Dict[str, int]:
        """`_skip_counts` summed over ranks (a collective: every rank calls it)."""
        local = self._skip_counts()
        summed = dist.all_reduce_sum(torch.tensor([local.get(r, 0) for r in REASONS], dtype=torch.float64))
        return {r: int(n) for r, n in zip(REASONS, summed.tolist())}

    def _check_data(self, status: Dict[str, Any]) -> None:
        """Stops every rank alike (the status is all-reduced) when the data cannot make progress."""
        cfg, counts = self.cfg, status["counts"]
        seen = sum(counts.values())
        good = sum(counts[k] for k in GOOD_REASONS)
        bad = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v and k not in GOOD_REASONS) or "none"
        global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if status["ranks_stalled"]:
            raise DataError(f"a loader worker on {status['ranks_stalled']} rank(s) read "
                            f"{stall_samples(cfg.batch_size):,} samples in a row without completing a batch ({seen:,} "
                            f"read in all, {good:,} usable; bad by reason: {bad}): check the shards")
        if status["ranks_with_data"] == 0 and self.epoch_steps == 0:
            slots = self.world * max(cfg.workers, 1)
            if not good:
                what = f"0 of {seen:,} samples usable ({bad}): check the shards"
            elif good < global_batch:
                what = (f"{good:,} good samples per epoch, fewer than one global batch of {global_batch:,} "
                        f"(--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {self.world} process(es)): "
                        "lower --batch-size or add data")
            else:
                what = (f"{good:,} good samples per epoch, split over {slots} loader workers ({self.world} process(es) "
                        f"x --workers {max(cfg.workers, 1)}), give none of them a full batch of {cfg.batch_size}: "
                        "lower --batch-size or --workers, or add data")
            raise DataError(f"epoch {self.position.epoch} yields no optimizer step: {what}")
        if status["ranks_with_data"] and status["ranks_out_unpaddable"]:
            raise DataError(f"{status['ranks_out_unpaddable']} rank(s) got no full batch of {cfg.batch_size} in epoch "
                            f"{self.position.epoch} while others did ({good:,} good samples over all ranks): lower "
                            "--batch-size, or use more shards or fewer processes")
        if seen >= cfg.skip_rate_min_samples and seen and (seen - good) / seen > cfg.max_skip_rate:
            raise DataError(f"{seen - good:,} of {seen:,} samples ({(seen - good) / seen:.1%}) were skipped as bad, "
                            f"over --max-skip-rate {cfg.max_skip_rate:.1%}: check the shards (bad by reason: {bad})")

    def _first_status(self, feed: EpochFeed, taken: List[dict]) -> Dict[str, Any]:
        """The data status at the start of a pass (later ones travel with each step's all-reduce)."""
        vector = torch.tensor(feed.local_status(taken, self._skip_counts(feed.position)), dtype=torch.float64)
        return summed_status(dist.all_reduce_sum(vector).tolist())

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

    def _texts(self, batch: dict) -> torch.Tensor:
        """The batch's token ids, cut at its longest caption (with its caption negatives) when the model allows."""
        if not self.short_text:
            return batch["text"]
        text, negatives = trim_padding(batch["text"], batch.get("neg_text"))
        if negatives is not None:
            batch["neg_text"] = negatives
        return text

    def _all_reduce_step(self, loss_value: torch.Tensor, terms: Dict[str, torch.Tensor],
                         data_status: List[float]) -> List[float]:
        """The step's one collective: [non-finite flag, loss, *loss terms, *next step's data status] summed over
        ranks, read back to the host once (the non-finite decision needs it there)."""
        finite = torch.isfinite(loss_value)
        head = [(~finite).to(torch.float64), torch.where(finite, loss_value, 0).to(torch.float64)]
        head += [t.reshape(()).to(torch.float64) for t in terms.values()]
        vector = torch.cat([torch.stack(head), torch.tensor(data_status, dtype=torch.float64, device=finite.device)])
        return dist.all_reduce_sum(vector).tolist()

    def _backward_and_step(self, loss: torch.Tensor, last: bool) -> None:
        """backward; on the last micro-step: the kill hook, clip and the optimizer step (accelerate's backward, with
        the hook where it says: after the gradients exist, before any parameter or optimizer state changes)."""
        acc, model = self.accelerator, self.model
        if self.deepspeed:  # model is the DeepSpeedEngine: it scales by 1/grad_accum, clips and steps itself
            model.set_gradient_accumulation_boundary(is_boundary=last)
            model.backward(loss)
            if last:
                self.faults.maybe_kill(self.step + 1, self.rank)
                model.step()  # clip (gradient_clipping), optimizer step, lr schedule step, zero grad
            return
        acc.backward(loss)
        if last:
            self.faults.maybe_kill(self.step + 1, self.rank)
            if self.cfg.grad_clip:
                self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()  # accelerate skips it until the last micro-step
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, batches: List[dict], next_data_status: List[float]) -> Dict[str, Any]:
        """batch -> forward -> loss -> one all-reduce (finite check + next step's data status) -> backward -> clip ->
        step -> schedule.

        With grad_accum > 1 the loss spans the whole accumulated batch (all its negatives): features of every
        micro-batch are computed without grad first, then each micro-batch is recomputed with grad against the cached
        rest. Every micro-loss is the full-batch loss, so each parameter gets its exact full-batch gradient:
        `logit_scale` (and `logit_bias`) take theirs from the first micro-step only (open_clip's accum_freq gives them
        accum_freq times it instead).
        """
        acc, model, ga = self.accelerator, self.model, self.cfg.grad_accum
        dev = acc.device
        micro = [(self._images(b["image"]), self._texts(b).to(dev, non_blocking=True)) for b in batches]
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step is taken with
        self.grad_norm = None
        terms: Dict[str, torch.Tensor] = {}
        if ga == 1 and self.recipe is not None:  # queue, distillation, negatives, views: one forward, more terms
            images, texts = micro[0]
            img, txt, scale, bias = model_outputs(model, *self.recipe.inputs(images, texts, batches[0],
                                                                             self.normalize))
            loss, terms = self.recipe.loss(acc.unwrap_model(model), self.loss_fn, images, texts, img, txt, scale)
            loss_value = loss.detach().float()
        elif ga == 1:
            img, txt, scale, bias = model_outputs(model, *micro[0])
            loss = self._loss(img, txt, scale, bias)
            loss_value = loss.detach().float()
        else:
            with torch.no_grad():
                cached = [model_outputs(model, *m) for m in micro]
                imgs = [c[0] for c in cached]
                txts = [c[1] for c in cached]
                loss_value = self._loss(torch.cat(imgs), torch.cat(txts), cached[-1][2], cached[-1][3]).float()
        if self.faults.poison(self.step + 1, self.rank):
            loss_value = loss_value * float("nan")
        reduced = self._all_reduce_step(loss_value, terms, next_data_status)
        n = len(_STEP_FIELDS) + len(terms)
        out = {"lr": lr, "data_status": summed_status(reduced[n:]), "nonfinite": reduced[0] > 0,
               "loss": reduced[1] / self.world if reduced[0] == 0 else float("nan"),
               "terms": {k: v / self.world for k, v in zip(terms, reduced[len(_STEP_FIELDS):n])}}
        if out["nonfinite"]:  # some rank saw a non-finite loss: every rank skips this step alike
            return out

        if ga == 1:
            self._backward_and_step(loss, last=True)
        else:
            for j, m in enumerate(micro):
                with acc.accumulate(model):  # DDP: gradients sync on the last micro-step only (no-op in DeepSpeed)
                    img, txt, scale, bias = model_outputs(model, *m)
                    img = torch.cat(imgs[:j] + [img] + imgs[j + 1:])
                    txt = torch.cat(txts[:j] + [txt] + txts[j + 1:])
                    if j > 0:
                        scale = scale.detach()
                        bias = bias.detach() if bias is not None else None
                    # accelerate/DeepSpeed divide by grad_accum; each micro-loss already is the full-batch loss.
                    self._backward_and_step(self._loss(img, txt, scale, bias) * ga, last=j == ga - 1)
        self.scheduler.step()  # a no-op wrapper under DeepSpeed, whose engine stepped the schedule
        dist.clamp_param_(acc.unwrap_model(model).logit_scale, 0.0, LOGIT_SCALE_MAX)  # CLIP paper: at most 100
        if self.recipe is not None:
            self.recipe.after_step(acc.unwrap_model(model))  # EMA update, this step's keys into the queue
        return out

    def _logged_extras(self, stepped: bool) -> Dict[str, float]:
        """Values that cost a sync or a collective to read: only on logged steps (every rank calls this)."""
        net = self.accelerator.unwrap_model(self.model)
        extras = {"logit_scale": float(dist.read_param(net.logit_scale, self.zero3).reshape(-1)[0])}
        norm = (self.model.get_global_grad_norm() if self.deepspeed else self.grad_norm) if stepped else None
        if norm is not None:
            extras["grad_norm"] = float(norm)
        return extras

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
            feed = EpochFeed(self._loader, self.position, self.pad_position, cfg.grad_accum, cfg.batch_size,
                             cfg.workers)
            t_data = time.perf_counter()
            taken = feed.take()
            status = self._first_status(feed, taken)
            while True:
                self._check_data(status)
                if status["ranks_with_data"] == 0:  # every rank has trained its whole share of the epoch
                    break
                batches = taken + feed.pad(cfg.grad_accum - len(taken))  # pads only while another rank has data
                position, pad_position = feed.position, feed.pad_position  # just after this step's batches
                more = self.step + 1 < last
                taken = feed.take() if more else []
                t_step = time.perf_counter()
                out = self.train_step(batches, feed.local_status(taken, self._skip_counts(feed.position)))
                status = out["data_status"] if more else {**out["data_status"], "ranks_with_data": 0}
                self.step += 1
                self.epoch_steps += 1
                self.position, self.pad_position = position, pad_position
                padded = sum(len(b["keys"]) for b in batches if b.get("pad"))
                self.padded_total += padded
                self.faults.record_batches(self.step, self.rank, batches, out["nonfinite"])
                self._count_nonfinite(out["nonfinite"])
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or self._zeroshot_due():
                    self._log_step(out, t_data, t_step, global_batch, status["counts"], padded)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                t_data = time.perf_counter()
                if not more:
                    break
            if self.step < last:
                self._next_epoch(feed)
        if bar is not None:
            bar.close()
        return self.finish()

    def _count_nonfinite(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("step %d: non-finite loss on some rank, step skipped on all ranks (%d in a row)",
                    self.step, self.nonfinite_streak)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(f"{self.nonfinite_streak} consecutive steps had a non-finite loss "
                                 f"(--max-nonfinite-steps {self.cfg.max_nonfinite_steps}): stopping at step "
                                 f"{self.step}; lower --lr or check the data")

    def _zeroshot_due(self) -> bool:
        cfg = self.cfg
        return bool(cfg.zeroshot_data and cfg.zeroshot_every and self.step % cfg.zeroshot_every == 0
                    and self.step < cfg.steps)  # the final eval runs in finish()

    def _log_step(self, out: Dict[str, Any], t_data: float, t_step: float, global_batch: int,
                  counts: Dict[str, int], padded: int) -> None:
        """One metrics.jsonl record (every rank calls this on the same steps: it reads values across ranks)."""
        now = time.perf_counter()
        step_time = now - t_data
        record = {
            "step": self.step, "epoch": self.position.epoch, "loss": out["loss"], "lr": out["lr"],
            "samples_per_s": global_batch / max(step_time, 1e-9), "data_time": t_step - t_data,
            "step_time": step_time, "skipped": sum(v for k, v in counts.items() if k not in GOOD_REASONS),
            "padded_samples": padded, "nonfinite_steps": self.nonfinite_total,
        }
        record.update(self._logged_extras(stepped=not out["nonfinite"]))
        record.update(out["terms"])
        if self.recipe is not None:
            record.update(self.recipe.metrics())
        if self.flops_per_sample:
            tflops = self.flops_per_sample * global_batch / max(step_time, 1e-9) / self.world / 1e12
            record["tflops"] = tflops  # per device
            if self.peak_tflops:
                record["mfu"] = tflops / self.peak_tflops
        if torch.cuda.is_available():
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1024**3  # this process, since start
        if self._zeroshot_due():
            record.update(self.zeroshot())
        if self.metrics is not None:
            self.metrics.log(record)

    def _next_epoch(self, feed: EpochFeed) -> None:
        self.skip_totals = self._skip_counts(feed.position)  # everything read, end records included
        self.position = DataPosition(epoch=self.position.epoch + 1)
        self.pad_position = None
        self.epoch_steps = 0
        log.info("starting epoch %d at step %d", self.position.epoch, self.step)

    def zeroshot(self) -> Dict[str, float]:
        """Zero-shot eval on rank 0 (weights gathered first under ZeRO-3); all ranks wait for it."""
        from clipkit.eval.zeroshot import evaluate_zeroshot

        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        result: Dict[str, float] = {}
        with dist.gathered_parameters(net.parameters(), enabled=self.zero3):
            if acc.is_main_process:
                net.eval()
                with torch.no_grad():
                    metrics = evaluate_zeroshot(net, self.tokenizer, self.preprocess_val, self.cfg.zeroshot_data,
                                                templates=self.cfg.zeroshot_templates, device=str(acc.device),
                                                max_samples=self.cfg.zeroshot_max_samples)
                net.train()
                result = {f"zeroshot/{k}": v for k, v in metrics.items()}
        dist.barrier()
        return result

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights `final/` gets, in float32: under DeepSpeed the optimizer's fp32 masters (the module holds only
        their bf16 rounding under bf16) and the frozen parameters as they were before training (a collective)."""
        if self.cfg.export_momentum:
            return self.recipe.momentum_export()
        net = self.accelerator.unwrap_model(self.model)
        if not self.deepspeed:
            return exportable(net.state_dict())
        return exportable(dist.full_fp32_state_dict(net, self.zero3, self.frozen_fp32))

    def finish(self) -> Dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        if not ckpt.is_complete(ckpt.checkpoint_path(self.out, self.step)):
            self.save_checkpoint()
        summary: Dict[str, Any] = {"step": self.step, "data_counts": self._global_counts(),
                                   "padded_samples": int(dist.all_reduce_sum(
                                       torch.tensor([self.padded_total], dtype=torch.float64)).item()),
                                   "nonfinite_steps": self.nonfinite_total}
        done = self.step >= cfg.steps
        state_dict = self.export_state_dict() if done else None
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
        dist.barrier()
        return summary


def train(cfg: TrainConfig, pre: Preflight | None = None) -> Dict[str, Any]:
    trainer = Trainer(cfg, pre)
    try:
        return trainer.fit()
    finally:
        trainer.accelerator.end_training()

