"""Shared command-line pieces of the eval entry points (`eval/*.py`)."""

import argparse
import os
import sys
from typing import Dict

from clipkit.eval.report import format_result, make_result, write_result

MODEL_HELP = ("a clipkit run dir or its final/ dir (open_clip export), local-dir:DIR, or an open_clip model name / "
              "JSON config with --pretrained FILE")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--pretrained", default=None, help="weights file (.safetensors or torch) for a model name")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="data loader processes (decode + resize)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--output", default=None, help="result JSON (CLIP_benchmark's schema)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def limit_heap_fragmentation() -> None:
    """Serves allocations of 64 KiB and more with mmap (glibc's M_MMAP_THRESHOLD), inherited by forked loader workers.

    glibc's default threshold rises to the largest block freed, so the ~6 MB batch tensors end up in the heap, which
    fragments around them: RSS then drifted by 2-6 KB per image over 50,000 images (reliability suite, property 15).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def run_main(main) -> None:
    """Runs `main()`; a bad input (ValueError, FileNotFoundError) exits with its message, not a traceback."""
    limit_heap_fragmentation()
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def finish(args: argparse.Namespace, loaded, dataset: str, task: str, metrics: Dict, **extra) -> Dict:
    """Builds the result, prints its table, writes --output when given."""
    rejected = metrics.pop("rejected", None)
    if rejected:
        extra["rejected"] = rejected
    result = make_result(dataset, loaded.name, loaded.pretrained, task, metrics, **extra)
    print(format_result(result))
    if args.output:
        write_result(result, args.output)
        print(f"wrote {args.output}")
    return result


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    """Model args plus the labelled train/test sets of the linear probe and kNN."""
    from clipkit.eval.datasets import SPEC_HELP

    add_model_args(parser)
    parser.add_argument("--train-dataset", required=True, help=SPEC_HELP)
    parser.add_argument("--test-dataset", required=True, help=SPEC_HELP)
    parser.add_argument("--max-train-samples", type=int, default=None)


def probe_features(args: argparse.Namespace) -> tuple:
    """(loaded model, train ImageFeatures, test ImageFeatures, num_classes) for the linear probe and kNN."""
    from clipkit.eval.features import labelled_features
    from clipkit.eval.models import load_model

    loaded = load_model(args.model, args.pretrained, args.device)
    train, test, num_classes = labelled_features(
        loaded, args.train_dataset, args.test_dataset, args.batch_size, args.workers, args.device,
        args.max_train_samples, args.max_samples, progress=not args.no_progress)
    return loaded, train, test, num_classes
