"""Merges result JSONs (ours or CLIP_benchmark's) into one table.

    python eval/report.py results/*.json --csv results/all.csv --markdown results/all.md
    # a directory stands for every *.json in it; with neither flag the markdown table goes to stdout
"""

import argparse
from pathlib import Path

from clipkit.eval.cli import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result JSON files or directories")
    parser.add_argument("--csv", default=None, help="write the merged table as CSV")
    parser.add_argument("--markdown", default=None, help="write the merged table as markdown")
    args = parser.parse_args()

    from clipkit.eval.report import load_results, to_csv, to_markdown

    results = load_results(args.results)
    if not results:
        raise ValueError("no result files found")
    for path, text in ((args.csv, to_csv), (args.markdown, to_markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text(results), encoding="utf-8")
            print(f"wrote {path} ({len(results)} results)")
    if not args.csv and not args.markdown:
        print(to_markdown(results), end="")


if __name__ == "__main__":
    run_main(main)
