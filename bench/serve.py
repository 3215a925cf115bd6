"""Load benchmark of serve/app.py, and of clip-retrieval's back (clip-back) on the same index and model.

    flock /tmp/clipkit-heavy.lock python bench/serve.py --seconds 10               # synthetic index, random weights
    flock /tmp/clipkit-heavy.lock python bench/serve.py --index demo_out/index --model demo_out/run/final
    # smoke-sized: --seconds 2 --concurrency 1 8

N concurrent clients (threads with keep-alive sessions, on this machine, over loopback) for a fixed time per
scenario: POST /v1/embeddings (text; image as a data URI) and POST /knn-service (text; image as base64). Prints
requests/s, p50/p99 latency and errors per scenario and concurrency, and each server's RSS at start and end.

The peer is clip-back 2.45 from its own venv (its pins: open-clip-torch<3, numpy<2):
    python3 -m venv .venv-peers-clipretrieval
    .venv-peers-clipretrieval/bin/pip install torch==2.14.1 torchvision==0.29.1 clip-retrieval==2.45.0
    .venv-peers-clipretrieval/bin/pip install "setuptools<70"   # its clip-anytorch imports pkg_resources
It reads our index directory as it is (image.index, text.index, metadata/*.parquet are clip-retrieval's names) and
loads our weights through open_clip 2.x with our model config registered; it has no embeddings API (its #194), so it
runs the /knn-service scenarios only. Flask's threaded dev server is what clip-back runs; it is bound to 127.0.0.1.
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".venv-peers-clipretrieval"

PEER_SCRIPT = r"""
import json, sys, flask
cfg_path, indices, port, clip_model = sys.argv[1:5]
import open_clip
open_clip.add_model_config(cfg_path)
run = flask.Flask.run
flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host="127.0.0.1", port=port, **kw)
from clip_retrieval.clip_back import clip_back
clip_back(indices_paths=indices, port=int(port), clip_model=clip_model, enable_mclip_option=False, use_jit=False,
          provide_aesthetic_embeddings=False, provide_safety_model=False, provide_violence_detector=False,
          columns_to_return=["url", "caption"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` threads post `body` to `url` back to back for `seconds`."""
    data = json.dumps(body)
    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        s = requests.Session()
        mine, bad = [], 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = s.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=60)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            mine.append(time.perf_counter() - t0)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors[0]}


def synthetic_index(root: Path) -> tuple:
    """2000 shape images in 2 shards, clipkit-tiny with seeded random weights, a flat index."""
    import torch

    from clipkit.index.cli import build_main, embed_main
    from clipkit.models import create_model, export_open_clip, preprocess_cfg_of
    from clipkit.synthetic import write_train_shards

    torch.manual_seed(0)
    net, cfg, _, _, _ = create_model("clipkit-tiny")
    model = export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), root / "model")
    write_train_shards(root / "shards", 2000, per_shard=1000, seed=0)
    embed_main(["--model", str(model), "--data", str(root / "shards" / "{00000..00001}.tar"), "--output",
                str(root / "index"), "--no-progress"])
    build_main([str(root / "index"), "--kind", "flat", "--no-map"])
    return root / "index", model


def png_b64() -> str:

    import random

    from clipkit.synthetic import draw_shape

    buf = io.BytesIO()
    draw_shape("red", "star", 64, random.Random(0)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_scenarios(name: str, base: str, proc: subprocess.Popen, scenarios: dict, concurrency, seconds) -> dict:
    out = {"rss_start_mib": rss_mib(proc.pid), "results": {}}
    for scenario, (path, body) in scenarios.items():
        if path == "/knn-service":  # the answer itself, to check both servers find the same neighbours
            out.setdefault("top_ids", {})[scenario] = [x["id"] for x in requests.post(base + path,
                                                                                      json=body).json()]
        load(base + path, body, 2, 1.0)  # warm-up
        for c in concurrency:
            r = load(base + path, body, c, seconds)
            out["results"][f"{scenario}@{c}"] = r
            print(f"{name:<12} {scenario:<12} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
    out["rss_end_mib"] = rss_mib(proc.pid)
    print(f"{name:<12} server RSS {out['rss_start_mib']:.0f} MiB at start, {out['rss_end_mib']:.0f} MiB at end",
          flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", default=None, help="default: a synthetic 2000-image index with random weights")
    p.add_argument("--model", default=None, help="the model that embedded --index (an export dir)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--output", default=None, help="results JSON")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clipkit_bench_serve_"))
    if args.index is None:
        index, model = synthetic_index(tmp)
    else:
        index, model = Path(args.index), Path(args.model)
    image = png_b64()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results = {"load_average_start": os.getloadavg()}

    port = free_port()
    ours = subprocess.Popen([sys.executable, str(REPO / "serve" / "app.py"), "--index", str(index), "--model",
                             str(model), "--port", str(port), "--log-level", "warning"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", ours)
        scenarios = {
            "emb_text": ("/v1/embeddings", {"input": "a photo of a red star"}),
            "emb_image": ("/v1/embeddings", {"input": [f"data:image/png;base64,{image}"]}),
            "knn_text": ("/knn-service", {"text": "a photo of a red star", "num_images": 10, "deduplicate": False}),
            "knn_image": ("/knn-service", {"image": image, "num_images": 10, "deduplicate": False}),
        }
        results["clipkit"] = run_scenarios("clipkit", f"http://127.0.0.1:{port}", ours, scenarios, args.concurrency,
                                           args.seconds)
    finally:
        stop(ours)

    peer_python = PEER_VENV / "bin" / "python"
    if not args.no_peer and peer_python.is_file():
        cfg = json.loads((model / "open_clip_config.json").read_text())["model_cfg"]
        cfg_path = tmp / "clipkit-bench.json"
        cfg_path.write_text(json.dumps(cfg))
        indices = tmp / "indices.json"
        indices.write_text(json.dumps({"index": str(index)}))
        port = free_port()
        weights = model / "open_clip_model.safetensors"
        peer = subprocess.Popen([str(peer_python), "-c", PEER_SCRIPT, str(cfg_path), str(indices), str(port),
                                 f"open_clip:clipkit-bench/{weights}"], env=env)
        try:
            wait_ready(f"http://127.0.0.1:{port}/indices-list", peer)
            scenarios = {
                "knn_text": ("/knn-service", {"text": "a photo of a red star", "num_images": 10, "modality": "image",
                                              "indice_name": "index", "deduplicate": False}),
                "knn_image": ("/knn-service", {"image": image, "num_images": 10, "modality": "image",
                                               "indice_name": "index", "deduplicate": False}),
            }
            results["clip-back"] = run_scenarios("clip-back", f"http://127.0.0.1:{port}", peer, scenarios,
                                                 args.concurrency, args.seconds)
        finally:
            stop(peer)
        for scenario, ids in results["clip-back"]["top_ids"].items():
            same = ids == results["clipkit"]["top_ids"][scenario]
            print(f"{scenario}: same top-{len(ids)} ids from both servers: {same}")
        print("\nratio clipkit / clip-back (requests/s):")
        for key, r in results["clip-back"]["results"].items():
            mine = results["clipkit"]["results"][key]
            print(f"  {key:<16} {mine['rps'] / max(r['rps'], 1e-9):6.2f}x")
    elif not args.no_peer:
        print(f"\npeer skipped: {PEER_VENV} not found (see this script's docstring)")
    results["load_average_end"] = os.getloadavg()
    print(f"load average at end: {results['load_average_end']}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
