"""Linear probe (logistic regression on frozen image features, CPU L-BFGS; weight decay chosen on a held-out part of
the training set).

    python eval/linear_probe.py --model runs/tiny \
        --train-dataset fashion-mnist:/usr/share/datasets/fashion-mnist:train \
        --test-dataset fashion-mnist:/usr/share/datasets/fashion-mnist:test --output results/lp.json
    # smoke-sized: --max-train-samples 2000 --max-samples 1000
"""

import argparse

from clipkit.eval.cli import add_probe_args, finish, probe_features, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_args(parser)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out to choose wd")
    parser.add_argument("--wd", type=float, nargs="+", default=None, help="weight decay grid (default 1e-6 .. 1)")
    parser.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations per fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from clipkit.eval.linear_probe import DEFAULT_WD_GRID, linear_probe

    loaded, train, test, num_classes = probe_features(args)
    metrics = linear_probe(train.features, train.labels, test.features, test.labels, num_classes,
                           args.wd or DEFAULT_WD_GRID, args.val_fraction, args.seed, args.max_iter,
                           progress=not args.no_progress)
    metrics.pop("confusion")
    val_acc = metrics.pop("val_acc1")
    finish(args, loaded, test.spec, "linear_probe", metrics, train_dataset=train.spec, val_acc1=val_acc,
           rejected_train=train.rejects.as_dict())


if __name__ == "__main__":
    run_main(main)
