"""The FastAPI app: `create_app(config)` builds it with no globals; model, index and settings arrive by argument.

Routes: OpenAI-compatible /v1/embeddings and /v1/models; clip-retrieval-compatible /knn-service, /metadata and
/indices-list; /images/{id}; /health; /metrics; the explorer page at / (static files, no key needed to load it;
its API calls carry the key). Interactive API docs at /docs.
"""

import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI

from clipkit.index.search import IndexDir
from clipkit.serve.auth import api_key_dependency
from clipkit.serve.batching import MicroBatcher
from clipkit.serve.config import ServeConfig
from clipkit.serve.errors import install_error_handlers
from clipkit.serve.limits import BodyLimit
from clipkit.serve.metrics import Metrics, MetricsMiddleware
from clipkit.serve.service import Service

log = logging.getLogger("clipkit.serve")
STATIC_DIR = Path(__file__).parent / "static"


class ModelMismatch(ValueError):
    pass


def load_encoder(config: ServeConfig):
    """The torch (or, with config.onnx, onnxruntime) encoder of config.model, with its fingerprint."""
    from clipkit.eval.models import load_model
    from clipkit.index.fingerprint import model_config_of, model_fingerprint
    from clipkit.serve.encoders import OnnxEncoder, TorchEncoder

    loaded = load_model(config.model, config.pretrained, "cpu")
    fingerprint = model_fingerprint(loaded)
    dim = int(model_config_of(loaded)["embed_dim"])
    if not config.onnx:
        return TorchEncoder(loaded.model, loaded.tokenizer, loaded.preprocess, fingerprint, loaded.name, dim,
                            config.device)
    from clipkit.serve.onnx_export import export_onnx, read_onnx_manifest

    onnx_dir = Path(config.onnx_dir or Path(config.index) / "onnx")
    manifest = read_onnx_manifest(onnx_dir)
    if manifest is None or manifest.get("fingerprint") != fingerprint:
        log.info("exporting %s to ONNX in %s", config.model, onnx_dir)
        export_onnx(loaded, fingerprint, dim, onnx_dir)
    return OnnxEncoder(onnx_dir, loaded.tokenizer, loaded.preprocess, fingerprint, loaded.name, dim)


def check_model(index: IndexDir, encoder: Any, spec: str) -> None:
    if index.fingerprint != encoder.fingerprint:
        built = index.manifest["model"]
        raise ModelMismatch(
            f"index {index.dir} was built by model {built.get('spec') or built.get('name')!r} (fingerprint "
            f"{index.fingerprint[:12]}), not by --model {spec} ({encoder.fingerprint[:12]}): serve it with the model "
            "that embedded it, or embed the data again with this model")


def create_app(config: ServeConfig, encoder: Any = None, index: IndexDir | None = None) -> FastAPI:
    """The service for `config`. `encoder` / `index` may be passed in already loaded (tests, benchmarks)."""
    from clipkit.serve import routes_knn, routes_misc, routes_openai

    index = index or IndexDir(config.index, mmap=config.mmap)
    encoder = encoder or load_encoder(config)
    check_model(index, encoder, config.model)
    metrics = Metrics()
    batcher = MicroBatcher(encoder.encode, config.max_batch, config.max_wait_ms / 1000,
                           on_batch=lambda kind, n: metrics.batch_size.labels(kind).observe(n))
    fetcher = None
    if config.allow_url_fetch:
        from clipkit.data_prep.fetch import FetchOptions, HttpFetcher

        fetcher = HttpFetcher(FetchOptions(timeout=config.fetch_timeout, retries=0, max_bytes=config.max_body_bytes,
                                           allow_private_network=config.allow_private_network))
    service = Service(config, encoder, index, batcher, metrics, fetcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="clipkit embeddings service", version="1", lifespan=lifespan,
                  description="Embeddings (OpenAI-compatible), search (clip-retrieval-compatible) and images of one "
                              f"index ({index.name}, {index.store.count} samples).")
    app.state.service = service
    install_error_handlers(app)
    guard = [Depends(api_key_dependency(config.api_key))]
    for router in (routes_openai.router, routes_knn.router, routes_misc.router):
        app.include_router(router, dependencies=guard)
    app.include_router(routes_misc.health_router)
    _add_explorer(app, guard)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _add_explorer(app: FastAPI, guard) -> None:
    """The explorer page (clipkit/serve/static) and its data routes, when the package ships the page."""
    if not (STATIC_DIR / "index.html").is_file():
        return
    from clipkit.serve import routes_explorer

    app.include_router(routes_explorer.router, dependencies=guard)
    routes_explorer.mount_static(app, STATIC_DIR)
