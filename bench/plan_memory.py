"""Training-step memory per rank under DeepSpeed ZeRO 0-3 on CPU, measured, next to clipkit.plan's prediction.

    python bench/plan_memory.py                                   # fp32, ZeRO 0-3, 1 and 2 processes
    python bench/plan_memory.py --precision fp32,bf16 --calibration clipkit/plan/calibration.json
    python bench/plan_memory.py --stages 2 --worlds 2 --models clipkit-tiny     # one case, smoke

Each (stage, processes, precision) runs in fresh processes under `torch.distributed.run` (gloo): the model (a 46M-
parameter open_clip config by default, so model states dwarf the allocator's noise), clipkit's AdamW, DeepSpeed's
engine with that stage, then two steps at batch 2 with clipkit's ContrastiveLoss. Measured per rank:
- peak: the kernel's RSS high-water mark (/proc/self/status VmHWM, reset through /proc/self/clear_refs after the
  engine is built) minus the RSS before the model existed; glibc is told to return freed blocks of 64 KiB and more
  to the system (MALLOC_MMAP_THRESHOLD_), so the mark follows live memory;
- the model states the engine holds after the step, tensor by tensor (storages counted once): parameters (or their
  ZeRO-3 partitions), fp32 master weights, Adam's m and v.
The transient part of a step (gradients, DeepSpeed's flat buckets and fp32 gradient partitions, ZeRO-3's gathered
parameters, and a fixed per-process part: autograd and communication bookkeeping) is peak - states - activations -
loss; over two model sizes, 1 and 2 processes, it is fitted as fixed + per_param x parameters for each stage and
precision, and --calibration FILE writes that as the planner's `zero_transient` section.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Wide enough that 16 bytes per parameter of model states (736 MB at stage 0) dwarf the allocator's noise.
BENCH_MODEL = {"embed_dim": 256,
               "vision_cfg": {"image_size": 32, "layers": 6, "width": 512, "head_width": 64, "patch_size": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 4}}


# ---------------------------------------------------------------- measurement (inside the launched processes)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import _peak_rss_bytes as _hwm  # noqa: E402  (RSS helpers shared with the loss benchmark)
from loss_memory import _reset_peak_rss  # noqa: E402
from loss_memory import _rss_bytes as _rss  # noqa: E402


def _reset_hwm() -> None:
    if not _reset_peak_rss():
        raise RuntimeError("/proc/self/clear_refs is not writable: peaks would be lifetime peaks")


def _tally(net, optimizer) -> dict:
    """Bytes of the model states the engine holds, by kind, each storage once."""
    import torch

    seen: dict = {}

    def add(t, kind):
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() and t.untyped_storage().data_ptr() not in seen:
            seen[t.untyped_storage().data_ptr()] = (kind, t.untyped_storage().nbytes())

    inner = getattr(optimizer, "optimizer", optimizer)
    for st in inner.state.values():
        for v in st.values():
            add(v, "optimizer")
    for p in net.parameters():
        add(getattr(p, "ds_tensor", None), "parameters")  # ZeRO-3 partition (p.data is an empty placeholder)
        add(p.data, "parameters")
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.data, "master_weights")
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        for t in getattr(optimizer, name, None) or []:
            add(t, "master_weights")
    out: dict = {}
    for kind, n in seen.values():
        out[kind] = out.get(kind, 0) + n
    return out


def zero_worker(stage: int, model: str, batch: int, precision: str) -> dict:
    import open_clip
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed

    from clipkit.losses import ContrastiveLoss
    from clipkit.plan.model import registered
    from clipkit.train.optim import build_optimizer

    name, cfg = registered(model)
    tokenizer = open_clip.get_tokenizer(name)
    size = cfg["vision_cfg"]["image_size"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    images, texts = torch.randn(batch, 3, size, size, dtype=dtype), tokenizer(["a red circle"] * batch)
    loss_fn = ContrastiveLoss()
    torch.manual_seed(0)
    base = _rss()
    net = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    optimizer = build_optimizer(net, 1e-4, 0.1, (0.9, 0.98), 1e-6)
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
                 "bf16": {"enabled": precision == "bf16"}}
    engine, optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
    _reset_hwm()
    for _ in range(2):
        out = engine(images, texts)
        engine.backward(loss_fn(out["image_features"], out["text_features"], out["logit_scale"]))
        engine.step()
    peak = _hwm() - base
    result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "stage": stage, "precision": precision,
              "batch": batch, "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                            for p in net.parameters()),
              "peak_bytes": peak, "states": _tally(net, optimizer)}
    dist.destroy_process_group()
    return result


def loss_worker(batch: int, dim: int, chunk: int, precision: str) -> dict:
    """Extra peak RSS of ContrastiveLoss forward + backward on this rank (features created, and one small step taken,
    before the baseline)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from clipkit.losses import ContrastiveLoss

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(dist.get_rank())
    image, text = (F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).to(dtype).requires_grad_()
                   for _ in range(2))
    scale = torch.tensor([2.659], requires_grad=True)
    loss_fn = ContrastiveLoss(chunk_size=chunk or None)
    # One small step first: the autograd engine's threads and the BLAS workspaces start once per process.
    small = [x[:8].detach().clone().requires_grad_() for x in (image, text)]
    loss_fn(small[0], small[1], scale.exp()).backward()
    # The least of 3 full-size steps: a first one can add a few MB that stay (allocator arenas, first-use buffers),
    # which at the chunked loss's ~10 MB is noise the planner's steady-state figure should not be checked against.
    peaks = []
    for _ in range(3):
        image.grad = text.grad = scale.grad = None
        base = _rss()
        _reset_hwm()
        loss_fn(image, text, scale.exp()).backward()
        peaks.append(_hwm() - base)
    result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "peak_bytes": min(peaks), "peaks": peaks}
    dist.destroy_process_group()
    return result


