"""The whole filtering run: score (pass 1, every process its own shards), decide over the whole input, write the
kept samples (pass 2, on the build_shards distributors), then sizes.json, manifest.json and the score histogram."""

import os
import sys
import time
from collections import Counter
from typing import Any, Dict, List, TextIO

from clipkit.data_prep.filter.config import FilterConfig, FilterError
from clipkit.data_prep.filter.rules import decide, otsu_threshold, plot_histogram
from clipkit.data_prep.filter.score import (
    Scorer,
    model_identity,
    read_scores,
    score_shard,
    scores_are_current,
    shard_name,
)
from clipkit.data_prep.filter.write import FilterJob, is_complete, job_fingerprint, write_filtered_shard
from clipkit.data_prep.writer import read_json, write_json

HISTOGRAM = "clip_scores.png"


def input_shards(spec: str) -> List[str]:
    from clipkit.data.urls import expand_urls

    try:
        paths = expand_urls(spec)
    except ValueError as e:
        raise FilterError(f"--input {spec}: {e}") from e
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FilterError(f"--input: {len(missing)} shard(s) not found, e.g. {missing[0]} (local tar files only)")
    names = Counter(shard_name(p) for p in paths)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise FilterError(f"--input: several shards are named {clash[0]}.tar: output shards keep the input names")
    return paths


def _bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, file=sys.stderr, smoothing=0.1)


def _process_state(device: str):
    """(accelerate PartialState, device): one process, or one of `accelerate launch`'s (gloo without CUDA)."""
    import torch
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        state = PartialState(cpu=True, backend="gloo")
    else:
        state = PartialState()
    if device == "auto":
        device = str(state.device)
    return state, device


def score_pass(config: FilterConfig, paths: List[str], scores_dir: str, log: TextIO, loaded=None) -> bool:
    """Scores this process's shards with `loaded` (a clipkit.eval.models.LoadedModel; default: config.model loaded
    on this process's device); returns True on the main process (which goes on to pass 2)."""
    from clipkit.eval.models import load_model

    state, device = _process_state(config.device)
    mine = paths[state.process_index::state.num_processes]
    model_id = model_identity(config.model, config.pretrained)
    todo = [p for p in mine if not scores_are_current(p, scores_dir, model_id)]
    if len(todo) < len(mine):
        print(f"rank {state.process_index}: {len(mine) - len(todo)} of {len(mine)} shards already scored", file=log)
    if todo:
        if loaded is None and config.model:
            loaded = load_model(config.model, config.pretrained, device)
        scorer = Scorer(loaded, device, config.batch_size, config.threads) if loaded else None
        bar = _bar(None, config.progress and state.is_main_process, f"scoring (rank {state.process_index})")
        try:
            for path in todo:
                score_shard(path, scores_dir, scorer, model_id, bar.update)
        finally:
            bar.close()
            if scorer is not None:
                scorer.close()
    state.wait_for_everyone()
    return state.is_main_process


