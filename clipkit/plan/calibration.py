"""The calibration file: what the planner knows about clipkit's own costs, measured by the bench/ scripts.

One JSON object, a section per measurement, each written by one script with `--calibration FILE`, together with the
exact command, the time, the machine (CPU count, torch version) and its load average:

- `zero_transient` (bench/plan_memory.py): per precision and ZeRO stage, the bytes per parameter a DeepSpeed step
  needs beyond the model states (gradients, reduce buckets, fp32 gradient partitions, gathered parameters).
- `cpu_train` (bench/train_throughput.py): samples/s of train/main.py on CPU with the FLOPs per sample, giving the
  FLOP/s one core sustains in clipkit's training step; `gpu_train` the same on a GPU, giving MFU.
- `shards` (bench/shards.py): data_prep's images/s, CPU seconds per image and bytes per sample.
- `loss_memory` (bench/loss_memory.py): measured extra peak memory of the loss, as a cross-check of the counted one.

The committed file is clipkit/plan/calibration.json (BENCHMARKS.md "Planner calibration" lists the commands).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict

DEFAULT_PATH = Path(__file__).with_name("calibration.json")


def load_calibration(path: str | os.PathLike | None = None) -> Dict[str, Any]:
    """The calibration file (default: the one shipped with clipkit); a missing default is an empty calibration."""
    p = Path(path) if path else DEFAULT_PATH
    if not p.is_file():
        if path:
            raise FileNotFoundError(f"--calibration {path}: no such file (bench scripts write it with --calibration)")
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object of calibration sections")
    return data


def machine() -> Dict[str, Any]:
    """Where a measurement ran: CPU count, load average, python and torch versions."""
    import torch

    info: Dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                            "torch": torch.__version__}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_section(path: str | os.PathLike, section: str, data: Dict[str, Any], argv=None) -> None:
    """Sets `section` of the calibration file at `path` (other sections kept), with the command that measured it."""
    p = Path(path)
    current = load_calibration(p) if p.is_file() else {}
    argv = list(sys.argv if argv is None else argv)
    current[section] = {**data, "command": "python " + " ".join(shlex.quote(a) for a in argv),
                        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def train_section(model: str, batch_size: int, precision: str, samples_per_s: float, processes: int = 1,
                  peak_mem_gb: float | None = None) -> tuple:
    """(section name, data) for a measured training run: FLOPs per sample as the planner counts them (towers + loss
    at this batch), and from them FLOP/s per core (CPU: `cpu_train`) or MFU (GPU: `gpu_train`)."""
    import torch

    from clipkit.plan.flops import step_flops
    from clipkit.plan.model import profile_model

    local = batch_size // processes
    flops = step_flops(profile_model(model, precision), local, processes)["model"] / local
    run = {"model": model, "batch_size": batch_size, "processes": processes, "precision": precision,
           "samples_per_s": samples_per_s, "flops_per_sample": flops}
    if not torch.cuda.is_available():
        cores = os.cpu_count() or 1
        return "cpu_train", {**run, "cores": cores, "flops_per_s_per_core": samples_per_s * flops / cores}
    from clipkit.flops import peak_tflops

    peak = peak_tflops(torch.device("cuda"), precision)
    run.update(gpu=torch.cuda.get_device_name(), peak_tflops=peak, peak_mem_gb=peak_mem_gb,
               mfu=samples_per_s / processes * flops / (peak * 1e12) if peak else None)
    return "gpu_train", {"runs": [run]}
