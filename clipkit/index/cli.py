"""Command lines of `index/embed.py` and `index/build.py`."""

import argparse
import os
import sys
from pathlib import Path
from typing import List

from clipkit.eval.cli import MODEL_HELP, run_main

EMBED_EXAMPLE = """
    python index/embed.py --model runs/tiny --data 'shards/{00000..00099}.tar' --output emb/
    accelerate launch --num_processes 8 index/embed.py --model runs/tiny --data 'shards/{00000..00999}.tar' \\
        --output emb/
    python index/build.py emb/ --max-index-memory 4G
"""


def embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="index/embed.py", description="Image and caption embeddings of every sample "
                                "of a set of WebDataset shards (float16 .npy parts + metadata parquet), resumable."
                                + EMBED_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--pretrained", default=None, help="weights file (.safetensors or torch) for a model name")
    p.add_argument("--data", required=True, help="shard spec: brace-expanded paths or http(s) URLs, joined with ::")
    p.add_argument("--output", required=True, help="output directory (a rerun with the same arguments resumes)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="loader processes per rank")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: this rank's GPU under accelerate, else cpu")
    p.add_argument("--max-pixels", type=int, default=None, help="reject larger images (header check), default 8192^2")
    p.add_argument("--no-progress", action="store_true")
    return p


def embed_main(argv: List[str] | None = None) -> None:
    args = embed_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    import torch
    from accelerate import PartialState

    from clipkit.data.urls import _local_path, count_samples, expand_urls
    from clipkit.eval.models import load_model
    from clipkit.images import DEFAULT_MAX_PIXELS
    from clipkit.index.embed import RUN_FILE, EmbedSettings, Encoder, check_run, embed_parts, finalize, write_json
    from clipkit.index.fingerprint import model_config_of, model_identity

    # cpu=True on a machine without CUDA too: otherwise accelerate leaves every launched process alone (world 1)
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = args.device or str(state.device)
    shards = [os.path.abspath(_local_path(u)) if _local_path(u) is not None else u for u in expand_urls(args.data)]
    settings = EmbedSettings(batch_size=args.batch_size, workers=max(0, args.workers), precision=args.precision,
                             max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    loaded = load_model(args.model, args.pretrained, "cpu")
    encoder = Encoder(loaded.model, device, settings.precision)
    dim = int(model_config_of(loaded)["embed_dim"])
    run = {"fingerprint": None, "model": model_identity(loaded, args.model), "dim": dim, "shards": shards,
           "settings": {"batch_size": settings.batch_size, "precision": encoder.precision,
                        "max_pixels": settings.max_pixels, "caption_max_chars": settings.caption_max_chars}}
    run["fingerprint"] = run["model"]["fingerprint"]
    out = Path(args.output)
    check_run(out, run)
    if state.is_main_process and not (out / RUN_FILE).is_file():
        write_json(out / RUN_FILE, run)
    state.wait_for_everyone()
    mine = [(p, u) for p, u in enumerate(shards) if p % state.num_processes == state.process_index]
    total = count_samples([u for _, u in mine]) if mine and all(_local_path(u) for _, u in mine) else None
    counts = embed_parts(encoder, mine, out, loaded.preprocess, loaded.tokenizer, settings, dim,
                         progress=not args.no_progress and state.is_local_main_process, total_samples=total)
    if counts:
        bad = {k: v for k, v in sorted(counts.items()) if k != "ok"}
        print(f"rank {state.process_index}: embedded {counts.get('ok', 0)} samples of {len(mine)} parts; "
              f"skipped {sum(bad.values())} {bad or ''}".rstrip(), flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        summary = finalize(out, shards)
        rejected = summary["rejected"]
        print(f"{out}: {summary['count']} samples in {len(shards)} parts, dim {dim}; rejected "
              f"{sum(rejected.values())} {rejected or ''}".rstrip())
        print(f"next: python index/build.py {out}")
    state.wait_for_everyone()


def build_parser() -> argparse.ArgumentParser:
    from clipkit.index.build import KINDS

    p = argparse.ArgumentParser(prog="index/build.py", description="FAISS indexes (image and text) over the "
                                "embeddings index/embed.py wrote, with recall@10 against exact search.")
    p.add_argument("dir", help="the --output of index/embed.py; image.index, text.index and index.json go there")
    p.add_argument("--kind", default="auto", choices=KINDS,
                   help="auto: exact search up to 100k vectors, else HNSW or IVF-PQ within --max-index-memory")
    p.add_argument("--max-index-memory", default="4G", help="memory budget of one index (e.g. 4G, 512M)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall@10 and tuning")
    p.add_argument("--rerank", type=int, default=None,
                   help="re-rank R*k candidates exactly (default: 4 for ivfpq, none otherwise)")
    p.add_argument("--modalities", nargs="+", default=["image", "text"])
    p.add_argument("--map", default="auto", choices=("auto", "umap", "pca", "none"),
                   help="2-D map of the image embeddings for the explorer (auto: UMAP up to 200k points, else PCA)")
    p.add_argument("--no-map", action="store_const", const="none", dest="map", help="same as --map none")
    return p


def build_main(argv: List[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from clipkit.index.build import BuildSettings, build_indexes, check_modalities, parse_memory

    settings = BuildSettings(kind=args.kind, max_index_memory=parse_memory(args.max_index_memory),
                             queries=args.queries, rerank=args.rerank, modalities=check_modalities(args.modalities))
    build_indexes(args.dir, settings)
    if args.map != "none":
        from clipkit.index.projection import write_map

        info = write_map(args.dir, args.map)
        print(f"map: {info['method']} of {info['count']} image embeddings -> {Path(args.dir) / info['file']}")
    print(f"serve it: python serve/app.py --index {args.dir} --model MODEL")


def main_embed() -> None:
    run_main(embed_main)


def main_build() -> None:
    run_main(build_main)


if __name__ == "__main__":
    sys.exit("use index/embed.py or index/build.py")
