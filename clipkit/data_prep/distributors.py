"""Running shard jobs: in this process, on a process pool, or on a Ray cluster.

Every path ends: a worker killed by the OS (OOM on a hostile image, a segfault in a decoder) breaks a
`concurrent.futures` pool with an error instead of hanging it the way a `multiprocessing.Pool` does (the
img2dataset "stuck at the end" reports #74, #289, #445); the jobs that were running then are rerun each in its own
one-process pool, and a job whose worker dies there too is reported as failed while every other shard completes.
"""

import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, List

from clipkit.data_prep.config import ShardConfig
from clipkit.data_prep.shard import ShardJob, run_shard

OnDone = Callable[[ShardJob, Dict[str, Any] | None, str | None], None]  # (job, stats, error)
OnProgress = Callable[[int], None]
# What runs one job: (job, config, progress) -> stats. run_shard for build_shards; filter_shards passes its writer.
Work = Callable[[Any, Any, OnProgress | None], Dict[str, Any]]

_ATTEMPTS = 2  # Ray: tries per shard
_counter = None  # per worker process: the shared row counter for the progress bar


def run_in_process(jobs: List[ShardJob], config: ShardConfig, on_done: OnDone, on_progress: OnProgress,
                   work: Work = run_shard) -> None:
    for job in jobs:
        try:
            stats = work(job, config, on_progress)
        except Exception as e:  # report and go on with the other shards
            on_done(job, None, f"{type(e).__name__}: {e}")
        else:
            on_done(job, stats, None)


def _init_worker(counter, parent_pid: int) -> None:
    global _counter
    _counter = counter
    _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int) -> None:
    """A main process killed by SIGKILL (OOM killer, kill -9) runs no cleanup: without this its pool workers would
    finish their shards unsupervised and then wait forever for work (found by the reliability suite)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _count(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n


def _run_counted(job: ShardJob, config: ShardConfig, work: Work = run_shard) -> Dict[str, Any]:
    return work(job, config, _count)


def _run_round(
    jobs: List[ShardJob], config: ShardConfig, isolated: bool, on_done: OnDone, progress: Callable[[], None],
    work: Work = run_shard,
) -> List[ShardJob]:
    """Runs `jobs` on `process_count` processes; returns the jobs whose worker process died.

    One job waits queued per worker, so a worker never idles between shards while this loop is slow to be scheduled.
    When a pool breaks, the jobs in flight (running or queued) are returned and rerun isolated: each in its own
    one-process pool, so a death is pinned on the job that caused it.
    """
    context = multiprocessing.get_context("spawn")
    width = min(config.process_count, len(jobs))
    depth = width if isolated else 2 * width

    def new_pool(workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(_counter, os.getpid()))

    queue, in_flight, died = deque(jobs), {}, []
    shared = None if isolated else new_pool(width)
    broke = False
    try:
        while queue or in_flight:
            while queue and len(in_flight) < depth and not broke:
                job = queue.popleft()
                pool = shared or new_pool(1)
                in_flight[pool.submit(_run_counted, job, config, work)] = (job, pool)
            done, _ = wait(in_flight, timeout=0.2, return_when=FIRST_COMPLETED)
            progress()
            for future in done:
                job, pool = in_flight.pop(future)
                if isolated:
                    pool.shutdown(wait=True)
                try:
                    stats = future.result()
                except BrokenProcessPool as e:
                    broke = not isolated
                    if isolated:
                        on_done(job, None, f"worker process died running this shard alone ({e})")
                    else:
                        died.append(job)
                except Exception as e:
                    on_done(job, None, f"{type(e).__name__}: {e}")
                else:
                    on_done(job, stats, None)
            if broke and not in_flight:  # every job of the broken pool is accounted for: start a fresh one
                if shared is not None:
                    shared.shutdown(wait=True)
                    shared = new_pool(width)
                broke = False
    finally:
        for _, pool in in_flight.values():
            pool.shutdown(wait=True, cancel_futures=True)
        if shared is not None:
            shared.shutdown(wait=True, cancel_futures=True)
    return died


def run_on_processes(jobs: List[ShardJob], config: ShardConfig, on_done: OnDone, on_progress: OnProgress,
                     work: Work = run_shard) -> None:
    # spawn, not fork: the parent may hold threads (progress bar) and a forked lock would never be released.
    global _counter
    _counter = multiprocessing.get_context("spawn").Value("q", 0)
    reported = 0

    def progress() -> None:
        nonlocal reported
        value = _counter.value
        if value > reported:
            on_progress(value - reported)
            reported = value

    died = _run_round(jobs, config, False, on_done, progress, work)
    if died:  # a worker died under these jobs (OOM, decoder crash): run each alone to find the culprit
        _run_round(died, config, True, on_done, progress, work)
    progress()


def run_on_ray(jobs: List[ShardJob], config: ShardConfig, on_done: OnDone, on_progress: OnProgress,
               work: Work = run_shard) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--distributor ray needs Ray: pip install 'clipkit[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        local_cpus = (config.workers or None) if config.ray_address is None else None
        ray.init(
            address=config.ray_address,
            num_cpus=local_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="error",
        )
    try:
        # Output must be on storage every node sees (NFS, a shared disk): workers write shards straight into it.
        remote = ray.remote(num_cpus=1, max_retries=_ATTEMPTS - 1)(work)
        refs = {remote.remote(job, config): job for job in jobs}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:  # RayTaskError, WorkerCrashedError...
                    on_done(job, None, f"{type(e).__name__}: {e}")
                else:
                    on_progress(stats["count"])
                    on_done(job, stats, None)
    finally:
        if started_here:
            ray.shutdown()


def run_jobs(jobs: List[ShardJob], config: ShardConfig, on_done: OnDone, on_progress: OnProgress,
             work: Work = run_shard) -> None:
    """Runs `work(job, config, progress)` for every job (build_shards' run_shard by default); `config` needs
    distributor, process_count, workers and ray_address."""
    if not jobs:
        return
    if config.distributor == "ray":
        run_on_ray(jobs, config, on_done, on_progress, work)
    elif config.process_count == 1:
        run_in_process(jobs, config, on_done, on_progress, work)
    else:
        run_on_processes(jobs, config, on_done, on_progress, work)
