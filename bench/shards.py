"""Shard building: clipkit's data_prep vs img2dataset 1.47 on the same dump, same image size and resize mode.

    python bench/shards.py --images 5000            # both sources: local files and HTTP from 127.0.0.1
    python bench/shards.py --images 300 --sources local   # smoke

Needs img2dataset in its own venv (it pins webdataset<0.3):
    python3 -m venv .venv-peers-img2dataset && .venv-peers-img2dataset/bin/pip install img2dataset==1.47.0

Local files: ours reads `--path-col`, img2dataset (no path input) reads the same files as file:// URLs.
HTTP: both fetch from one keep-alive HTTP/1.1 file server on 127.0.0.1 running in its own process.
images/s = successful samples / wall time of the whole command (start-up included, the same for both);
peak memory = the highest sum of RSS over the command's process tree, sampled every 50 ms.
"""

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import Pool

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(REPO, ".venv-peers-img2dataset", "bin", "img2dataset")


def _make_image(args):
    """A photo-like image: smooth random field + grain, 256..1280 px wide; every tenth a PNG."""
    index, folder = args
    rng = np.random.default_rng(index)
    width, height = int(rng.integers(256, 1280)), int(rng.integers(192, 960))
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-8, 8, (height, width, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(np.asarray(small, np.int16) + grain, 0, 255).astype(np.uint8))
    ext = "png" if index % 10 == 9 else "jpg"
    path = os.path.join(folder, f"{index:06d}.{ext}")
    img.save(path, quality=90) if ext == "jpg" else img.save(path, compress_level=3)
    return path


def make_dataset(folder: str, count: int) -> list:
    os.makedirs(folder, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(folder, "*.*g")))
    if len(existing) >= count:
        return existing[:count]
    with Pool(2) as pool:
        return pool.map(_make_image, [(i, folder) for i in range(count)], chunksize=32)


def serve(folder: str, port_file: str) -> None:
    """HTTP/1.1 keep-alive static server (run in its own process)."""

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    with open(port_file + ".tmp", "w") as f:
        f.write(str(httpd.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    httpd.serve_forever()


def measure(command, env=None, cwd=REPO):
    """Runs `command`; returns (wall seconds, peak tree RSS in MiB, returncode, output tail)."""
    start = time.perf_counter()
    log = io.BytesIO()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=lambda: log.write(process.stdout.read()), daemon=True)
    reader.start()
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    return wall, peak / 2**20, process.returncode, log.getvalue().decode(errors="replace")[-2000:]


def count_ours(output: str) -> int:
    return sum(json.load(open(p))["successes"] for p in glob.glob(os.path.join(output, "*_stats.json")))


def count_peer(output: str) -> int:
    return sum(json.load(open(p))["successes"] for p in glob.glob(os.path.join(output, "*_stats.json")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--data", default="/tmp/clipkit_bench_shards/images", help="generated images (reused)")
    p.add_argument("--work", default="/tmp/clipkit_bench_shards/runs")
    p.add_argument("--sources", default="local,http")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="center_crop")
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if not os.path.exists(PEER):
        sys.exit(f"img2dataset not found at {PEER}; see this file's docstring")

    t0 = time.perf_counter()
    paths = make_dataset(args.data, args.images)
    megabytes = sum(os.path.getsize(x) for x in paths) / 2**20
    print(f"dataset: {len(paths)} images, {megabytes:.0f} MiB ({time.perf_counter() - t0:.0f}s to prepare)")
    os.makedirs(args.work, exist_ok=True)
    port_file = os.path.join(args.work, "port")
    if os.path.exists(port_file):
        os.remove(port_file)
    server = subprocess.Popen([sys.executable, __file__, "--serve", args.data, port_file])
    results = []
    try:
        while not os.path.exists(port_file):
            time.sleep(0.05)
        port = int(open(port_file).read())
        names = [os.path.basename(x) for x in paths]
        captions = [f"a synthetic photo number {i}" for i in range(len(paths))]
        dumps = {
            "local": pa.table({"path": paths, "url": [f"file://{x}" for x in paths], "caption": captions}),
            "http": pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n in names], "caption": captions}),
        }
        common = ["--image-size", str(args.image_size), "--resize-mode", args.resize_mode]
        for source in args.sources.split(","):
            dump = os.path.join(args.work, f"dump_{source}.parquet")
            pq.write_table(dumps[source], dump)
            ours_out, peer_out = os.path.join(args.work, f"ours_{source}"), os.path.join(args.work, f"peer_{source}")
            subprocess.run(["rm", "-rf", ours_out, peer_out], check=True)
            ours = [
                sys.executable, os.path.join(REPO, "data_prep", "build_shards.py"), dump, "--caption-col", "caption",
                "--output", ours_out, "--workers", str(args.processes), "--threads", str(args.threads),
                "--samples-per-shard", str(args.samples_per_shard), "--quality", "95", "--format", "jpg",
                "--retries", "0", "--no-progress", *common,
            ]
            ours += ["--path-col", "path"] if source == "local" else ["--url-col", "url", "--allow-private-network"]
            peer = [
                PEER, "--url_list", dump, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
                "--output_format", "webdataset", "--output_folder", peer_out, "--processes_count", str(args.processes),
                "--thread_count", str(args.threads), "--number_sample_per_shard", str(args.samples_per_shard),
                "--encode_quality", "95", "--encode_format", "jpg", "--retries", "0", "--enable_wandb", "False",
                "--extract_exif", "False", "--compute_hash", "sha256", "--distributor", "multiprocessing",
                "--image_size", str(args.image_size), "--resize_mode", args.resize_mode,
            ]
            peer_env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(8192 * 8192), "NO_ALBUMENTATIONS_UPDATE": "1"}
            row = {"source": source, "images": len(paths)}
            for name, command, env, counter, out in (
                ("ours", ours, None, count_ours, ours_out),
                ("img2dataset", peer, peer_env, count_peer, peer_out),
            ):
                wall, peak, code, tail = measure(command, env)
                done = counter(out) if code == 0 else 0
                if code != 0:
                    print(f"{name} ({source}) failed with exit code {code}:\n{tail}")
                row[name] = {"seconds": round(wall, 2), "successes": done, "images_per_s": round(done / wall, 1),
                             "peak_rss_mib": round(peak)}
            ratio = row["ours"]["images_per_s"] / max(row["img2dataset"]["images_per_s"], 1e-9)
            row["speed_ratio"] = round(ratio, 2)
            results.append(row)
            print(json.dumps(row))
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(f"\n{'source':<7} {'tool':<12} {'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13}")
    for row in results:
        for name in ("ours", "img2dataset"):
            r = row[name]
            print(f"{row['source']:<7} {name:<12} {r['successes']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.1f} "
                  f"{r['peak_rss_mib']:>13}")
        print(f"{row['source']:<7} ratio ours/img2dataset images/s: {row['speed_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
