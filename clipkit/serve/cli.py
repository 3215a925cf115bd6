"""Command lines of `serve/app.py` and `serve/export_onnx.py`."""

import argparse
import logging
from typing import List

from clipkit.eval.cli import MODEL_HELP


def serve_parser() -> argparse.ArgumentParser:
    from clipkit.serve.config import ServeConfig

    d = ServeConfig(index="", model="")
    p = argparse.ArgumentParser(prog="serve/app.py", description="Embeddings (OpenAI-compatible /v1/embeddings), "
                                "search (clip-retrieval-compatible /knn-service), images and the explorer page of "
                                "one index. API docs at /docs.")
    p.add_argument("--index", required=True, help="index directory (index/embed.py --output, then index/build.py)")
    p.add_argument("--model", required=True, help=MODEL_HELP + "; must be the model that embedded the index")
    p.add_argument("--pretrained", default=None, help="weights file for a model name")
    p.add_argument("--host", default=d.host, help="address to bind (loopback unless you say otherwise)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--device", default=d.device)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all routes but /health)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help="inputs per /v1/embeddings request")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="checked from the image header")
    p.add_argument("--max-results", type=int, default=d.max_results, help="results / ids per search request")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="fetch image_url inputs (public http(s) addresses only, through the SSRF guard)")
    p.add_argument("--allow-private-network", action="store_true",
                   help="with --allow-url-fetch: let URLs reach loopback and private addresses")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="inputs per model forward")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits to fill")
    p.add_argument("--onnx", action="store_true", help="serve the encoders on onnxruntime (exported on first use)")
    p.add_argument("--onnx-dir", default=None, help="where the ONNX export lives (default: INDEX/onnx)")
    p.add_argument("--mmap", default=None, choices=("yes", "no"),
                   help="memory-map the FAISS indexes (default: those over 256 MiB)")
    p.add_argument("--cors-origin", action="append", default=[], dest="cors_origins",
                   help="allow browser pages from this origin (repeatable; '*' for clip-retrieval's hosted front)")
    p.add_argument("--log-level", default=d.log_level)
    return p


def serve_main(argv: List[str] | None = None) -> None:
    args = serve_parser().parse_args(argv)
    from clipkit.serve.config import ServeConfig

    fields = {k: v for k, v in vars(args).items()}
    fields["mmap"] = None if args.mmap is None else args.mmap == "yes"
    config = ServeConfig(**fields)
    for name in ("max_body_bytes", "max_inputs", "max_text_chars", "max_image_pixels", "max_results", "max_batch"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from clipkit.serve.app import create_app

    app = create_app(config)
    svc = app.state.service
    print(f"serving {svc.index.name} ({svc.count} samples, model {svc.encoder.name}, {svc.encoder.backend}) at "
          f"http://{config.host}:{config.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False)


def export_main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="serve/export_onnx.py", description="Exports both encoders to ONNX "
                                "(image.onnx, text.onnx, onnx.json) and checks parity with torch.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--output", required=True, help="output directory (serve/app.py --onnx-dir)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |onnx - torch| accepted")
    args = p.parse_args(argv)
    from clipkit.eval.models import load_model
    from clipkit.index.fingerprint import model_config_of, model_fingerprint
    from clipkit.serve.onnx_export import export_onnx

    loaded = load_model(args.model, args.pretrained, "cpu")
    manifest = export_onnx(loaded, model_fingerprint(loaded), int(model_config_of(loaded)["embed_dim"]), args.output,
                           args.tolerance)
    print(f"wrote {args.output}/image.onnx, text.onnx; max |onnx - torch|: image "
          f"{manifest['parity']['image_max_abs_diff']:.1e}, text {manifest['parity']['text_max_abs_diff']:.1e}")
