"""Command line of `python data_prep/filter_shards.py` (also under `accelerate launch` for multi-process scoring).

    python data_prep/filter_shards.py --input 'shards/{00000..00099}.tar' --output filtered/ --model runs/tiny \\
        --top-fraction 0.3 --min-caption-words 3 --min-caption-chars 6 --caption-language en
    python data_prep/filter_shards.py --input ... --output scored/ --model runs/tiny --scores-only
    python data_prep/filter_shards.py --input ... --output filtered/ --from-scores scored/scores --min-clip-score 0.25
"""

import argparse
import math
import sys
from typing import List

from clipkit.data_prep.filter.config import FilterConfig


def build_parser() -> argparse.ArgumentParser:
    from clipkit.eval.cli import MODEL_HELP

    p = argparse.ArgumentParser(prog="filter_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="shard spec: brace-expanded local tar paths")
    p.add_argument("--output", required=True, help="output folder (shards in build_shards' layout, scores/, PNG)")
    m = p.add_argument_group("CLIP score")
    m.add_argument("--model", help=MODEL_HELP)
    m.add_argument("--pretrained", help="weights file for a model config name")
    m.add_argument("--min-clip-score", type=float, help="drop samples whose cosine(image, caption) is below this")
    m.add_argument("--top-fraction", type=float, help="keep this fraction of the whole input, highest scores first")
    m.add_argument("--scores-only", action="store_true", help="write OUTPUT/scores and the histogram, then stop")
    m.add_argument("--from-scores", help="reuse a scores/ folder of an earlier run (no model, no re-embedding)")
    m.add_argument("--batch-size", type=int, default=256, help="images per forward")
    m.add_argument("--threads", type=int, default=4, help="decode threads while scoring")
    m.add_argument("--device", default="auto", help="auto (this process's GPU if any), cpu, cuda, cuda:N")
    r = p.add_argument_group("rules (DataComp's basic filtering: words > 2, chars > 5, side > 200, aspect < 3, en)")
    r.add_argument("--min-caption-words", type=int, default=0)
    r.add_argument("--min-caption-chars", type=int, default=0)
    r.add_argument("--min-image-side", type=int, default=0, help="smaller side of the stored image, pixels")
    r.add_argument("--max-aspect-ratio", type=float, default=math.inf, help="larger side / smaller side")
    r.add_argument("--caption-language", default="", help="comma-separated ISO 639-1 codes to keep, e.g. en,de "
                                                         "(py3langid, offline)")
    w = p.add_argument_group("writing")
    w.add_argument("--workers", type=int, default=0, help="processes (0: one per core; 1: in this process)")
    w.add_argument("--distributor", choices=("multiprocessing", "ray"), default="multiprocessing")
    w.add_argument("--ray-address", help="Ray cluster address (default: a local Ray instance)")
    w.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> FilterConfig:
    return FilterConfig(
        input=args.input, output=args.output, model=args.model, pretrained=args.pretrained,
        min_clip_score=args.min_clip_score, top_fraction=args.top_fraction,
        min_caption_words=args.min_caption_words, min_caption_chars=args.min_caption_chars,
        min_image_side=args.min_image_side, max_aspect_ratio=args.max_aspect_ratio,
        caption_language=[c.strip() for c in args.caption_language.split(",") if c.strip()],
        scores_only=args.scores_only, from_scores=args.from_scores, batch_size=args.batch_size,
        threads=args.threads, device=args.device, workers=args.workers, distributor=args.distributor,
        ray_address=args.ray_address, progress=not args.no_progress)


def main(argv: List[str] | None = None) -> int:
    """0: every shard written; 1: a shard failed (run again to retry); 2: bad input or settings (nothing done)."""
    args = build_parser().parse_args(argv)
    from clipkit.data_prep.filter.pipeline import filter_shards

    try:
        manifest = filter_shards(config_from_args(args))
    except (ValueError, FileNotFoundError) as e:  # FilterError, or a model SPEC that does not load
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete shards and scores are kept; run the same command to resume", file=sys.stderr)
        return 130
    return 1 if manifest and manifest.get("failed_shards") else 0
