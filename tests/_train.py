"""Helpers for tests that run train/main.py in subprocesses (plain python, or accelerate launch with N processes)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "train" / "main.py")
ACCEL = REPO / "train" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra: Dict[str, str] | None = None) -> Dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.update(extra or {})
    return e


def run_train(args: List[str], nproc: int = 0, config: str = "cpu_zero2.yaml", extra_env=None, check=True,
              launcher_args: List[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """nproc=0: `python train/main.py`; nproc>=1: `accelerate launch --config_file CONFIG --num_processes N`."""
    if nproc:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port())]
        cmd += (launcher_args or []) + [MAIN]
    else:
        cmd = [sys.executable, MAIN]
    proc = subprocess.run(cmd + ["--no-progress", "--no-tensorboard"] + args, env=env(extra_env), cwd=REPO,
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
