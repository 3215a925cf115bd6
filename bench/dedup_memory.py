"""Memory of the cross-shard --dedup pass: first-occurrence lookup of N sha256 digests through a Python dict (what the
pass used before) and through clipkit's on-disk `FirstSeen` table, each in its own process. img2dataset has no dedup
to compare with.

    python bench/dedup_memory.py --rows 2000000
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def child(mode: str, rows: int) -> None:
    from clipkit.data_prep.pipeline import FirstSeen

    base, start = rss_mb(), time.perf_counter()
    if mode == "dict":
        seen = {}
        first = lambda digest, key: seen.setdefault(digest, key)  # noqa: E731
    else:
        table = FirstSeen(os.path.join(tempfile.mkdtemp(), "_dedup.sqlite"))
        first = table.first
    for i in range(rows):
        first(hashlib.sha256(i.to_bytes(8, "little")).hexdigest(), f"{i:09d}")
    print(f"{mode:7s} {rows} digests: {time.perf_counter() - start:6.1f} s, RSS +{rss_mb() - base:5.0f} MB "
          f"({(rss_mb() - base) * 2**20 / rows:.0f} bytes per image)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--child", choices=("dict", "sqlite"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.rows)
    for mode in ("dict", "sqlite"):
        subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(a.rows)], check=True)


if __name__ == "__main__":
    main()
