"""How many CPU threads each training process uses.

`accelerate launch` (and torchrun) export OMP_NUM_THREADS=1 to every process unless the user set it: on a CPU node
each process then runs torch on one core however many it has (measured: 106 vs 164 samples/s against open_clip_train
launched with plain python on 2 cores, issue 10). clipkit therefore picks the intra-op thread count itself unless the
user chose one: `--threads N` first, then an OMP_NUM_THREADS the user exported (seen in the launcher's own starting
environment when a launcher started us), else the node's physical cores (within this process's CPU affinity) divided
by the processes on this node. Loader workers run with one intra-op thread each (set in their worker_init_fn): they
transform one image at a time, and more threads there would only compete with the training processes.
"""

from __future__ import annotations

import os
from typing import Mapping, Tuple


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, less hyper-thread siblings."""
    try:
        logical_allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical_allowed = os.cpu_count() or 1
    try:
        import psutil

        logical, physical = psutil.cpu_count(logical=True) or 1, psutil.cpu_count(logical=False) or 1
    except ImportError:
        logical = physical = os.cpu_count() or 1
    per_core = max(1, logical // max(physical, 1))
    return max(1, logical_allowed // per_core)


def _launcher_environ() -> Mapping[str, str] | None:
    """The environment our parent (the launcher) was started with, or None if it cannot be read."""
    try:
        raw = open(f"/proc/{os.getppid()}/environ", "rb").read()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def choose_threads(requested: int | None, env: Mapping[str, str] | None = None,
                   launcher_env: Mapping[str, str] | None = None, cores: int | None = None) -> Tuple[int, str]:
    """(threads, why) for one training process. `env`: this process's environment (default os.environ);
    `launcher_env`: the launcher's starting environment (default read from /proc; None = unknown)."""
    env = os.environ if env is None else env
    if requested:
        return requested, "--threads"
    # torchrun sets LOCAL_RANK; accelerate's single-process launcher sets only its ACCELERATE_* variables
    launched = "LOCAL_RANK" in env or any(k.startswith("ACCELERATE_") for k in env)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        if not launched:
            return int(omp), "OMP_NUM_THREADS"
        parent = _launcher_environ() if launcher_env is None else launcher_env
        if parent is not None and "OMP_NUM_THREADS" in parent:
            return int(omp), "OMP_NUM_THREADS (set by you, passed on by the launcher)"
        if parent is None and omp != "1":
            return int(omp), "OMP_NUM_THREADS"
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = cores or physical_cores()
    return max(1, cores // local), f"{cores} physical cores / {local} process(es) on this node"


def apply_threads(requested: int | None) -> str:
    """Sets torch's intra-op threads (and OMP_NUM_THREADS for child processes); returns a line for the log."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return f"using {n} intra-op thread(s) per process ({why})"
