"""Training throughput: clipkit's `train/main.py` vs open_clip_train 3.3 on the same shards, in one run.

    python bench/train_throughput.py                     # clipkit-tiny, 64 px, batch 128, fp32, 2 workers, CPU
    python bench/train_throughput.py --steps 8 --skip 3 --batch-size 32    # smoke run
    # issue 10: ours launched as users do (plain python, `accelerate launch` with no config, README's 2-process
    # ZeRO-2 command) against open_clip_train launched with python
    python bench/train_throughput.py --batch-size 64 --steps 24 --skip 4 --rounds 3 \
        --ours-launch python,accelerate,zero2
    # GPU (see bench/gpu_train.sh): ViT-B-32, 224 px, bf16, DeepSpeed ZeRO-2 for ours
    python bench/train_throughput.py --model ViT-B-32 --image-size 224 --batch-size 256 --steps 100 --skip 20 \
        --precision bf16 --accelerate-config train/accelerate/gpu_zero2.yaml --peer-precision amp_bf16 ...

Both sides: one process, the same model config (ours registers clipkit's JSON configs; the peer gets them through
`open_clip.add_model_config` in a wrapper, see `peer_main`), the same synthetic WebDataset shards, batch size,
data-loader workers, AdamW settings, grad-norm clipping 1.0, plain CLIP loss, open_clip's train transforms, no eval,
no TensorBoard. Ours logs step_time per step in metrics.jsonl; open_clip logs "Train Epoch ... N/s" per step
(--log-every-n-steps 1), from which its step time is batch / rate. Both step times span data wait + step. The first
--skip steps (start-up, allocator and data-pipeline warm-up, the peer's 1000-sample shuffle fill) are left out:
samples/s = batch * steps counted / sum of their step times. With --rounds > 1 the two alternate, so load from
neighbours on a shared machine hits both alike, and the median round is reported.

On CUDA it also reports peak GPU memory (torch.cuda.max_memory_allocated: ours logs peak_mem_gb, the peer's wrapper
prints it) and model FLOPs utilisation: FLOPs of one forward + backward (torch.utils.flop_counter, counted once on
CPU) x samples/s / --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-peers-openclip" / "bin" / "python"
PEER_RATE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): [\d.]+, ([\d.]+)/s")
PEER_PEAK = "PEER_PEAK_MEM_GB="
RATE_KEYS = ("samples_per_s", "pooled_median_samples_per_s", "pooled_p10_samples_per_s")


# ---------------------------------------------------------------- data
def _write_chunk(args) -> dict:
    from clipkit.synthetic import write_train_shards

    chunk_dir, n, per_shard, seed, size = args
    write_train_shards(chunk_dir, n, per_shard=per_shard, seed=seed, size=size)
    return json.loads((Path(chunk_dir) / "sizes.json").read_text())


def make_shards(out_dir: Path, num_samples: int, num_shards: int, image_size: int, procs: int) -> str:
    """`num_shards` shards of synthetic shapes (clipkit.synthetic), written by `procs` processes; returns the brace
    spec both trainers read. Also writes open_clip's sizes.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = -(-num_samples // num_shards)
    jobs = [(str(out_dir / f"chunk{i:03d}"), per_shard, per_shard, 1000 + i, image_size) for i in range(num_shards)]
    sizes = {}
    with ProcessPoolExecutor(max_workers=max(1, procs)) as pool:
        for i, chunk_sizes in enumerate(pool.map(_write_chunk, jobs)):
            (count,) = chunk_sizes.values()
            name = f"shard-{i:05d}.tar"
            os.replace(Path(jobs[i][0]) / "00000.tar", out_dir / name)
            shutil.rmtree(jobs[i][0])
            sizes[name] = count
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return str(out_dir / f"shard-{{00000..{num_shards - 1:05d}}}.tar")


# ---------------------------------------------------------------- runs
def _env(extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for kv in extra:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants: launcher, trainer, loader workers
    return ru.ru_utime + ru.ru_stime


def _run(cmd: list[str], env: dict, cwd: Path, log_path: Path, timeout: float) -> tuple[float, float]:
    """Runs `cmd`; returns (wall seconds, CPU seconds of its whole process tree)."""
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    with open(log_path, "w") as log:
        # own process group: on timeout the launcher's children (torchrun workers, data loader workers) die too
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}; log {log_path}:\n{tail}")
    return wall, _children_cpu_s() - cpu0


