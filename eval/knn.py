"""k-nearest-neighbour classification on frozen image features (cosine, votes weighted by exp(sim / T), DINO).

    python eval/knn.py --model runs/tiny --train-dataset fashion-mnist:/usr/share/datasets/fashion-mnist:train \
        --test-dataset fashion-mnist:/usr/share/datasets/fashion-mnist:test --k 20 --output results/knn.json
"""

import argparse

from clipkit.eval.cli import add_probe_args, finish, probe_features, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_args(parser)
    parser.add_argument("--k", type=int, default=20, help="neighbours")
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args()

    from clipkit.eval.knn import knn_classify

    loaded, train, test, num_classes = probe_features(args)
    metrics = knn_classify(train.features, train.labels, test.features, test.labels, num_classes, args.k,
                           args.temperature)
    metrics.pop("confusion")
    metrics["k"] = args.k
    finish(args, loaded, test.spec, "knn", metrics, train_dataset=train.spec, temperature=args.temperature,
           rejected_train=train.rejects.as_dict())


if __name__ == "__main__":
    run_main(main)
