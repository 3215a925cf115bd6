"""Precision and recall of a filter run against the corrupted-caption flags that make_shards.py --corrupt-fraction
records, plus the zero-shot top-1 of the runs trained before and after filtering.

    python examples/fashion_mnist/filter_report.py --input 'runs/fmnist_filter/noisy/shard-{000000..000003}.tar' \\
        --filtered runs/fmnist_filter/filtered --results runs/fmnist_filter/zs_all.json runs/fmnist_filter/zs_kept.json
"""

import argparse
import glob
import json
import os
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clipkit.data.urls import expand_urls  # noqa: E402


def corrupted_flags(spec: str) -> dict:
    flags = {}
    for path in expand_urls(spec):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    flags[member.name[:-5]] = json.loads(tar.extractfile(member).read())["corrupted"]
    return flags


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="the noisy shards (with json corrupted flags)")
    parser.add_argument("--filtered", required=True, help="filter_shards.py --output folder")
    parser.add_argument("--results", nargs="*", default=[], help="eval/zeroshot.py result JSONs to list")
    args = parser.parse_args(argv)
    flags = corrupted_flags(args.input)
    parquets = sorted(glob.glob(os.path.join(args.filtered, "*.parquet")))
    rows = [r for p in parquets for r in pq.read_table(p).to_pylist()]
    dropped = {r["key"] for r in rows if not r["kept"]}
    wrong = {k for k, v in flags.items() if v}
    hits = len(dropped & wrong)
    manifest = json.load(open(os.path.join(args.filtered, "manifest.json")))
    report = {"samples": len(rows), "corrupted": len(wrong), "dropped": len(dropped), "kept": len(rows) - len(dropped),
              "precision": hits / len(dropped) if dropped else None, "recall": hits / len(wrong) if wrong else None,
              "corrupted_among_kept": len(wrong - dropped) / max(1, len(rows) - len(dropped)),
              "min_clip_score": manifest["config"]["min_clip_score"],
              "top_fraction": manifest["config"]["top_fraction"]}
    for path in args.results:
        result = json.load(open(path))
        report[os.path.basename(path)] = {k: result["metrics"][k] for k in ("acc1", "acc5") if k in result["metrics"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