def _steady(step_times: list[float], data_times: list[float], batch: int, skip: int) -> dict:
    """samples/s over the steps after `skip`; data_frac: the share of that time spent waiting for batches."""
    kept = step_times[skip:]
    if not kept:
        raise RuntimeError(f"no steps left after skipping {skip} of {len(step_times)}")
    return {"samples_per_s": batch * len(kept) / sum(kept), "steps_counted": len(kept),
            "median_step_s": statistics.median(kept), "data_frac": sum(data_times[skip:]) / sum(kept),
            "step_times": kept}


LAUNCHES = ("python", "accelerate", "zero2", "zero0")  # how ours is started (see --ours-launch)
TWO_PROCESS = ("zero2", "zero0")  # the launches with 2 processes on the node, train/accelerate/cpu_<launch>.yaml


def run_ours(a, spec: str, work: Path, tag: str, launch: str = "python") -> dict:
    """launch: "python" (python train/main.py), "accelerate" (`accelerate launch --num_processes 1` with no config
    file, as a new user types it), "zero2" (README's 2-process ZeRO-2 command, each process half the batch, so the
    global batch is the peer's), "zero0" (the same with train/accelerate/cpu_zero0.yaml). "LAUNCH:FLAG" adds
    train/main.py's --FLAG to that launch (e.g. "python:no-malloc-tuning"), so one run compares both."""
    launch, _, variant = launch.partition(":")
    extra = [f"--{variant}"] if variant else []
    out = work / f"ours-{launch}{'-' + variant if variant else ''}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    per_process = a.batch_size // 2 if launch in TWO_PROCESS else a.batch_size
    flags = ["--model", a.model, "--train-data", spec, "--batch-size", str(per_process), "--steps", str(a.steps),
             "--workers", str(a.workers), "--precision", a.precision, "--lr", "5e-4", "--wd", "0.2", "--warmup", "10",
             "--grad-clip", "1.0", "--seed", "0", "--output-dir", str(out), "--no-tensorboard", "--no-progress",
             "--no-report", "--log-every", "1", *a.ours_flag, *extra]
    main_py = str(REPO / "train" / "main.py")
    if a.accelerate_config:
        cmd = [a.python, "-m", "accelerate.commands.launch", "--config_file", a.accelerate_config,
               "--num_processes", "1", "--num_machines", "1", main_py, *flags]
    elif launch == "accelerate":
        cmd = [a.python, "-m", "accelerate.commands.launch", "--num_processes", "1", main_py, *flags]
    elif launch in TWO_PROCESS:
        cmd = [a.python, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "train" / "accelerate" / f"cpu_{launch}.yaml"), "--num_processes", "2", main_py, *flags]
    else:
        cmd = [a.python, main_py, *flags]
    wall, cpu = _run(cmd, _env(a.ours_env), REPO, out.with_suffix(".log"), a.timeout)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "step_time" in r]
    res = _steady([r["step_time"] for r in recs], [r["data_time"] for r in recs], a.batch_size, a.skip)
    res.update(wall_s=wall, cpu_s=cpu, steps_run=len(recs), final_loss=recs[-1]["loss"])
    peaks = [r["peak_mem_gb"] for r in recs if r.get("peak_mem_gb") is not None]
    if peaks:
        res["peak_mem_gb"] = max(peaks)
    return res


def run_peer(a, spec: str, work: Path, tag: str, precision: str) -> dict:
    cwd = work / f"peer-{tag}"
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    flags = ["--train-data", spec, "--train-num-samples", str(a.steps * a.batch_size), "--dataset-type", "webdataset",
             "--epochs", "1", "--model", a.model, "--batch-size", str(a.batch_size), "--workers", str(a.workers),
             "--precision", precision, "--lr", "5e-4", "--wd", "0.2", "--warmup", "10", "--beta1", "0.9",
             "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0", "--seed", "0", "--save-frequency", "0",
             "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1", "--report-to", "",
             "--logs", "none", "--name", "run"]  # --logs none: no checkpoint write at the end; log in ./none/run/
    cmd = [a.peer_python, str(Path(__file__).resolve()), "peer-main", *flags]
    log_path = work / f"peer-{tag}.log"
    wall, cpu = _run(cmd, _env(a.peer_env), cwd, log_path, a.timeout)
    text = log_path.read_text(errors="replace")
    lines = [(float(m.group(2)), float(m.group(3))) for m in PEER_RATE.finditer(text)]
    if not lines:
        raise RuntimeError(f"no 'Train Epoch' lines in {log_path}")
    rates = [rate for _, rate in lines]
    res = _steady([a.batch_size / r for r in rates], [d for d, _ in lines], a.batch_size, a.skip)
    res.update(wall_s=wall, cpu_s=cpu, steps_run=len(rates))
    loss = re.findall(r"Loss: ([\d.]+)", text)
    if loss:
        res["final_loss"] = float(loss[-1])
    peak = [line for line in text.splitlines() if line.startswith(PEER_PEAK)]
    if peak:
        res["peak_mem_gb"] = float(peak[-1][len(PEER_PEAK):])
    return res


