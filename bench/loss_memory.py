"""Peak memory and time of the contrastive loss, forward + backward: clipkit's chunked InfoNCE vs open_clip's ClipLoss.

    python bench/loss_memory.py                       # B = 4096, 8192, 16384; D = 512; float32 CPU
    python bench/loss_memory.py --sizes 4096 --chunk-sizes 0,512,1024,2048   # a K sweep (0 = clipkit unchunked)
    python bench/loss_memory.py --sizes 1024 --repeats 1                     # smoke run, seconds
    python bench/loss_memory.py --device cuda --dtype bfloat16 --sizes 16384,65536 --chunk-sizes 1024,8192
    python bench/loss_memory.py --sizes 1024 --queue 65536 --chunk-sizes 0,1024   # MoCo/ALBEF queue, issue 11

--queue K adds an image queue and a text queue of K features each (constants, part of the baseline memory) as extra
columns: B rows against B + K columns per direction. open_clip has no queue, so the reference is then the way MoCo
and ALBEF compute it: plain PyTorch cross-entropy over the materialised [B, B + K] logits ("concat CE").

Memory: every (implementation, B) runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536, so RSS follows the live
tensors), so no allocator cache or earlier peak leaks in. RSS
right after the inputs exist is the baseline; the kernel's peak-RSS counter of the process is then reset
(/proc/self/clear_refs, "5") and read back after one forward + backward as VmHWM (/proc/self/status: the counter
getrusage's ru_maxrss reports, without the maximum over exited threads that ru_maxrss also folds in). Reported:
peak - baseline (taken after one 8-row warm-up step, so the autograd threads and BLAS workspaces are not counted),
the extra memory the loss needs, including the [B, D] feature gradients. On CUDA: the caching
allocator's peak (torch.cuda.max_memory_allocated) over what was allocated after the inputs.
--dtype bfloat16 makes bf16 features and runs both losses under autocast, as mixed-precision training does.
Time: one subprocess per B builds the inputs once, warms every implementation up, then times --repeats forward +
backward rounds, rotating the order each round, so a neighbour's load on a shared machine hits all of them alike. CPU
time (time.process_time, all threads of the process) is printed beside the wall time: on a machine shared with
other jobs it tracks the work done better than the wall clock, which then mostly measures waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

GIB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark of this process' RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _concat_ce(image, text, scale, image_queue, text_queue):
    """MoCo / ALBEF's queue loss: cross-entropy over [B, B + K] logits, batch columns then the queue's."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (
        F.cross_entropy(scale * image @ torch.cat([text, text_queue]).T, labels)
        + F.cross_entropy(scale * text @ torch.cat([image, image_queue]).T, labels)
    )


def _loss_fn(chunk_size: int | None, queue: int = 0):
    """chunk_size None: open_clip's ClipLoss (with a queue: concat CE); 0: clipkit unchunked; K: clipkit chunked.

    Returns fn(image, text, scale, queues) with queues () or (image_queue, text_queue)."""
    if chunk_size is None and queue:
        return lambda image, text, scale, queues: _concat_ce(image, text, scale, *queues)
    if chunk_size is None:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda image, text, scale, queues: clip_loss(image, text, scale)
    from clipkit.losses import ContrastiveLoss

    loss = ContrastiveLoss(chunk_size=chunk_size or None)
    if not queue:
        return lambda image, text, scale, queues: loss(image, text, scale)
    return lambda image, text, scale, queues: loss(image, text, scale, image_queue=queues[0], text_queue=queues[1])


