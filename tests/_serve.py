"""Helpers for the index and service tests: a random-weight model export, an index over test shards, and the real
service started as `python serve/app.py` on 127.0.0.1 on a free port (stopped, and waited for, on exit)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import requests
import torch

from tests._train import REPO, env, free_port


def export_random_model(out_dir: Path, seed: int = 0, name: str = "clipkit-tiny") -> Path:
    """An open_clip export (final/-style dir) of `name` with seeded random weights: correctness tests need no
    trained model."""
    from clipkit.models import create_model, export_open_clip, preprocess_cfg_of

    torch.manual_seed(seed)
    net, cfg, _, _, _ = create_model(name)
    return export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), Path(out_dir))


def build_index(out_dir: Path, model_dir: Path, shard_spec: str, extra_build: List[str] = (),
                batch_size: int = 16) -> Path:
    """index/embed.py + index/build.py in this process (workers=0)."""
    from clipkit.index.cli import build_main, embed_main

    embed_main(["--model", str(model_dir), "--data", shard_spec, "--output", str(out_dir), "--workers", "0",
                "--batch-size", str(batch_size), "--no-progress"])
    build_main([str(out_dir), *extra_build])
    return out_dir


class Server:
    """`python serve/app.py ARGS --port P` as a subprocess; `url` once /health answers."""

    def __init__(self, args: List[str], timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"clipkit-serve-{self.port}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve" / "app.py"), *args, "--port", str(self.port)],
                                     cwd=REPO, env=env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                self.stop()
                raise AssertionError(f"server did not answer /health within {timeout} s:\n{self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_serve(args: List[str], timeout: float = 180.0) -> subprocess.CompletedProcess:
    """serve/app.py run to completion (for start-up refusals)."""
    return subprocess.run([sys.executable, str(REPO / "serve" / "app.py"), *args, "--port", str(free_port())],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