def peer_main(argv: list[str]) -> int:
    """Runs in the peer's venv: open_clip_train.main.main with clipkit's JSON model configs registered."""
    import open_clip
    import torch
    from open_clip_train.main import main

    open_clip.add_model_config(REPO / "clipkit" / "model_configs")
    rc = main(argv)
    if torch.cuda.is_available():
        print(f"{PEER_PEAK}{torch.cuda.max_memory_allocated() / 1024**3:.3f}", flush=True)
    return rc or 0


# ---------------------------------------------------------------- FLOPs
def flops_per_sample(model_name: str) -> float:
    """FLOPs of one forward + backward (CLIP loss included) per sample, counted by torch.utils.flop_counter on CPU
    (batch 2; matmul/conv/attention FLOPs, as MFU conventionally counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipkit.losses import ContrastiveLoss
    from clipkit.models import create_model

    net, cfg, _, _, tokenizer = create_model(model_name)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    batch = 2
    images = torch.randn(batch, 3, size, size)
    texts = tokenizer(["a red circle"] * batch)
    loss_fn = ContrastiveLoss()
    with FlopCounterMode(display=False) as counter:
        out = net(images, texts)
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return counter.get_total_flops() / batch


def summarize(runs: dict, peers: list[str], batch: int, flops: float | None, peak_tflops: float) -> dict:
    """Per side: the median round's numbers, all rounds' samples/s, and step times of all rounds pooled (on a
    machine shared with other jobs the fastest tenth of the steps is the closest to undisturbed speed, the median
    the typical one); then ours / peer ratios of each rate."""
    summary = {}
    for name, rs in runs.items():
        if not rs:
            continue
        s = dict(sorted(rs, key=lambda x: x["samples_per_s"])[len(rs) // 2], rounds=[x["samples_per_s"] for x in rs])
        pooled = sorted(t for x in rs for t in x["step_times"])
        s["pooled_median_samples_per_s"] = batch / statistics.median(pooled)
        s["pooled_p10_samples_per_s"] = batch / pooled[len(pooled) // 10]
        del s["step_times"]
        if flops:
            s["tflops"] = s["samples_per_s"] * flops / 1e12
            s["mfu"] = s["tflops"] / peak_tflops
        summary[name] = s
    for p in peers:
        for name in [n for n in summary if n.startswith("ours")]:
            if f"open_clip_{p}" in summary:
                summary[f"ratio_{name}_vs_{p}"] = {k: summary[name][k] / summary[f"open_clip_{p}"][k]
                                                   for k in RATE_KEYS}
    return summary


def markdown_table(summary: dict) -> str:
    rows = ["| run | samples/s: median round (all rounds) | pooled steps: median, fastest 10% | data wait | "
            "whole-run CPU s | peak GPU mem GB | MFU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        if name.startswith("ratio"):
            rows.append(f"| {name} | {s['samples_per_s']:.2f}x | {s['pooled_median_samples_per_s']:.2f}x, "
                        f"{s['pooled_p10_samples_per_s']:.2f}x | | | | |")
            continue
        mem = f"{s['peak_mem_gb']:.2f}" if "peak_mem_gb" in s else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-"
        rounds = ", ".join(f"{x:.0f}" for x in s["rounds"])
        pooled = f"{s['pooled_median_samples_per_s']:.1f}, {s['pooled_p10_samples_per_s']:.1f}"
        rows.append(f"| {name} | {s['samples_per_s']:.1f} ({rounds}) | {pooled} | {100 * s['data_frac']:.0f}% | "
                    f"{s['cpu_s']:.0f} | {mem} | {mfu} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="clipkit-tiny")
    p.add_argument("--image-size", type=int, default=64, help="size of the synthetic shard images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of samples/s")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="ours")
    p.add_argument("--peer-precision", default="fp32",
                   help="open_clip_train --precision; several joined with ',' run one after the other")
    p.add_argument("--accelerate-config", default=None,
                   help="run ours under `accelerate launch --num_processes 1` with this config (default: plain python)")
    p.add_argument("--ours-launch", default="python",
                   help=f"how ours starts, several joined with ',': {', '.join(LAUNCHES)}; LAUNCH:FLAG adds "
                   "train/main.py's --FLAG to one of them (see run_ours)")
    p.add_argument("--ours-flag", action="append", default=[], help="one more train/main.py argument (repeatable)")
    p.add_argument("--python", default=sys.executable, help="python for ours")
    p.add_argument("--peer-python", default=str(PEER_PYTHON), help="python with open_clip_torch[training] 3.3")
    p.add_argument("--ours-env", action="append", default=[], help="KEY=VALUE for ours (repeatable)")
    p.add_argument("--peer-env", action="append", default=[], help="KEY=VALUE for the peer (repeatable)")
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/peer this many times; median reported")
    p.add_argument("--shards", default=None, help="existing shard spec (skip generation)")
    p.add_argument("--num-shards", type=int, default=None, help="default: 4 x workers")
    p.add_argument("--gen-procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work-dir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--flops", action="store_true", help="report FLOPs/sample and MFU (on by default on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100/H200 bf16: ~989)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--calibration", default=None,
                   help="write ours' samples/s (median round) into this planner calibration file (clipkit.plan)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="clipkit_tput_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"config": {k: v for k, v in vars(a).items() if k not in ("ours_env", "peer_env")}}
    try:
        spec = a.shards
        if spec is None:
            # every worker needs full batches to the end in epoch mode (ours drops a worker's last partial batch)
            n = (a.steps + 2 * max(a.workers, 1) + 2) * a.batch_size
            t0 = time.perf_counter()
            spec = make_shards(work / "shards", n, a.num_shards or 4 * max(a.workers, 1), a.image_size, a.gen_procs)
            result["shards"] = {"spec": spec, "samples": n, "gen_s": time.perf_counter() - t0}
            print(f"shards: {n} samples at {a.image_size} px in {result['shards']['gen_s']:.1f} s", flush=True)
        import torch

        cuda = torch.cuda.is_available()
        if a.flops or cuda:
            result["flops_per_sample"] = flops_per_sample(a.model)
        launches = [x for x in a.ours_launch.split(",") if x]
        unknown = sorted({x.partition(":")[0] for x in launches} - set(LAUNCHES))
        if unknown:
            raise SystemExit(f"error: --ours-launch {unknown}: not one of {', '.join(LAUNCHES)}")
        ours = {x: "ours" if launches == ["python"] else f"ours_{x.replace(':', '_')}" for x in launches}
        runs = {name: [] for name in ours.values()}
        peers = [p for p in a.peer_precision.split(",") if p]
        for p in peers:
            runs[f"open_clip_{p}"] = []
        for r in range(a.rounds):
            order = [*launches, *peers] if r % 2 == 0 else [*peers, *launches[::-1]]
            for who in order:
                name = ours[who] if who in ours else f"open_clip_{who}"
                try:
                    if who in ours:
                        res = run_ours(a, spec, work, str(r), who)
                    else:
                        res = run_peer(a, spec, work, f"{who}-{r}", who)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:  # report the others anyway
                    result.setdefault("errors", []).append(f"round {r} {name}: {e}")
                    print(f"round {r} {name} FAILED: {e}", flush=True)
                    continue
                runs[name].append(res)
                print(f"round {r} {name}: {res['samples_per_s']:.1f} samples/s "
                      f"({res['steps_counted']} steps counted; whole run: wall {res['wall_s']:.0f} s, "
                      f"CPU {res['cpu_s']:.0f} s)", flush=True)
        result["runs"] = runs
        result["summary"] = summarize(runs, peers, a.batch_size, result.get("flops_per_sample"), a.peak_tflops)
        print(json.dumps(result, indent=1), flush=True)
        print(markdown_table(result["summary"]), flush=True)
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(result, indent=1))
        first = next((n for n in result["summary"] if n.startswith("ours")), None)
        if a.calibration and first:
            from clipkit.plan.calibration import train_section, write_section

            ours = result["summary"][first]
            write_section(a.calibration, *train_section(a.model, a.batch_size, a.precision, ours["samples_per_s"],
                                                        peak_mem_gb=ours.get("peak_mem_gb")))
            print(f"wrote the training run into {a.calibration}", flush=True)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer-main":
        sys.exit(peer_main(sys.argv[2:]))
    sys.exit(main())
