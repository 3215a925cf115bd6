"""Run a function on two gloo ranks (127.0.0.1, torch.multiprocessing spawn) and collect what each rank returns.

The function must be importable by the spawned processes (a module-level function of a test module) and return a
dict of tensors (saved with torch.save, read back with weights_only=True).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from tests._train import free_port

WORLD = 2


def _entry(rank: int, fn: Callable, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears the group down: a rank whose peer had already closed its gloo pairs
        # could abort in destroy_process_group ("terminate called without an active exception"), seen under load.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def run_on_two_ranks(fn: Callable, out_dir: Path, *args) -> list[dict]:
    """[fn(0, *args), fn(1, *args)], each computed in its own process of a 2-rank gloo group."""
    mp.spawn(_entry, args=(fn, free_port(), str(out_dir), args), nprocs=WORLD, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
