"""A training run as one self-contained HTML page: curves, final metrics, confusion matrix, per-class recall, a
retrieval strip and the resolved config. Several runs: curves overlaid, metrics side by side.

    python eval/report_html.py runs/tiny results/zs.json -o report.html
    python eval/report_html.py runs/tiny --dataset fashion-mnist:/usr/share/datasets/fashion-mnist:test
    python eval/report_html.py runs/a runs/b results/ -o compare.html     # compare runs
    # arguments that are run dirs (with metrics.jsonl) come first; then result JSONs or directories of them
"""

import argparse
from pathlib import Path

from clipkit.eval.cli import run_main


def split_paths(paths):
    """(run dirs, eval result paths): the first path and every directory with metrics.jsonl is a run; a .json path or
    another directory is an eval result; anything else (a missing path) is taken as a run, so its error says so."""
    runs, results = [], []
    for p in paths:
        path = Path(p)
        if path.suffix == ".json" or (path.is_dir() and not (path / "metrics.jsonl").exists() and runs):
            results.append(p)
        else:
            runs.append(p)
    return runs, results


def main() -> None:
    from clipkit.eval.datasets import SPEC_HELP

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_EVAL_JSON",
                        help="run dirs (train/main.py --output-dir), then eval result JSONs or dirs of them")
    parser.add_argument("-o", "--output", default=None, help="HTML file (default: RUN/report.html for one run, "
                                                             "./report.html for several)")
    parser.add_argument("--dataset", default=None, help=f"eval set for the retrieval strip: {SPEC_HELP} (default: "
                                                        "the run's --zeroshot-data, if any)")
    parser.add_argument("--query", action="append", default=None, help="text query for the strip (repeatable; "
                                                                       "default: class prompts or sample captions)")
    parser.add_argument("--max-images", type=int, default=200, help="images sampled for the retrieval strip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-strip", action="store_true", help="skip the retrieval strip (no model is loaded)")
    args = parser.parse_args()

    from clipkit.report import write_run_report

    runs, results = split_paths(args.paths)
    if not runs:
        raise ValueError("no run directory given: the first arguments must be run dirs (with metrics.jsonl)")
    out = write_run_report(runs, results, args.output, dataset=args.dataset, queries=args.query,
                           max_images=args.max_images, device=args.device, strip=not args.no_strip)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
