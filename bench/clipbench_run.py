"""Runs CLIP_benchmark's CLI inside its own venv with clipkit's model configs registered, and times the evaluation.

    .venv-peers-clipbench/bin/python bench/clipbench_run.py eval --model_type open_clip --model clipkit-tiny \
        --pretrained W.safetensors --dataset wds/NAME --dataset_root DIR --task zeroshot_classification --no_amp ...

Imports nothing from clipkit (the peer venv does not have it): the JSON configs are registered by path. Prints one
line `CLIPBENCH_SECONDS <s>`: wall time of CLIP_benchmark's `run()` (model load, data set, classifier, images).
"""

import sys
import time
from pathlib import Path

import open_clip
from clip_benchmark import cli

open_clip.add_model_config(Path(__file__).resolve().parents[1] / "clipkit" / "model_configs")

if __name__ == "__main__":
    real_run = cli.run

    def timed_run(args):
        start = time.perf_counter()
        out = real_run(args)
        print(f"CLIPBENCH_SECONDS {time.perf_counter() - start:.3f}", flush=True)
        return out

    cli.run = timed_run
    sys.argv[0] = "clip_benchmark"
    sys.exit(cli.main())
