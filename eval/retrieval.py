"""Image -> text and text -> image retrieval recall@k on a captioned local data set.

    python eval/retrieval.py --model runs/tiny --dataset csv:data/captions.csv --output results/ret.json
    # wds: --dataset wds:DIR (dataset_type.txt = retrieval, captions one per line in txt)
"""

import argparse

from clipkit.eval.cli import add_model_args, finish, run_main
from clipkit.eval.datasets import SPEC_HELP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dataset", required=True, help=SPEC_HELP)
    parser.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    args = parser.parse_args()

    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.models import load_model
    from clipkit.eval.retrieval import run_retrieval

    dataset = build_dataset(args.dataset)
    loaded = load_model(args.model, args.pretrained, args.device)
    metrics = run_retrieval(loaded.model, loaded.tokenizer, loaded.preprocess, dataset, args.recall_k,
                            args.batch_size, args.workers, args.device, args.max_samples,
                            progress=not args.no_progress)
    finish(args, loaded, dataset.spec, "zeroshot_retrieval", metrics)


if __name__ == "__main__":
    run_main(main)
