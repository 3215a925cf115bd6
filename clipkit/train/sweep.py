"""Scaling-law sweeps: a grid of model configs x samples seen (x learning rates), each an ordinary `train/main.py`
run in its own output dir, then zero-shot (and retrieval, when the eval set has captions) on one fixed eval set;
error = 1 - zero-shot top-1 against compute = training GMACs per sample x samples seen, fitted on the Pareto frontier
(clipkit/train/scaling.py).

    python train/sweep.py --config sweep.yaml                  # one run at a time, here
    python train/sweep.py --config sweep.yaml --launcher ray   # Ray tasks on a cluster (--ray-address)
    python train/sweep.py --config sweep.yaml --launcher slurm # SLURM jobs through submitit

Every run trains with `--resume auto` and leaves `sweep_run.json` (its settings' fingerprint + metrics) when done, so
a killed sweep resumes its unfinished runs and a rerun skips the finished ones. Output: OUTPUT_DIR/sweep.json and
OUTPUT_DIR/scaling.png.
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

import yaml

LAUNCHERS = ("local", "ray", "slurm")
RUN_RESULT = "sweep_run.json"
DEFAULT_TRAIN_SCRIPT = str(Path(__file__).resolve().parents[2] / "train" / "main.py")


class SweepError(ValueError):
    """A bad sweep config: raised before any run starts."""


@dataclass
class SweepConfig:
    train_data: str  # WebDataset shard spec, as train/main.py's --train-data
    eval_data: str  # eval dataset spec (eval/zeroshot.py's --dataset): labelled, optionally with captions
    models: List[str]  # model configs: registered names or JSON paths
    samples: List[int]  # samples seen per run (steps = ceil(samples / global batch))
    batch_size: int  # per process, as train/main.py's --batch-size
    output_dir: str  # runs go to OUTPUT_DIR/runs/NAME; sweep.json and scaling.png to OUTPUT_DIR
    lrs: List[float] | None = None  # learning rates to sweep (default: train/main.py's --lr default)
    warmup_fraction: float = 0.1  # --warmup = this fraction of each run's steps (unless train: sets warmup)
    train: Dict[str, Any] = field(default_factory=dict)  # any other train/main.py flag: {flag_name: value}
    eval: Dict[str, Any] = field(default_factory=dict)  # templates (simple), max_samples, batch_size, workers
    processes: int = 1  # training processes per run (with a `launch` prefix such as accelerate launch)
    launch: List[str] = field(default_factory=list)  # command prefix before the train script (default: python)
    train_script: str = DEFAULT_TRAIN_SCRIPT
    device: str = "auto"  # eval device: auto (cuda when available) | cpu | cuda
    launcher: str = "local"  # local | ray | slurm
    ray: Dict[str, Any] = field(default_factory=dict)  # address, num_cpus (per run), num_gpus (per run)
    slurm: Dict[str, Any] = field(default_factory=dict)  # submitit parameters (timeout_min, slurm_partition, ...),
    #   and `cluster`: slurm (default) | local | debug (submitit's executors that run here, for tests)
    bins: int | None = None  # frontier bins over log10(compute) (default: one per distinct compute, <= 10)
    bootstrap: int = 1000  # bootstrap resamples for the fit's intervals
    seed: int = 0  # bootstrap seed

    def validate(self) -> "SweepConfig":
        if not self.models or not self.samples:
            raise SweepError("models and samples must be non-empty lists")
        if any(int(s) < 1 for s in self.samples) or self.batch_size < 1 or self.processes < 1:
            raise SweepError("samples, batch_size and processes must be positive")
        if self.launcher not in LAUNCHERS:
            raise SweepError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        reserved = {"model", "train_data", "batch_size", "steps", "lr", "output_dir", "resume"}
        clash = sorted(reserved & {k.replace("-", "_") for k in self.train})
        if clash:
            raise SweepError(f"train: {clash} are set by the sweep itself (models, samples, batch_size, lrs, "
                             "output_dir): drop them from train:")
        if not Path(self.train_script).is_file():
            raise SweepError(f"train_script {self.train_script}: no such file")
        return self


def load_sweep_config(path: str, **overrides: Any) -> SweepConfig:
    """Reads a sweep YAML (yaml.safe_load); `overrides` (None values ignored) win over the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise SweepError(f"{path}: {e.strerror}") from e
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown} (known: {sorted(names)})")
    missing = sorted(f.name for f in dataclasses.fields(SweepConfig)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                     and f.name not in data)
    if missing:
        raise SweepError(f"{path}: missing keys {missing}")
    for key in ("models", "samples"):
        if not isinstance(data[key], list):
            data[key] = [data[key]]
    if data.get("lrs") is not None and not isinstance(data["lrs"], list):
        data["lrs"] = [data["lrs"]]
    try:  # YAML 1.1 reads 2e-3 (no dot) as a string
        data["samples"] = [int(float(s)) for s in data["samples"]]
        if data.get("lrs") is not None:
            data["lrs"] = [float(v) for v in data["lrs"]]
        data["batch_size"] = int(data["batch_size"])
    except (TypeError, ValueError) as e:
        raise SweepError(f"{path}: samples, lrs and batch_size must be numbers ({e})") from e
    return SweepConfig(**data).validate()


