"""Helpers for tests that run train/main.py in subprocesses (plain python, or accelerate launch with N processes)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

from tests import _zygote as zygote

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")
ACCEL = REPO / "train" / "accelerate"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a launcher's rendezvous or a test server.

    Drawn below the kernel's ephemeral range (32768-60999), from a block of its own per pytest-xdist worker: an
    ephemeral port handed out by `bind(0)` can be taken again, between this call and the launcher's bind, by another
    worker's test or by a connection's source port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (index % 12) * 1000
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, low + 1000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {low + 1000})")


def env(extra: Dict[str, str] | None = None) -> Dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.update(extra or {})
    return e


def run_train(args: List[str], nproc: int = 0, config: str = "cpu_zero2.yaml", extra_env=None, check=True,
              launcher_args: List[str] | None = None, timeout: int = 600,
              report: bool = False, fresh: bool = False) -> subprocess.CompletedProcess:
    """nproc=0: `python train/main.py` (a child of the preloaded forkserver of tests/_zygote.py unless `fresh`);
    nproc>=1: `accelerate launch --config_file CONFIG --num_processes N`.
    The run report is left out unless `report` (its own tests ask for it; it costs ~1.5 s a run)."""
    quiet = ["--no-progress", "--no-tensorboard"] + ([] if report else ["--no-report"])
    if nproc:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port())]
        cmd += (launcher_args or []) + [MAIN]
    elif zygote.enabled() and not fresh:
        done = zygote.run_script([MAIN] + quiet + args, env(extra_env), str(REPO), timeout)
        if done.timed_out:
            raise subprocess.TimeoutExpired([MAIN] + args, timeout, done.stdout, done.stderr)
        proc = subprocess.CompletedProcess([MAIN] + quiet + args, done.returncode, done.stdout, done.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc
    else:
        cmd = [sys.executable, MAIN]
    proc = subprocess.run(cmd + quiet + args, env=env(extra_env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir) -> Dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "final" / "open_clip_model.safetensors"))


def assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= atol, f"final weights differ by {worst}"


def assert_same_losses_without(tmp_path, flag: str, log_line: str, off_log_line: str | None = None,
                               steps: int = 6) -> None:
    """A short clipkit-tiny run (2 shards of 32 at 32 px, batch 16, lr 1e-3) with a default speed-up and one with
    `flag` turning it off: the log says `log_line` only in the first (and `off_log_line`, if given, in the second),
    and the losses of every step agree to 1e-5."""
    from clipkit.synthetic import write_train_shards

    d = tmp_path / "shards"
    paths = write_train_shards(d, n=2 * 32, per_shard=32, seed=0, size=32)
    shards = f"{d}/{{00000..{len(paths) - 1:05d}}}.tar"
    runs = {}
    for name, extra in (("on", []), ("off", [flag])):
        out = tmp_path / name
        proc = run_train(["--model", "clipkit-tiny", "--train-data", shards, "--batch-size", "16", "--steps",
                          str(steps), "--lr", "1e-3", "--warmup", "2", "--output-dir", str(out), *extra])
        runs[name] = losses(out)
        log = proc.stdout + proc.stderr
        assert (log_line in log) == (name == "on"), name
        if name == "off" and off_log_line is not None:
            assert off_log_line in log
    assert sorted(runs["on"]) == list(range(1, steps + 1))
    for step, value in runs["off"].items():
        assert abs(runs["on"][step] - value) <= 1e-5 * max(1.0, abs(value)), (step, runs["on"][step], value)
