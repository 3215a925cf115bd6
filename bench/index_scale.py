"""Index scale: 1,000,000 random 512-d vectors in an IVF-PQ index (index/build.py's code path).

    flock /tmp/clipkit-heavy.lock python bench/index_scale.py --n 1000000 --dim 512 --out /tmp/scale
    # smoke-sized: --n 20000

Prints build time, peak memory of the build, index size, recall@10 against exact search on 1000 held-out queries
(independent random vectors, so not in the index) with and without exact re-ranking, the RSS of a service-style
memory-mapped load, and single-query latency (p50 / p99). Random vectors are the hard case for any ANN index (no
cluster structure), so recall here is a floor, not what real embeddings get.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit(rng, n, dim):
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_vectors(out: str, n: int, dim: int) -> None:
    from clipkit.index.embed import write_arrays

    rng = np.random.default_rng(0)
    image = unit(rng, n, dim)
    text = unit(rng, n, dim)  # the held-out queries come from here: independent of the indexed vectors
    write_arrays(out, image, text, {"fingerprint": "random", "name": "random"}, rows_per_part=250_000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--out", default="/tmp/clipkit_index_scale")
    p.add_argument("--max-index-memory", default="512M")
    p.add_argument("--queries", type=int, default=1000)
    args = p.parse_args()

    from clipkit.index.build import BuildSettings, build_indexes, parse_memory
    from clipkit.index.search import IndexDir

    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    # written by a child process, so this process's peak RSS measures the index build alone
    child = multiprocessing.get_context("fork").Process(target=write_vectors, args=(args.out, args.n, args.dim))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the vectors failed ({child.exitcode})")
    print(f"wrote {args.n} x {args.dim} float16 vectors in {time.perf_counter() - t0:.0f} s", flush=True)
    before = peak_mb()
    rss0 = rss_mb()
    manifest = build_indexes(args.out, BuildSettings(kind="ivfpq", max_index_memory=parse_memory(
        args.max_index_memory), queries=args.queries, modalities=["image"]))
    info = manifest["indexes"]["image"]
    build_peak = peak_mb()
    index = IndexDir(args.out, mmap=True)
    rss_loaded = rss_mb()
    q = unit(np.random.default_rng(1), 1000, args.dim)
    lat = []
    for row in q:
        t = time.perf_counter()
        index.search("image", row[None, :], 10)
        lat.append(1000 * (time.perf_counter() - t))
    result = {"n": args.n, "dim": args.dim, "factory": info["factory"], "params": info["params"],
              "rerank": info["rerank"], "build_s": info["build_s"], "index_mib": round(info["size_bytes"] / 2**20, 1),
              "recall@10": info["recall@10"], "recall@10_without_rerank": info["recall@10_without_rerank"],
              "tuning": info["tuning"], "build_peak_rss_mib": round(build_peak, 0),
              "rss_before_build_mib": round(rss0, 0), "peak_before_build_mib": round(before, 0),
              "rss_after_mmap_load_mib": round(rss_loaded, 0), "query_ms_p50": round(float(np.percentile(lat, 50)), 3),
              "query_ms_p99": round(float(np.percentile(lat, 99)), 3), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
