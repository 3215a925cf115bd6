"""What the routes share: the encoder behind its batcher, the index, the metadata, the URL fetcher, the limits."""

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import anyio
import numpy as np

from clipkit.index.search import IndexDir
from clipkit.serve.batching import MicroBatcher
from clipkit.serve.config import ServeConfig
from clipkit.serve.errors import APIError
from clipkit.serve.inputs import image_tensor
from clipkit.serve.metrics import Metrics

# Metadata columns that say where the bytes are on the server's disk: never sent to clients.
PRIVATE_COLUMNS = ("shard", "offset", "size", "image_ext")
IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class Service:
    config: ServeConfig
    encoder: Any  # TorchEncoder | OnnxEncoder
    index: IndexDir
    batcher: MicroBatcher
    metrics: Metrics
    fetcher: Any = None  # clipkit.data_prep.fetch.HttpFetcher when --allow-url-fetch

    def __post_init__(self):
        self._metadata = self.index.store.metadata()
        self._columns = [c for c in self._metadata.column_names if c not in PRIVATE_COLUMNS]

    @property
    def count(self) -> int:
        return self.index.store.count

    async def embed(self, kind: str, items: List[Any]) -> np.ndarray:
        self.metrics.inputs.labels(kind).inc(len(items))
        return await self.batcher.submit(kind, items)

    async def image_tensors(self, blobs: Sequence[bytes], params: Sequence[str]) -> List[Any]:
        """Decodes and preprocesses images in a worker thread (header check first); 400 for the first bad one."""
        preprocess, max_pixels = self.encoder.preprocess, self.config.max_image_pixels

        def work() -> List[Any]:
            return [image_tensor(b, preprocess, max_pixels, p) for b, p in zip(blobs, params)]

        return await anyio.to_thread.run_sync(work)

    async def search(self, modality: str, query: np.ndarray, k: int) -> tuple:
        """(scores [k], ids [k]) for one [D] query, off the event loop (FAISS releases the GIL)."""
        if modality not in self.index.indexes:
            raise APIError(400, f"modality {modality!r}: this index has no {modality} index "
                                f"(it has {sorted(self.index.indexes)})", "modality")
        scores, ids = await anyio.to_thread.run_sync(self.index.search, modality, query[None, :], k)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def check_id(self, i: int, param: str = "id") -> None:
        if not 0 <= i < self.count:
            raise APIError(404 if param == "id" else 400, f"{param}: {i} is not an id of this index "
                                                          f"(0..{self.count - 1})", param, code="unknown_id")

    def metadata(self, ids: Sequence[int]) -> List[Dict[str, Any]]:
        """The public metadata columns of `ids` (known to be valid)."""
        if len(ids) == 0:  # pyarrow cannot take an empty (untyped) list; clip-retrieval's front asks for none
            return []
        rows = self._metadata.select(self._columns).take(list(ids)).to_pylist()
        return [{k: v for k, v in r.items() if v is not None} for r in rows]

    def embeddings(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        return self.index.store.rows(modality, ids)

    def image_location(self, i: int) -> tuple:
        """(shard path, offset, size, media type) of id i's stored image; 404 when its bytes cannot be served."""
        self.check_id(i)
        row = self._metadata.select(["shard", "offset", "size", "image_ext"]).slice(i, 1).to_pylist()[0]
        if row.get("offset") is None or row["offset"] < 0:
            raise APIError(404, f"image {i}: its shard is not a local uncompressed tar, so its bytes cannot be "
                                "served", code="image_unavailable")
        return row["shard"], int(row["offset"]), int(row["size"]), IMAGE_TYPES.get(row["image_ext"],
                                                                                   "application/octet-stream")

    def read_image(self, i: int) -> tuple:
        """(bytes, media type) of id i's stored image, read by offset from its shard (paths come from the index,
        never from the request)."""
        shard, offset, size, media = self.image_location(i)
        try:
            with open(shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise APIError(404, f"image {i}: its shard cannot be read ({e.strerror})", code="image_unavailable") from e
        if len(data) != size:
            raise APIError(404, f"image {i}: its shard is shorter than the index says", code="image_unavailable")
        return data, media