@dataclass
class RunSpec:
    """One run of the grid; everything a worker (local, Ray task or SLURM job) needs."""

    name: str
    model: str
    samples: int  # samples asked for
    lr: float | None
    steps: int
    samples_seen: int  # steps x batch size x processes
    output_dir: str
    command: List[str]  # the training command
    eval_data: str
    eval: Dict[str, Any]
    device: str
    gmacs_per_sample: float  # training GMACs per sample (3 x one forward)

    @property
    def fingerprint(self) -> str:
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "gmacs_per_sample")}
        settings["command"] = settings["command"][1:]  # the interpreter's path may differ between machines
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_stem(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def _flag(name: str, value: Any) -> List[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if value is None:
        return []
    return [flag, str(value)]


def plan_runs(cfg: SweepConfig, gmacs: Dict[str, float]) -> List[RunSpec]:
    """The grid, in order models x samples x lrs."""
    lrs: List[float | None] = list(cfg.lrs) if cfg.lrs else [None]
    prefix = list(cfg.launch) or [sys.executable]
    global_batch = cfg.batch_size * cfg.processes
    train_extra = {k.replace("-", "_"): v for k, v in cfg.train.items()}
    runs = []
    for model in cfg.models:
        for samples in cfg.samples:
            for lr in lrs:
                steps = max(1, math.ceil(int(samples) / global_batch))
                name = f"{_model_stem(model)}-s{int(samples)}" + (f"-lr{lr:g}" if len(lrs) > 1 else "")
                out = os.path.join(cfg.output_dir, "runs", name)
                extra = dict(train_extra)
                extra.setdefault("warmup", int(round(cfg.warmup_fraction * steps)))
                command = prefix + [cfg.train_script, "--model", model, "--train-data", cfg.train_data,
                                    "--batch-size", str(cfg.batch_size), "--steps", str(steps), "--output-dir", out,
                                    "--resume", "auto"]
                if lr is not None:
                    command += ["--lr", f"{lr:g}"]
                for key, value in extra.items():
                    command += _flag(key, value)
                runs.append(RunSpec(name, model, int(samples), lr, steps, steps * global_batch, out, command,
                                    cfg.eval_data, dict(cfg.eval), cfg.device, gmacs[model]))
    return runs


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run_dir: str, eval_data: str, settings: Dict[str, Any], device: str) -> Dict[str, Any]:
    """Zero-shot (and, when the eval set has captions, retrieval) metrics of a finished run's final/ export."""
    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.models import load_model
    from clipkit.eval.retrieval import run_retrieval
    from clipkit.eval.zeroshot import run_zeroshot

    device = _device(device)
    loaded = load_model(run_dir, device=device)
    dataset = build_dataset(eval_data, settings.get("classnames"))
    common = dict(batch_size=int(settings.get("batch_size", 256)), workers=int(settings.get("workers", 0)),
                  device=device, max_samples=settings.get("max_samples"), progress=False)
    zs = run_zeroshot(loaded.model, loaded.tokenizer, loaded.preprocess, dataset,
                      settings.get("templates", "simple"), **common)
    out = {"acc1": float(zs["acc1"]), "n": int(zs["n"]), "error": 1.0 - float(zs["acc1"])}
    if "acc5" in zs:
        out["acc5"] = float(zs["acc5"])
    if dataset.has_captions:
        ret = run_retrieval(loaded.model, loaded.tokenizer, loaded.preprocess, dataset, **common)
        out["retrieval"] = {k: v for k, v in ret.items() if "recall" in k}
    return out


def run_one(spec: RunSpec) -> Dict[str, Any]:
    """Trains (resuming a killed attempt) and evaluates one run; a run whose `sweep_run.json` carries the same
    fingerprint is returned as it is. Never raises for a failed run: the result says `status: failed` and why."""
    out = Path(spec.output_dir)
    result_path = out / RUN_RESULT
    if result_path.is_file():
        try:
            done = json.loads(result_path.read_text())
        except ValueError:
            done = {}
        if done.get("fingerprint") == spec.fingerprint and done.get("status") == "ok":
            return {**done, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    base = {"name": spec.name, "model": spec.model, "samples": spec.samples, "samples_seen": spec.samples_seen,
            "lr": spec.lr, "steps": spec.steps, "gmacs_per_sample": spec.gmacs_per_sample,
            "compute": spec.gmacs_per_sample * spec.samples_seen, "fingerprint": spec.fingerprint,
            "output_dir": spec.output_dir}
    start = time.monotonic()
    with open(out / "train.log", "ab") as log:
        proc = subprocess.run(spec.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    train_s = time.monotonic() - start
    if proc.returncode != 0:
        return {**base, "status": "failed", "reason": f"training exited with {proc.returncode}: see "
                                                       f"{out / 'train.log'}", "train_s": round(train_s, 1)}
    try:
        metrics = evaluate_run(spec.output_dir, spec.eval_data, spec.eval, spec.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return {**base, "status": "failed", "reason": f"evaluation: {e}", "train_s": round(train_s, 1)}
    result = {**base, "status": "ok", **metrics, "train_s": round(train_s, 1),
              "eval_s": round(time.monotonic() - start - train_s, 1)}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, result_path)
    return result


OnResult = Callable[[Dict[str, Any]], None]


def compute_optimal(results: List[Dict[str, Any]], frontier_names: List[str]) -> List[Dict[str, Any]]:
    """The compute-optimal model per compute budget: the runs on the frontier, in increasing compute."""
    by_name = {r["name"]: r for r in results}
    return [{k: by_name[n][k] for k in ("compute", "model", "samples_seen", "error", "name")} for n in frontier_names]


def summarise(cfg: SweepConfig, results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """sweep.json's content: every run, the frontier fit with bootstrap intervals, the compute-optimal models."""
    from clipkit.train.scaling import Point, scaling_fit

    ok = [r for r in results if r.get("status") == "ok"]
    points = [Point(r["compute"], r["error"], r["name"]) for r in ok]
    fit = scaling_fit(points, cfg.bins, cfg.bootstrap, cfg.seed) if points else {"frontier": [], "error": "no runs"}
    return {
        "runs": results,
        "fit": fit,
        "compute_optimal": compute_optimal(ok, fit.get("frontier", [])),
        "failed": [r["name"] for r in results if r.get("status") != "ok"],
        "config": dataclasses.asdict(cfg),
    }


def run_sweep(cfg: SweepConfig, log=None) -> Dict[str, Any]:
    """Runs the grid with cfg.launcher, then writes OUTPUT_DIR/sweep.json and OUTPUT_DIR/scaling.png."""
    from clipkit.train.compute import compute_table
    from clipkit.train.scaling import Point, plot_scaling
    from clipkit.train.sweep_launchers import LAUNCH

    log = log or sys.stdout
    cfg.validate()
    os.makedirs(cfg.output_dir, exist_ok=True)
    runs = plan_runs(cfg, compute_table(cfg.models))
    results: Dict[str, Dict[str, Any]] = {}

    def on_result(result: Dict[str, Any]) -> None:
        results[result["name"]] = result
        if result.get("status") == "ok":
            how = "already done" if result.get("skipped") else f"{result.get('train_s', 0):.0f} s"
            print(f"[{len(results)}/{len(runs)}] {result['name']}: top-1 {result['acc1']:.4f}, "
                  f"compute {result['compute']:.4g} GMACs ({how})", file=log, flush=True)
        else:
            print(f"[{len(results)}/{len(runs)}] {result['name']}: FAILED: {result.get('reason')}", file=log,
                  flush=True)

    LAUNCH[cfg.launcher](runs, cfg, on_result)
    ordered = [results[r.name] for r in runs if r.name in results]
    summary = summarise(cfg, ordered)
    path = os.path.join(cfg.output_dir, "sweep.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    ok = [r for r in ordered if r.get("status") == "ok"]
    if ok:
        points = [Point(r["compute"], r["error"], r["name"]) for r in ok]
        plot_scaling(points, [_model_stem(r["model"]) for r in ok], summary["fit"],
                     os.path.join(cfg.output_dir, "scaling.png"), title=f"zero-shot error on {cfg.eval_data}")
    fit = summary["fit"]
    if "alpha" in fit:
        lo, hi = fit["alpha_interval"] or (float("nan"), float("nan"))
        print(f"fit on {len(fit['frontier'])} frontier runs: error = {fit['beta']:.4g} * C^{fit['alpha']:.4f} "
              f"(alpha {lo:.4f}..{hi:.4f}); at 10x compute {fit['extrapolated']['10x']['error']:.4f}, "
              f"at 100x {fit['extrapolated']['100x']['error']:.4f}", file=log)
    else:
        print(f"no fit: {fit.get('error')}", file=log)
    print(f"wrote {path} and {os.path.join(cfg.output_dir, 'scaling.png')}", file=log)
    return summary
