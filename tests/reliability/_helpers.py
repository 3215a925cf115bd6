"""Helpers of the reliability suite: launches that reap their whole process tree, recorded batches, checkpoint
tensors, and the shared tiny training setup (2 processes x batch 8 over 4 shards of 16: 4 steps per epoch)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from tests import _zygote as zygote
from tests._train import ACCEL, MAIN, REPO, env, free_port

STEPS = 8  # two epochs of 4 steps at 2 processes x batch 8 over 64 samples


def train_args(shards: str, out: Path, steps: int = STEPS, extra=()) -> List[str]:
    return ["--model", "clipkit-tiny", "--train-data", shards, "--batch-size", "8", "--steps", str(steps),
            "--lr", "1e-3", "--warmup", "2", "--shuffle-buffer", "16", "--workers", "1", "--output-dir", str(out),
            "--no-progress", "--no-tensorboard", *extra]


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    leftovers: List[str]  # processes of the launch's session still alive after it exited (and a grace period)

    def explain(self) -> str:
        return f"rc={self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}"


def session_processes(sid: int) -> List[Tuple[int, str]]:
    """(pid, command) of every live process in session `sid` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append((int(entry), cmd[:200]))
    return found


def launch(cmd: List[str], extra_env: Dict[str, str] | None = None, timeout: int = 600, grace: float = 30.0) -> Launch:
    """Runs `cmd` in a new session, waits for it, then for its whole session to be gone (up to `grace` s).

    Whatever is still alive after that is recorded in `leftovers` and then killed, so a failing test leaves nothing
    running either."""
    proc = subprocess.Popen(cmd, env=env(extra_env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[reliability suite: killed after {timeout}s]"
    return Launch(proc.returncode, out, err, _reap_session(proc.pid, grace))


def _reap_session(sid: int, grace: float) -> List[str]:
    """Waits up to `grace` s for session `sid` to be empty; kills and returns ("pid: command") what is left."""
    deadline = time.monotonic() + grace
    alive = session_processes(sid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = session_processes(sid)
    leftovers = [f"{pid}: {cmd}" for pid, cmd in alive]
    for pid, _ in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def launch_train(args: List[str], nproc: int = 0, extra_env: Dict[str, str] | None = None,
                 config: str = "cpu_zero2.yaml", timeout: int = 600, fresh: bool = False) -> Launch:
    """`accelerate launch` with `nproc` processes (ZeRO-2 by default), or plain `python train/main.py` for 0; no run
    report (tests/test_report.py covers it; it costs ~1.5 s a run)."""
    args = [*args, "--no-report"]
    if nproc:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), MAIN]
    elif zygote.enabled() and not fresh:  # a forked child of the preloaded forkserver, in a session of its own
        done = zygote.run_script([MAIN, *args], env(extra_env), str(REPO), timeout, new_session=True)
        err = done.stderr + (f"\n[reliability suite: killed after {timeout}s]" if done.timed_out else "")
        return Launch(done.returncode, done.stdout, err, _reap_session(done.pid, 30.0))
    else:
        cmd = [sys.executable, MAIN]
    return launch(cmd + args, extra_env, timeout)


def recorded_batches(run_dir: Path) -> Dict[Tuple[int, int], dict]:
    """(step, rank) -> the record of CLIPKIT_TEST_RECORD_BATCHES; a step trained again after a resume replaces the
    record of the interrupted run (as metrics.jsonl does)."""
    records = {}
    for path in sorted(Path(run_dir).glob("batches_rank*.jsonl")):
        rank = int(path.stem[len("batches_rank"):])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            records[(rec["step"], rank)] = rec
    return records


def keys_by_epoch(records: Dict[Tuple[int, int], dict]) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for (_, _), rec in sorted(records.items()):
        out.setdefault(rec["epoch"], []).extend(rec["keys"])
    return out


def assert_losses_equal(got: Dict[int, float], want: Dict[int, float], rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= rel * max(1.0, abs(want[step])), (step, got[step], want[step])


def complete_checkpoints(run_dir: Path) -> List[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if (p / "COMPLETE").is_file()) if root.is_dir() else []


def all_checkpoint_dirs(run_dir: Path) -> List[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _tensors(obj, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def checkpoint_tensors(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor in a checkpoint's torch files (model, ZeRO optimizer partitions of every rank, scheduler),
    loaded weights-only with the same allowlist the trainer uses; RNG states are left out."""
    from clipkit.train.checkpoint import _safe_globals

    found = {}
    with torch.serialization.safe_globals(_safe_globals()):
        for f in sorted(Path(ckpt_dir).rglob("*")):
            if f.suffix in (".pt", ".bin") and f.is_file():
                data = torch.load(f, map_location="cpu", weights_only=True)
                for name, t in _tensors(data):
                    found[f"{f.relative_to(ckpt_dir)}{name}"] = t
    return found


def write_tar(path: Path, members: List[Tuple[str, bytes]]) -> Path:
    """A tar of regular files (GNU format, mtime 0) in the given order."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return Path(path)