def _inputs(setup: dict):
    """[B, D] image and text features (L2-normalised, requiring grad), a log temperature and the queues ([K, D]
    image and text features without grad, or () without --queue), on setup's device."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, setup["dtype"])
    features = [F.normalize(torch.randn(setup["batch"], setup["dim"], generator=gen), dim=-1) for _ in range(2)]
    image, text = (f.to(setup["device"], dtype).requires_grad_() for f in features)
    log_scale = torch.tensor([math.log(1 / 0.07)], device=setup["device"], requires_grad=True)  # CLIP's initial
    queue = setup.get("queue", 0)
    queues = tuple(
        F.normalize(torch.randn(queue, setup["dim"], generator=gen), dim=-1).to(setup["device"], dtype)
        for _ in range(2 if queue else 0)
    )
    return image, text, log_scale, queues


def _step(loss_fn, image, text, log_scale, queues) -> tuple[float, float, float]:
    """One forward + backward as in training (scale exponentiated inside); returns (wall s, process CPU s, loss)."""
    import torch

    image.grad = text.grad = log_scale.grad = None
    if image.is_cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    # Low-precision features come from a model under autocast; open_clip needs it to mix them with the fp32 scale.
    with torch.autocast(image.device.type, dtype=image.dtype, enabled=image.dtype != torch.float32):
        loss = loss_fn(image, text, log_scale.exp(), queues)
    loss.backward()
    if image.is_cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert image.grad is not None and text.grad is not None and log_scale.grad is not None
    return elapsed, cpu, loss.item()


def _set_threads(setup: dict) -> None:
    import torch

    if setup.get("threads"):
        torch.set_num_threads(setup["threads"])


def _memory_worker(chunk_size: int | None, setup: dict) -> dict:
    import torch

    _set_threads(setup)

    loss_fn = _loss_fn(chunk_size, setup.get("queue", 0))
    inputs = _inputs(setup)
    if setup["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        loss = _step(loss_fn, *inputs)[-1]
        return {"extra_bytes": torch.cuda.max_memory_allocated() - baseline, "peak_reset": True, "loss": loss}
    # One small step first: the autograd engine's threads and the BLAS workspaces start once per process (10-15 MiB
    # with 2 threads), not per loss call.
    image, text, log_scale, queues = inputs
    _step(loss_fn, *(x[:8].detach().clone().requires_grad_() for x in (image, text)), log_scale, queues)
    baseline = _rss_bytes()
    peak_was_reset = _reset_peak_rss()
    loss = _step(loss_fn, *inputs)[-1]
    # Without the reset this is the lifetime peak, which can only over-state the extra memory.
    return {"extra_bytes": max(_peak_rss_bytes() - baseline, 0), "peak_reset": peak_was_reset, "loss": loss}


def _time_worker(chunk_sizes: list[int | None], setup: dict, repeats: int) -> dict:
    import torch

    _set_threads(setup)

    inputs = _inputs(setup)
    loss_fns = [_loss_fn(k, setup.get("queue", 0)) for k in chunk_sizes]
    losses = [_step(fn, *inputs)[-1] for fn in loss_fns]  # warm-up
    times: list[list[float]] = [[] for _ in loss_fns]
    cpu_times: list[list[float]] = [[] for _ in loss_fns]
    for r in range(repeats):
        for i in [(r + j) % len(loss_fns) for j in range(len(loss_fns))]:
            wall, cpu, _ = _step(loss_fns[i], *inputs)
            times[i].append(wall)
            cpu_times[i].append(cpu)
    return {
        "best_s": [min(t) for t in times],
        "median_s": [statistics.median(t) for t in times],
        "cpu_s": [min(t) for t in cpu_times],
        "loss": losses,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if setup["device"] == "cuda" else "cpu",
    }


def _run_worker(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(args)]
    env = None
    if args[0] == "memory":
        # A fixed mmap threshold: every large tensor is its own mapping, returned to the kernel when freed, so the
        # RSS peak follows the live tensors (with glibc's sliding threshold, freed blocks stay in the heap and later
        # allocations may or may not reuse them: the same run measured 53 or 74 MiB at B 4096, K 1024). Time runs
        # keep the default allocator, as training has it.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from clipkit.losses import RECOMMENDED_CHUNK_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4096,8192,16384", help="comma-separated batch sizes B")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument(
        "--chunk-sizes", default=str(RECOMMENDED_CHUNK_SIZE), help="comma-separated K for clipkit (0 = unchunked)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward rounds after the warm-up")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="feature dtype")
    parser.add_argument(
        "--calibration",
        default=None,
        help="also write the measured memory into this planner calibration file (clipkit/plan/calibration.py)",
    )
    parser.add_argument("--queue", type=int, default=0, help="K: image and text queues of K features (0 = none)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (0 = torch's default; 1 avoids spin-waits "
        "for descheduled threads on a shared machine)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    impls: list[int | None] = [None] + [int(k) for k in args.chunk_sizes.split(",")]
    reference = f"concat CE, queue {args.queue}" if args.queue else "open_clip ClipLoss"
    names = [reference] + [f"clipkit K={k}" if k else "clipkit unchunked" for k in impls[1:]]
    ref = "concat_CE" if args.queue else "open_clip"

    print(
        f"| B | implementation | extra peak RSS | fwd+bwd wall, best (median) | CPU time | mem ours/{ref} "
        f"| wall {ref}/ours | CPU {ref}/ours |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    measured: list[dict] = []
    for batch in sizes:
        setup = {
            "batch": batch,
            "dim": args.dim,
            "device": args.device,
            "dtype": args.dtype,
            "queue": args.queue,
            "threads": args.threads,
        }
        memory = [_run_worker("memory", k, setup) for k in impls]
        measured += [
            {"batch": batch, "chunk_size": k, "implementation": n, "extra_bytes": m["extra_bytes"]}
            for k, n, m in zip(impls, names, memory)
        ]
        timing = _run_worker("time", impls, setup, args.repeats)
        # Same inputs everywhere: a wrong loss shows up here before anyone reads the numbers.
        for loss in [m["loss"] for m in memory] + timing["loss"]:
            if not math.isclose(loss, memory[0]["loss"], rel_tol=1e-4 if args.dtype == "float32" else 1e-2):
                raise SystemExit(f"loss mismatch at B={batch}: {loss} vs {reference} {memory[0]['loss']}")
        ref_mem, ref_wall, ref_cpu = memory[0]["extra_bytes"], timing["best_s"][0], timing["cpu_s"][0]
        for i, name in enumerate(names):
            mem, wall, median, cpu = (
                memory[i]["extra_bytes"],
                timing["best_s"][i],
                timing["median_s"][i],
                timing["cpu_s"][i],
            )
            ratios = f"{mem / ref_mem:.3f} | {ref_wall / wall:.2f} | {ref_cpu / cpu:.2f}" if i else "1 | 1 | 1"
            print(
                f"| {batch} | {name} | {mem / GIB:.3f} GiB | {wall:.2f} s ({median:.2f} s) | {cpu:.2f} s | {ratios} |",
                flush=True,
            )
    where = f"CPU, torch threads={timing['threads']}" if args.device == "cpu" else timing["device_name"]
    queue = f", queue K={args.queue} (image and text)" if args.queue else ""
    print(f"\nD={args.dim}{queue}, {args.dtype}, {where}, torch {timing['torch']}, best of {args.repeats} rounds")
    if not all(m["peak_reset"] for m in memory):
        print("note: /proc/self/clear_refs not writable: peaks are lifetime peaks (over-state the extra memory)")
    if args.calibration:
        from clipkit.plan.calibration import write_section

        write_section(
            args.calibration,
            "loss_memory",
            {
                "dim": args.dim,
                "dtype": args.dtype,
                "device": args.device,
                "threads": timing["threads"],
                "rows": measured,
            },
        )
        print(f"wrote loss_memory to {args.calibration}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        mode, *worker_args = json.loads(sys.argv[2])
        worker = _memory_worker if mode == "memory" else _time_worker
        print(json.dumps(worker(*worker_args)))
    else:
        main()