# ---------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *worker_args, timeout: int = 900) -> list:
    """Runs this file's worker in `world` fresh processes; returns each rank's result dict (each rank writes its own
    file: their stdout lines would interleave)."""
    with tempfile.TemporaryDirectory(prefix="clipkit_planmem_") as results_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(_free_port()), __file__, "--worker", json.dumps(list(worker_args))]
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO),
                   CLIPKIT_PLAN_RESULTS=results_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        files = sorted(Path(results_dir).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != world:
            raise RuntimeError(f"worker {worker_args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


def measure_zero(model: str, stage: int, world: int, precision: str = "fp32", batch: int = 2) -> list:
    return launch(world, "zero", stage, model, batch, precision)


def measure_loss(batch: int, world: int, dim: int, chunk: int | None, precision: str = "fp32") -> list:
    return launch(world, "loss", batch, dim, chunk or 0, precision)


# ---------------------------------------------------------------- main
BENCH_MODEL_PATH = "bench/plan-bench-46m.json"  # BENCH_MODEL, relative to the repository root


def bench_model_path() -> str:
    path = REPO / BENCH_MODEL_PATH
    if not path.is_file() or json.loads(path.read_text()) != BENCH_MODEL:
        path.write_text(json.dumps(BENCH_MODEL, indent=1) + "\n")
    return BENCH_MODEL_PATH


def fit_transient(points: list) -> dict:
    """Least squares of bytes = fixed + per_param P + per_param_per_rank P / N over (P, N, bytes) points (with bf16,
    DeepSpeed's fp32 gradient partitions make part of the step's buffers shrink with N; with fp32 they did not)."""
    import numpy as np

    a = np.array([[1.0, p, p / n] for p, n, _ in points])
    y = np.array([b for _, _, b in points])
    (fixed, per_param, per_rank), *_ = np.linalg.lstsq(a, y, rcond=None)
    return {"fixed_bytes": float(fixed), "bytes_per_param": float(per_param),
            "bytes_per_param_per_rank": float(per_rank), "points": [[p, n, round(b)] for p, n, b in points]}


def transient_points(rows: list) -> dict:
    """{precision: {stage: [(params, processes, transient bytes)]}} from measured rows: peak - measured states -
    counted activations and loss."""
    from clipkit.plan.memory import rank_memory
    from clipkit.plan.model import profile_model

    points: dict = {}
    for r in rows:
        profile = profile_model(r["model"], r["precision"])
        zero = {"zero_transient": {r["precision"]: {str(r["stage"]): {"bytes_per_param": 0.0}}}}
        mem = rank_memory(profile, r["batch"], r["world"], r["stage"], zero)
        rest = r["peak_bytes"] - sum(r["states"].values()) - mem.activations - mem.loss
        points.setdefault(r["precision"], {}).setdefault(str(r["stage"]), []).append(
            (profile.params, r["world"], rest))
    return points


def main(argv=None) -> int:
    from clipkit.plan.calibration import load_calibration, write_section
    from clipkit.plan.loss import loss_peak_bytes
    from clipkit.plan.memory import model_states, rank_memory
    from clipkit.plan.model import profile_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated open_clip config names or JSON files (default: "
                                                  "clipkit-tiny and a 46M-parameter config: two sizes to fit)")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--worlds", default="1,2", help="process counts")
    p.add_argument("--precision", default="fp32", help="fp32 and/or bf16, comma-separated")
    p.add_argument("--batch", type=int, default=2, help="per process")
    p.add_argument("--calibration", default=None, help="write the fitted transient memory into this file")
    p.add_argument("--refit", default=None, metavar="ROWS_JSON",
                   help="no new runs: fit the transient memory to the measured rows an earlier --json-out saved")
    p.add_argument("--json-out", default=None)
    p.add_argument("--loss-batches", default="2048", help="also measure the loss alone at these per-process batches "
                                                          "(D=256, full and chunked K=256, 1 and 2 processes; '' = no)")
    a = p.parse_args(argv)
    if a.refit:
        a.loss_batches = ""
    models = a.models.split(",") if a.models else ["clipkit-tiny", bench_model_path()]
    calibration = load_calibration(a.calibration) if a.calibration and Path(a.calibration).is_file() else \
        load_calibration()
    rows = json.loads(Path(a.refit).read_text()) if a.refit else []
    print("| precision | model params | stage | processes | rank | measured peak MiB | states measured MiB | "
          "states predicted MiB | peak predicted MiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision in [] if a.refit else a.precision.split(","):
        for model in models:
            profile = profile_model(model, precision)
            for stage in (int(s) for s in a.stages.split(",")):
                for world in (int(w) for w in a.worlds.split(",")):
                    for r in measure_zero(model, stage, world, precision, a.batch):
                        rows.append({**r, "model": model})
    for r in rows:
        profile = profile_model(r["model"], r["precision"])
        states = model_states(profile.params, profile.trainable, r["stage"], r["world"], r["precision"],
                              profile.persistent)
        try:
            predicted = rank_memory(profile, r["batch"], r["world"], r["stage"], calibration).total
            ratio = f"{predicted / r['peak_bytes']:.3f}"
        except ValueError:
            predicted, ratio = float("nan"), "(no calibration)"
        r.update(states_predicted=states, peak_predicted=predicted)
        print(f"| {r['precision']} | {profile.params / 1e6:.1f} M | {r['stage']} | {r['world']} | {r['rank']} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {sum(r['states'].values()) / 2**20:.0f} | "
              f"{sum(states.values()) / 2**20:.0f} | {predicted / 2**20:.0f} | {ratio} |", flush=True)
    points = transient_points(rows)
    if a.loss_batches:
        print("\n| loss | B per process | processes | rank | measured peak MiB | predicted MiB | "
              "predicted / measured |")
        print("|---|---|---|---|---|---|---|")
        for batch in (int(x) for x in a.loss_batches.split(",")):
            for chunk in (None, 256):
                for world in (1, 2):
                    predicted = loss_peak_bytes(batch, world, 256, chunk, "fp32")
                    for r in measure_loss(batch, world, 256, chunk):
                        print(f"| {'full logits' if chunk is None else f'chunked K={chunk}'} | {batch} | {world} | "
                              f"{r['rank']} | {r['peak_bytes'] / 2**20:.1f} | {predicted / 2**20:.1f} | "
                              f"{predicted / r['peak_bytes']:.3f} |", flush=True)
    summary = {prec: {stage: fit_transient(pts) for stage, pts in stages.items()} for prec, stages in points.items()}
    print(json.dumps({"models": models, "zero_transient": summary}, indent=1))
    if a.calibration:
        merged = dict(load_calibration(a.calibration).get("zero_transient", {})) if Path(a.calibration).is_file() \
            else {}
        for prec, stages in summary.items():
            merged.setdefault(prec, {}).update(stages)
        write_section(a.calibration, "zero_transient", {**merged, "batch": a.batch})
        print(f"wrote zero_transient to {a.calibration}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        kind, *args = json.loads(sys.argv[2])
        out = zero_worker(*args) if kind == "zero" else loss_worker(*args)
        Path(os.environ["CLIPKIT_PLAN_RESULTS"], f"rank{out['rank']}.json").write_text(json.dumps(out))
    else:
        sys.exit(main())
