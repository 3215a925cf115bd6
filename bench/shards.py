"""Shard building: clipkit's data_prep vs img2dataset 1.47 on the same dump, same image size and resize mode.

    python bench/shards.py --images 5000            # both sources: local files and HTTP from 127.0.0.1
    python bench/shards.py --images 300 --sources local   # smoke

Needs img2dataset in its own venv (it pins webdataset<0.3):
    python3 -m venv .venv-peers-img2dataset && .venv-peers-img2dataset/bin/pip install img2dataset==1.47.0

Local files: ours reads `--path-col`, img2dataset (no path input) reads the same files as file:// URLs.
HTTP: both fetch from one keep-alive HTTP/1.1 file server on 127.0.0.1 running in its own process.
images/s = successful samples / wall time of the whole command (start-up included, the same for both), best of
`--repeats` interleaved runs; CPU ms/img = user+sys CPU of the whole process tree per image (less sensitive to other
load on a shared machine); peak memory = the highest sum of RSS over the process tree, sampled every 50 ms.
"""

import argparse
import glob
import io
import json
import os
import resource
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
    """Runs `command`; returns (wall s, CPU s of the whole tree, peak tree RSS MiB, returncode, output tail)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the workers: each parent reaps its children
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    reader.join(timeout=10)
    return wall, cpu, peak / 2**20, process.returncode, log.getvalue().decode(errors="replace")[-2000:]


def count_successes(output: str) -> int:
    """Both tools write NNNNN_stats.json with a `successes` count per shard."""
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
    p.add_argument("--repeats", type=int, default=2, help="runs per tool and source; the best is reported")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--calibration", help="write ours' measured rates into this planner calibration file (clipkit.plan)")
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
            tools = {"ours": (ours, None, ours_out), "img2dataset": (peer, peer_env, peer_out)}
            runs = {name: [] for name in tools}
            for repeat in range(args.repeats):  # interleaved, order swapped each round: shared-machine noise
                for name in list(tools)[:: 1 if repeat % 2 == 0 else -1]:
                    command, env, out = tools[name]
                    subprocess.run(["rm", "-rf", out], check=True)
                    wall, cpu, peak, code, tail = measure(command, env)
                    done = count_successes(out) if code == 0 else 0
                    if code != 0:
                        print(f"{name} ({source}) failed with exit code {code}:\n{tail}")
                    runs[name].append({"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "successes": done,
                                       "images_per_s": round(done / wall, 1), "peak_rss_mib": round(peak)})
                    print(json.dumps({"source": source, "tool": name, **runs[name][-1]}), flush=True)
            for name, tool_runs in runs.items():
                best = max(tool_runs, key=lambda r: r["images_per_s"])
                cpu_ms = round(1000 * best["cpu_seconds"] / max(best["successes"], 1), 2)
                row[name] = {**best, "cpu_ms_per_image": cpu_ms,
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in tool_runs),
                             "all_images_per_s": [r["images_per_s"] for r in tool_runs]}
            row["speed_ratio"] = round(row["ours"]["images_per_s"] / max(row["img2dataset"]["images_per_s"], 1e-9), 2)
            cpu_ratio = row["img2dataset"]["cpu_ms_per_image"] / max(row["ours"]["cpu_ms_per_image"], 1e-9)
            row["cpu_ratio"] = round(cpu_ratio, 2)
            results.append(row)
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(f"\n{'source':<7} {'tool':<12} {'images':>7} {'seconds':>8} {'images/s':>9} {'CPU ms/img':>11} "
          f"{'peak RSS MiB':>13}   (best of {args.repeats} interleaved runs)")
    for row in results:
        for name in ("ours", "img2dataset"):
            r = row[name]
            print(f"{row['source']:<7} {name:<12} {r['successes']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>9.1f} "
                  f"{r['cpu_ms_per_image']:>11.2f} {r['peak_rss_mib']:>13}")
        print(f"{row['source']:<7} ours/img2dataset: {row['speed_ratio']:.2f}x images/s, "
              f"{row['cpu_ratio']:.2f}x less CPU per image")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.calibration:
        from clipkit.plan.calibration import write_section

        write_section(args.calibration, "shards", shard_calibration(results, args))
        print(f"wrote shards to {args.calibration}")


def shard_calibration(results: list, args) -> dict:
    """Ours per source: best images/s, CPU seconds per image, bytes per sample of the shards it wrote; the planner
    uses the HTTP source when measured (closest to a real URL dump)."""
    sources = {}
    for row in results:
        out = os.path.join(args.work, f"ours_{row['source']}")
        tar_bytes = sum(os.path.getsize(t) for t in glob.glob(os.path.join(out, "*.tar")))
        ours = row["ours"]
        sources[row["source"]] = {
            "images_per_s": ours["images_per_s"], "cpu_s_per_image": ours["cpu_ms_per_image"] / 1e3,
            "bytes_per_sample": tar_bytes / max(ours["successes"], 1), "processes": args.processes,
            "threads": args.threads}
    chosen = "http" if "http" in sources else next(iter(sources))
    return {"sources": sources, "source": chosen, "image_size": args.image_size, "resize_mode": args.resize_mode,
            **{k: sources[chosen][k] for k in ("cpu_s_per_image", "bytes_per_sample", "images_per_s")}}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
