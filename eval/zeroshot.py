"""Zero-shot classification of a local data set.

    python eval/zeroshot.py --model runs/tiny --dataset fashion-mnist:/usr/share/datasets/fashion-mnist:test \
        --templates openai --output results/zs.json
    # smoke-sized: --max-samples 500

Writes OUT.json (CLIP_benchmark's schema) and the confusion matrix as OUT.confusion.json / .png.
"""

import argparse

from clipkit.eval.cli import add_model_args, finish, run_main
from clipkit.eval.datasets import SPEC_HELP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dataset", required=True, help=SPEC_HELP)
    parser.add_argument("--templates", default="auto",
                        help="openai | simple | dataset | auto (the data set's own, else openai) | FILE (one {c} "
                             "template per line, or JSON: a list, or {classname: [prompts]} as in CuPL)")
    parser.add_argument("--classnames", default=None, help="file with one class name per line, in label order")
    parser.add_argument("--confusion", default=None,
                        help="prefix for the confusion matrix .json/.png (default: next to --output)")
    args = parser.parse_args()

    from clipkit.eval.datasets import build_dataset
    from clipkit.eval.metrics import save_confusion
    from clipkit.eval.models import load_model
    from clipkit.eval.templates import load_templates
    from clipkit.eval.zeroshot import run_zeroshot

    dataset = build_dataset(args.dataset, args.classnames)
    templates = load_templates(args.templates, dataset.templates)
    loaded = load_model(args.model, args.pretrained, args.device)
    metrics = run_zeroshot(loaded.model, loaded.tokenizer, loaded.preprocess, dataset, templates, args.batch_size,
                           args.workers, args.device, args.max_samples, progress=not args.no_progress)
    confusion = metrics.pop("confusion")
    prefix = args.confusion or (args.output[:-5] if args.output and args.output.endswith(".json") else args.output)
    extra = {}
    if prefix:
        extra["confusion_matrix"] = save_confusion(confusion, dataset.classnames, f"{prefix}.confusion")["json"]
    n_templates = len(templates) if isinstance(templates, list) else "per-class"
    finish(args, loaded, dataset.spec, "zeroshot_classification", metrics, templates=args.templates,
           num_templates=n_templates, **extra)


if __name__ == "__main__":
    run_main(main)
