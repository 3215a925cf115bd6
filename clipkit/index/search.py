"""k-nearest-neighbour search over a built index directory: FAISS candidates, optionally re-ranked exactly.

An approximate index (IVF-PQ) ranks by compressed codes; with `rerank` R it returns the best k of its top R * k
candidates re-scored against the stored float16 embeddings (memory-mapped, so re-ranking costs no RAM). Similarities
are inner products of L2-normalised vectors (cosine).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from clipkit.index.store import EmbeddingStore

INDEX_MANIFEST = "index.json"
# Files larger than this are memory-mapped when loaded (the index stays on disk; the page cache holds what is used).
MMAP_THRESHOLD = 256 << 20


@dataclass
class ModalityIndex:
    """One FAISS index over one modality's embeddings, with its search settings."""

    modality: str
    index: Any  # faiss.Index
    info: Dict[str, Any]  # the manifest's entry: kind, file, params, recall...

    def set_params(self) -> None:
        import faiss

        params = self.info.get("params", {})
        if "nprobe" in params:
            faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
        if "efSearch" in params:
            faiss.downcast_index(self.index).hnsw.efSearch = int(params["efSearch"])


def load_faiss(path: Path, mmap: bool | None = None):
    import faiss

    if mmap is None:
        mmap = path.stat().st_size > MMAP_THRESHOLD
    if mmap:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(str(path))


def faiss_search(index, queries: np.ndarray, k: int, rerank: int, store: EmbeddingStore | None,
                 modality: str) -> Tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]) from `index`; ids -1 / scores -inf pad when fewer than k exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if rerank <= 1 or store is None:
        scores, ids = index.search(queries, k)
    else:
        _, cand = index.search(queries, k * rerank)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for q, row in enumerate(cand):
            row = row[row >= 0]
            if len(row) == 0:
                continue
            exact = store.rows(modality, row) @ queries[q]
            order = np.lexsort((row, -exact))[:k]
            scores[q, :len(order)], ids[q, :len(order)] = exact[order], row[order]
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return scores, ids.astype(np.int64)


class IndexDir:
    """A built index directory: manifest, embeddings, metadata and one FAISS index per modality."""

    def __init__(self, directory: str | Path, mmap: bool | None = None):
        self.dir = Path(directory)
        path = self.dir / INDEX_MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {INDEX_MANIFEST}; build it: python index/build.py {self.dir}")
        self.manifest: Dict[str, Any] = json.loads(path.read_text())
        self.store = EmbeddingStore(self.dir)
        if self.store.fingerprint != self.manifest["model"]["fingerprint"]:
            raise ValueError(f"{self.dir}: {INDEX_MANIFEST} was built from other embeddings than embeddings.json "
                             "holds; rebuild it with index/build.py")
        self.indexes: Dict[str, ModalityIndex] = {}
        for modality, info in self.manifest["indexes"].items():
            idx = ModalityIndex(modality, load_faiss(self.dir / info["file"], mmap), info)
            idx.set_params()
            self.indexes[modality] = idx

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.dir.resolve().name

    def search(self, modality: str, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k of `modality`'s index for [Q, D] float32 queries: (scores, ids), best first."""
        if modality not in self.indexes:
            raise KeyError(modality)
        idx = self.indexes[modality]
        return faiss_search(idx.index, queries, min(k, self.store.count), int(idx.info.get("rerank", 1)),
                            self.store, modality)
