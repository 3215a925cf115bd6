"""Recipe arms of issue 11, at equal samples seen, on the demo data or Fashion-MNIST: train clipkit-tiny with each
arm's flags, then zero-shot top-1 (and, on Fashion-MNIST, a linear probe) on held-out images.

    # the demo's setting (2 processes x batch 64, 250 steps, ZeRO-2), as `make demo` trains
    python examples/recipe/run_arms.py --data demo --out runs/arms_demo --arms plain,dedup,negs2
    # one epoch of the demo's 16k samples at batch 32 on 1 process
    python examples/recipe/run_arms.py --data demo --out runs/arms_demo1 --processes 1 --batch-size 32 --epochs 1
    # Fashion-MNIST: one epoch of the 60k train split at batch 32, 1 process; zero-shot (OpenAI templates) and a
    # linear probe on the 10k test split
    python examples/recipe/run_arms.py --data fashion-mnist --out runs/arms_fmnist --processes 1 --batch-size 32 \
        --epochs 1 --lr 1e-3 --arms all

Results: OUT/results.jsonl, one line per arm: flags, steps, training wall seconds, peak RSS of the largest training
process, and the metrics. An arm whose run dir has final/ is skipped on a rerun. Smoke-sized: --samples 2000.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FMNIST = "/usr/share/datasets/fashion-mnist"
ARMS = {
    "plain": "",
    "queue4096": "--queue-size 4096 --momentum 0.995",
    "queue4096-m0": "--queue-size 4096 --momentum 0",
    "queue4096+distill": "--queue-size 4096 --momentum 0.995 --distill-alpha 0.4",
    "hn0.5": "--hard-negative-beta 0.5",
    "hn1": "--hard-negative-beta 1",
    "negs2": "--caption-negatives 2",
    "dedup": "--mask-duplicate-captions",
    "slip": "--image-ssl-weight 1",
    "dedup+negs2": "--mask-duplicate-captions --caption-negatives 2",
    "queue4096+dedup": "--queue-size 4096 --momentum 0.995 --mask-duplicate-captions",
    "dedup+negs2+hn0.5": "--mask-duplicate-captions --caption-negatives 2 --hard-negative-beta 0.5",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("demo", "fashion-mnist"), default="demo")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="all", help=f"comma-separated names of {sorted(ARMS)}, or all")
    p.add_argument("--extra", action="append", default=[], help="NAME=FLAGS: an arm not in the table (repeatable)")
    p.add_argument("--samples", type=int, default=None, help="training samples (default: demo 16000, FMNIST all)")
    p.add_argument("--steps", type=int, default=None, help="default: --epochs over the samples")
    p.add_argument("--epochs", type=float, default=None, help="default: the demo's 250 steps / FMNIST 1 epoch")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="clipkit-tiny", help="model config (the issue's arms: clipkit-tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default: 10%% of the steps, at most 100")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="linear probe too (default: on for Fashion-MNIST)")
    p.add_argument("--max-eval", type=int, default=None, help="cap every eval set (smoke runs)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    return p.parse_args(argv)


def prepare(a, out: Path) -> dict:
    """Training shards and eval specs of the data set (made once)."""
    if a.data == "demo":
        from clipkit.demo import make_data

        n = a.samples or 16000
        if not (out / "data" / "templates.txt").exists():
            make_data(out, n)
        data = out / "data"
        return {"train": f"{data / 'shards'}/{{00000..{-(-n // 1000) - 1:05d}}}.tar", "samples": n,
                "evals": {"seen": f"folder:{data / 'eval_seen'}", "heldout": f"folder:{data / 'eval_heldout'}"},
                "templates": str(data / "templates.txt")}
    shards = out / "shards"
    if not (shards / "shard-000000.tar").exists():
        cmd = [sys.executable, str(REPO / "examples" / "fashion_mnist" / "make_shards.py"), "--root", FMNIST,
               "--out", str(shards), "--per-shard", "5000"] + (["--max-samples", str(a.samples)] if a.samples else [])
        subprocess.run(cmd, check=True)
    n_shards = len(list(shards.glob("shard-*.tar")))
    n = a.samples or 60000
    return {"train": f"{shards}/shard-{{000000..{n_shards - 1:06d}}}.tar", "samples": n,
            "evals": {"test": f"fashion-mnist:{FMNIST}:test"}, "templates": "openai",
            "probe": (f"fashion-mnist:{FMNIST}:train", f"fashion-mnist:{FMNIST}:test")}


def steps_of(a, samples: int) -> int:
    if a.steps:
        return a.steps
    global_batch = a.batch_size * a.processes
    epochs = a.epochs if a.epochs is not None else (1.0 if a.data == "fashion-mnist" else 250 * 128 / 16000)
    return max(1, int(epochs * samples) // global_batch)


def run_arm(a, name: str, flags: str, data: dict, out: Path) -> dict:
    """Trains one arm (in this process's children) and evaluates it; returns its results line."""
    steps = steps_of(a, data["samples"])
    run = out / name
    train = [str(REPO / "train" / "main.py"), "--model", a.model, "--train-data", data["train"],
             "--batch-size", str(a.batch_size), "--steps", str(steps), "--lr", str(a.lr), "--wd", "0.1",
             "--warmup", str(a.warmup if a.warmup is not None else min(100, max(1, steps // 10))),
             "--workers", str(a.workers), "--output-dir", str(run), "--save-every", str(max(100, steps // 4)),
             "--resume", "auto", "--no-progress", "--no-report", *shlex.split(flags)]
    if a.processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "train" / "accelerate" / "cpu_zero2.yaml"), "--num_processes", str(a.processes), *train]
    else:
        cmd = [sys.executable, *train]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB: the largest training process
    line = {"arm": name, "model": a.model, "flags": flags, "data": a.data, "processes": a.processes,
            "batch_size": a.batch_size, "lr": a.lr, "steps": steps, "samples_seen": steps * a.batch_size * a.processes,
            "train_wall_s": round(wall, 1), "peak_rss_mib": round(rss)}
    line.update(evaluate(a, run, data))
    return line


def evaluate(a, run: Path, data: dict) -> dict:
    from clipkit.eval.zeroshot import evaluate_zeroshot
    from clipkit.models import load_open_clip

    model, preprocess, tokenizer = load_open_clip(str(run / "final"))
    out = {}
    for name, spec in data["evals"].items():
        m = evaluate_zeroshot(model, tokenizer, preprocess, spec, templates=data["templates"], max_samples=a.max_eval)
        out.update({f"{name}/acc1": m["acc1"], f"{name}/acc5": m.get("acc5"),
                    f"{name}/mean_per_class_recall": m["mean_per_class_recall"]})
    probe = a.probe if a.probe is not None else "probe" in data
    if probe and "probe" in data:
        result = run / "linear_probe.json"
        subprocess.run([sys.executable, str(REPO / "eval" / "linear_probe.py"), "--model", str(run), "--train-dataset",
                        data["probe"][0], "--test-dataset", data["probe"][1], "--output", str(result),
                        "--no-progress", *(["--max-samples", str(a.max_eval), "--max-train-samples",
                                            str(a.max_eval)] if a.max_eval else [])], check=True)
        out["linear_probe/acc1"] = json.loads(result.read_text())["metrics"]["acc1"]
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    arms = dict(ARMS)
    arms.update(dict(e.split("=", 1) for e in a.extra))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(a, out)
    if a.one is not None:
        line = run_arm(a, a.one, arms[a.one], data, out)
        print(json.dumps(line), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return 0
    names = list(ARMS) if a.arms == "all" else [n for n in a.arms.split(",") if n]
    names += [e.split("=", 1)[0] for e in a.extra if e.split("=", 1)[0] not in names]
    for name in names:
        if (out / name / "final").is_dir():
            print(f"{name}: done already", flush=True)
            continue
        # one process per arm: its RUSAGE_CHILDREN peak covers that arm's training processes only
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", name],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
