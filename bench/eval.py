"""clipkit's eval vs CLIP_benchmark 1.6.2 (the peer), same checkpoint, same local wds data set, one run:
parity of acc1 / acc5 / mean per-class recall (zero-shot classification) and recall@1/5/10 both ways (retrieval),
and images/s of each.

    bash examples/fashion_mnist/run.sh          # makes runs/fmnist/run/final (any clipkit-tiny checkpoint will do)
    python bench/eval.py --pretrained runs/fmnist/run/final/open_clip_model.safetensors
    # smoke-sized: --n 300

The peer runs in its own venv (.venv-peers-clipbench: torch 2.14.1, numpy<2, clip_benchmark==1.6.2,
open_clip_torch==3.3.0) through bench/clipbench_run.py, fp32 (--no_amp) like ours. The data set is the first N images
of the Fashion-MNIST test split, written in CLIP_benchmark's wds layout: a classification set (cls, classnames.txt,
the 80 OpenAI templates) and a retrieval set (two captions per image). Exits 1 if any metric differs by more than
--tolerance points.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_wds_sets(fmnist: str, n: int, out: Path, per_shard: int) -> tuple:
    """(classification dir, retrieval dir) in CLIP_benchmark's layout, from the first n test images."""
    import webdataset as wds
    from PIL import Image

    from clipkit.eval.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist
    from clipkit.eval.templates import load_templates

    images, labels = load_fashion_mnist(fmnist, "test")
    cls_dir, ret_dir = out / "fmnist_cls", out / "fmnist_ret"
    for d in (cls_dir, ret_dir):
        (d / "test").mkdir(parents=True, exist_ok=True)
        for old in (d / "test").glob("*.tar"):
            old.unlink()
    (cls_dir / "classnames.txt").write_text("\n".join(FASHION_MNIST_CLASSNAMES) + "\n")
    (cls_dir / "zeroshot_classification_templates.txt").write_text("\n".join(load_templates("openai")) + "\n")
    (ret_dir / "dataset_type.txt").write_text("retrieval\n")
    sinks = [wds.ShardWriter(str(d / "test" / "%d.tar"), maxcount=per_shard, verbose=0) for d in (cls_dir, ret_dir)]
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").convert("RGB").save(buf, format="PNG")
        name = FASHION_MNIST_CLASSNAMES[labels[i]]
        sinks[0].write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "cls": int(labels[i])})
        caps = f"a photo of a {name}, item {i}.\na black and white picture of a {name}, number {n + i}"
        sinks[1].write({"__key__": f"s{i:07d}", "png": buf.getvalue(), "txt": caps})
    for s in sinks:
        s.close()
    for d in (cls_dir, ret_dir):
        (d / "test" / "nshards.txt").write_text(f"{len(list((d / 'test').glob('*.tar')))}\n")
    return cls_dir, ret_dir


def run_ours(task: str, data_dir: Path, args) -> tuple:
    """(metrics, seconds) for model load + data set + evaluation, the scope bench/clipbench_run.py times."""
    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.models import load_model
    from clipkit.eval.retrieval import run_retrieval
    from clipkit.eval.zeroshot import run_zeroshot

    start = time.perf_counter()
    loaded = load_model(args.model, args.pretrained)
    ds = build_dataset(f"wds:{data_dir}:test")
    kw = dict(batch_size=args.batch_size, workers=args.workers, progress=False)
    if task == "zeroshot_classification":
        m = run_zeroshot(loaded.model, loaded.tokenizer, loaded.preprocess, ds, "dataset", **kw)
    else:
        m = run_retrieval(loaded.model, loaded.tokenizer, loaded.preprocess, ds, (1, 5, 10), **kw)
    return m, time.perf_counter() - start


def run_peer(task: str, data_dir: Path, args, out_json: Path) -> tuple:
    cmd = [args.peer_python, str(REPO / "bench" / "clipbench_run.py"), "eval", "--model_type", "open_clip",
           "--model", args.model, "--pretrained", args.pretrained, "--dataset", f"wds/{data_dir.name}",
           "--dataset_root", str(data_dir), "--task", task, "--no_amp", "--batch_size", str(args.batch_size),
           "--num_workers", str(args.workers), "--recall_k", "1", "5", "10", "--output", str(out_json), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        sys.exit(f"CLIP_benchmark failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    seconds = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("CLIPBENCH_SECONDS")))
    return json.loads(out_json.read_text())["metrics"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="open_clip-format weights (.safetensors) of --model")
    parser.add_argument("--model", default="clipkit-tiny")
    parser.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--n", type=int, default=2000, help="test images in the wds sets")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_eval"))
    parser.add_argument("--peer-python", default=str(REPO / ".venv-peers-clipbench" / "bin" / "python"))
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each side this many times, alternating; images/s from the fastest run of each")
    parser.add_argument("--tolerance", type=float, default=0.1, help="allowed difference, in points (0.1 = 0.1%%)")
    args = parser.parse_args()
    if not Path(args.peer_python).is_file():
        sys.exit(f"{args.peer_python} not found: create the peer venv first (see the module doc)")

    work = Path(args.work_dir)
    cls_dir, ret_dir = write_wds_sets(args.fmnist, args.n, work, args.per_shard)
    rows, speed, worst = [], [], 0.0
    for task, data_dir in (("zeroshot_classification", cls_dir), ("zeroshot_retrieval", ret_dir)):
        t_ours, t_peer = [], []
        for _ in range(args.repeats):  # alternate, so load from other processes hits both sides alike
            ours, t = run_ours(task, data_dir, args)
            t_ours.append(t)
            peer, t = run_peer(task, data_dir, args, work / f"peer_{task}.json")
            t_peer.append(t)
        speed.append((task, args.n / min(t_ours), args.n / min(t_peer)))
        for k in sorted(peer):
            if isinstance(peer[k], float) and k in ours:
                diff = 100 * abs(ours[k] - peer[k])
                worst = max(worst, diff)
                rows.append((task, k, 100 * ours[k], 100 * peer[k], diff))
    print(f"model {args.model} ({args.pretrained}); {args.n} Fashion-MNIST test images as wds; "
          f"batch {args.batch_size}, {args.workers} workers, fp32, {os.cpu_count()} CPUs")
    print(f"{'task':<24} {'metric':<30} {'ours %':>8} {'peer %':>8} {'|diff| pt':>9}")
    for task, k, a, b, d in rows:
        print(f"{task:<24} {k:<30} {a:8.3f} {b:8.3f} {d:9.3f}")
    print(f"\n{'task':<24} {'ours img/s':>11} {'peer img/s':>11} {'ratio':>6}")
    for task, a, b in speed:
        print(f"{task:<24} {a:11.1f} {b:11.1f} {a / b:6.2f}x")
    ok = worst <= args.tolerance
    print(f"\nparity: max |diff| {worst:.3f} points ({'OK' if ok else 'FAIL'}, tolerance {args.tolerance})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
