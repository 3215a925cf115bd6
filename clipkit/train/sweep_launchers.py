"""Where a sweep's runs execute: here one at a time, as Ray tasks, or as SLURM jobs through submitit.

Each launcher calls the same `run_one(RunSpec)` (train/main.py in a subprocess, then the eval), so results are the
same whichever runs them; output dirs must be on storage every worker sees.
"""

import os
from typing import Any, Dict, List

from clipkit.train.sweep import OnResult, RunSpec, SweepConfig, SweepError, run_one


def run_local(runs: List[RunSpec], cfg: SweepConfig, on_result: OnResult) -> None:
    for spec in runs:
        on_result(run_one(spec))


def run_ray(runs: List[RunSpec], cfg: SweepConfig, on_result: OnResult) -> None:
    """One Ray task per run, with `ray.num_cpus` CPUs (default 1) and `ray.num_gpus` GPUs (default 1 when the
    cluster has any, else 0) each; `ray.address` joins a running cluster (default: a local instance with
    `ray.local_cpus` CPUs)."""
    try:
        import ray
    except ImportError as e:
        raise SweepError("--launcher ray needs Ray: pip install 'clipkit[ray]'") from e
    options: Dict[str, Any] = dict(cfg.ray)
    address = options.pop("address", None)
    local_cpus = options.pop("local_cpus", None)  # CPUs of a local instance started here (default: all)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="error",
                 num_cpus=local_cpus if address is None else None)
    try:
        if "num_gpus" not in options:
            options["num_gpus"] = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        options.setdefault("num_cpus", 1)
        remote = ray.remote(max_retries=1, **options)(run_one)
        refs = {remote.remote(spec): spec for spec in runs}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    on_result(ray.get(ref))
                except Exception as e:  # the task's worker died (OOM, node lost): report, go on
                    on_result({"name": spec.name, "model": spec.model, "samples": spec.samples,
                               "status": "failed", "reason": f"{type(e).__name__}: {e}"})
    finally:
        if started_here:
            ray.shutdown()


def run_slurm(runs: List[RunSpec], cfg: SweepConfig, on_result: OnResult) -> None:
    """One submitit job per run (an array job). `slurm:` holds submitit's parameters (timeout_min, slurm_partition,
    gpus_per_node, cpus_per_task, mem_gb, ...) and `cluster`: slurm (default), or local / debug, submitit's
    executors that run the jobs on this machine."""
    try:
        import submitit
    except ImportError as e:
        raise SweepError("--launcher slurm needs submitit: pip install submitit") from e
    params = dict(cfg.slurm)
    cluster = params.pop("cluster", "slurm")
    params.setdefault("timeout_min", 24 * 60)
    if cluster == "slurm":
        params.setdefault("name", "clipkit-sweep")
    executor = submitit.AutoExecutor(folder=os.path.join(cfg.output_dir, "submitit", "%j"), cluster=cluster)
    executor.update_parameters(**params)
    if cluster == "debug":  # the debug executor runs each job when its result is asked for, in this process
        jobs = [executor.submit(run_one, spec) for spec in runs]
    else:
        jobs = executor.map_array(run_one, runs)
    for spec, job in zip(runs, jobs):
        try:
            on_result(job.result())
        except Exception as e:  # a job that failed or was cancelled: report, go on
            on_result({"name": spec.name, "model": spec.model, "samples": spec.samples, "status": "failed",
                       "reason": f"{type(e).__name__}: {str(e)[-500:]}"})


LAUNCH = {"local": run_local, "ray": run_ray, "slurm": run_slurm}
