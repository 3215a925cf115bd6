"""Scaling-law sweep: `python train/sweep.py --config sweep.yaml [--launcher local|ray|slurm]`.

Thin entry point over clipkit.train.sweep (see its docstring and examples/sweep/ for a config).
"""

import argparse
import sys

from clipkit.train.sweep import LAUNCHERS, SweepError, load_sweep_config, run_sweep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML: train_data, eval_data, models, samples, "
                                                        "batch_size, output_dir; optional lrs, train:, eval:, ...")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None, help="overrides the YAML's launcher")
    parser.add_argument("--output-dir", default=None, help="overrides the YAML's output_dir")
    parser.add_argument("--samples", default=None, help="overrides the YAML's samples: comma-separated, 128,256")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (--launcher ray)")
    args = parser.parse_args(argv)
    try:
        samples = [s for s in args.samples.split(",") if s.strip()] if args.samples else None
        cfg = load_sweep_config(args.config, launcher=args.launcher, output_dir=args.output_dir, samples=samples)
        if args.ray_address:
            cfg.ray["address"] = args.ray_address
        summary = run_sweep(cfg)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
