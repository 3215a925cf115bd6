"""Settings of one service instance (one field per `serve/app.py` flag)."""

from dataclasses import dataclass, field
from typing import List

from clipkit.images import DEFAULT_MAX_PIXELS


@dataclass
class ServeConfig:
    index: str  # index directory (index/embed.py --output, then index/build.py)
    model: str  # model SPEC, as for eval: run dir, final/, local-dir:DIR, or a config name with `pretrained`
    pretrained: str | None = None
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    device: str = "cpu"
    api_key: str | None = None  # Bearer key required on every route but /health and the page's static files
    max_body_bytes: int = 16 << 20  # request body cap (base64 images included)
    max_inputs: int = 256  # inputs per /v1/embeddings request
    max_text_chars: int = 2000  # characters per text input (the tokenizer keeps the first context_length tokens)
    max_image_pixels: int = min(DEFAULT_MAX_PIXELS, 40_000_000)  # from the header, before decoding
    max_results: int = 10000  # num_images / num_result_ids / ids per request (clip-retrieval's front asks 3000)
    allow_url_fetch: bool = False  # image_url inputs: fetched through the data-prep SSRF guard when on
    allow_private_network: bool = False  # with allow_url_fetch: let URLs reach loopback/private addresses
    fetch_timeout: float = 10.0
    max_batch: int = 64  # inputs per model forward
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    onnx: bool = False  # serve the encoders on onnxruntime (exported by serve/export_onnx.py)
    onnx_dir: str | None = None  # default: INDEX/onnx/
    mmap: bool | None = None  # memory-map the FAISS indexes (default: when larger than 256 MiB)
    cors_origins: List[str] = field(default_factory=list)  # e.g. ["*"] for clip-retrieval's hosted front
    log_level: str = "info"