def filter_shards(config: FilterConfig, log: TextIO | None = None, loaded=None) -> Dict[str, Any] | None:
    """Runs both passes; returns the manifest (None on processes other than the main one). `loaded`: an already
    loaded model to score with instead of loading config.model (config.model then only names it)."""
    log = log or sys.stdout
    start = time.monotonic()
    config.validate()
    paths = input_shards(config.input)
    os.makedirs(config.output, exist_ok=True)
    scores_dir = config.from_scores or os.path.join(config.output, "scores")
    if not config.from_scores:
        os.makedirs(scores_dir, exist_ok=True)
        if not score_pass(config, paths, scores_dir, log, loaded):
            return None
    rows_by_shard, metas = [], []
    for path in paths:
        rows, meta = read_scores(scores_dir, path)
        rows_by_shard.append(rows)
        metas.append(meta)
    all_rows = [r for rows in rows_by_shard for r in rows]
    scores = [r["clip_score"] for r in all_rows if r["clip_score"] is not None]
    suggested = otsu_threshold(scores)
    decision = decide(all_rows, config) if not config.scores_only else {"top_fraction_cut": None, "kept": None}
    if scores:
        plot_histogram(scores, os.path.join(config.output, HISTOGRAM),
                       {"suggested (Otsu)": suggested, "--min-clip-score": config.min_clip_score,
                        "--top-fraction cut": decision["top_fraction_cut"]})
    if config.scores_only:
        print(f"scored {len(all_rows)} samples of {len(paths)} shards into {scores_dir}"
              + (f"; suggested --min-clip-score {suggested:.4f} (Otsu, see {HISTOGRAM})" if suggested else ""),
              file=log)
        manifest = {"scores_only": True, "scores": os.path.abspath(scores_dir), "input_shards": len(paths),
                    "samples": len(all_rows), "scored": len(scores), "suggested_min_clip_score": suggested,
                    "histogram": HISTOGRAM, "config": config.to_json()}
        write_json(os.path.join(config.output, "manifest.json"), manifest)
        return manifest
    settings = config.rule_settings()
    jobs = [FilterJob(shard_name(p), p, m["input"]["sha256"], config.output, rows,
                      job_fingerprint(m["input"]["sha256"], rows, settings))
            for p, m, rows in zip(paths, metas, rows_by_shard)]
    todo = [job for job in jobs if not is_complete(job)]
    if len(todo) < len(jobs):
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} shards already written", file=log)
    failures: Dict[str, str] = {}

    def on_done(job, stats, error):
        if error is not None:
            failures[job.name] = error
            print(f"shard {job.name} failed: {error}", file=sys.stderr)

    from clipkit.data_prep.distributors import run_jobs

    bar = _bar(sum(len(j.rows) for j in todo), config.progress, "writing")
    try:
        run_jobs(todo, config, on_done, bar.update, work=write_filtered_shard)
    finally:
        bar.close()
    manifest = _write_totals(config, jobs, failures, decision, suggested, scores_dir, time.monotonic() - start)
    _print_summary(manifest, log)
    return manifest


def _write_totals(config, jobs, failures, decision, suggested, scores_dir, elapsed) -> Dict[str, Any]:
    sizes, reasons, total, kept = {}, Counter(), 0, 0
    for job in jobs:
        if job.name in failures:
            continue
        stats = read_json(os.path.join(config.output, f"{job.name}_stats.json")) or {}
        sizes[f"{job.name}.tar"] = stats.get("kept", 0)
        kept += stats.get("kept", 0)
        total += stats.get("count", 0)
        reasons.update(stats.get("drop_reasons", {}))
    write_json(os.path.join(config.output, "sizes.json"), sizes)
    manifest = {
        "input_shards": len(jobs),
        "complete_shards": len(jobs) - len(failures),
        "failed_shards": failures,
        "samples": total,
        "kept": kept,
        "kept_fraction": round(kept / total, 6) if total else 0.0,
        "drop_reasons": dict(sorted(reasons.items())),
        "suggested_min_clip_score": suggested,
        "top_fraction_cut": decision["top_fraction_cut"],
        "scores": os.path.abspath(scores_dir),
        "histogram": HISTOGRAM,
        "elapsed_s": round(elapsed, 3),
        "config": config.to_json(),
    }
    write_json(os.path.join(config.output, "manifest.json"), manifest)
    return manifest


def _print_summary(manifest: Dict[str, Any], log: TextIO) -> None:
    print(f"kept {manifest['kept']} of {manifest['samples']} samples ({100 * manifest['kept_fraction']:.1f}%) in "
          f"{manifest['complete_shards']}/{manifest['input_shards']} shards ({manifest['elapsed_s']:.1f}s)", file=log)
    if manifest["drop_reasons"]:
        print("dropped: " + ", ".join(f"{k}={v}" for k, v in manifest["drop_reasons"].items()), file=log)
    if manifest["suggested_min_clip_score"] is not None:
        print(f"suggested --min-clip-score {manifest['suggested_min_clip_score']:.4f} (Otsu's threshold between the "
              f"score histogram's modes: {HISTOGRAM})", file=log)
    if manifest["failed_shards"]:
        print(f"{len(manifest['failed_shards'])} shard(s) failed; run the same command again to retry them", file=log)
