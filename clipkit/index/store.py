"""Read access to a finished embedding directory (see `clipkit.index.embed`): memory-mapped parts and metadata."""

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np

from clipkit.index.embed import EMBEDDINGS_FILE, part_files

MODALITIES = ("image", "text")


class EmbeddingStore:
    """The embeddings of a directory, memory-mapped (float16 on disk; rows come out float32).

    ids are rows of the concatenated parts: part p holds ids [first_id, first_id + rows).
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / EMBEDDINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {EMBEDDINGS_FILE}; run index/embed.py --output {self.dir} first "
                                    "(or finish the run it started)")
        self.info: Dict[str, Any] = json.loads(path.read_text())
        self.count: int = int(self.info["count"])
        self.dim: int = int(self.info["dim"])
        self.fingerprint: str = self.info["fingerprint"]
        self.parts: List[Dict[str, Any]] = self.info["parts"]
        self._starts = np.array([p["first_id"] for p in self.parts], dtype=np.int64)
        self._arrays: Dict[str, List[np.ndarray]] = {}
        self._metadata = None

    def arrays(self, modality: str) -> List[np.ndarray]:
        """The parts' [rows, D] float16 memmaps of `modality` ("image" or "text"), in id order."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality not in self._arrays:
            arrays = []
            for p in self.parts:
                a = np.load(part_files(self.dir, p["part"])[modality], mmap_mode="r")
                if a.shape != (p["rows"], self.dim):
                    raise ValueError(f"{self.dir}: part {p['part']} {modality} embeddings have shape {a.shape}, "
                                     f"expected ({p['rows']}, {self.dim}): the directory is damaged")
                arrays.append(a)
            self._arrays[modality] = arrays
        return self._arrays[modality]

    def chunks(self, modality: str, rows: int = 65536) -> Iterator[np.ndarray]:
        """[<= rows, D] float32 chunks in id order."""
        for a in self.arrays(modality):
            for start in range(0, len(a), rows):
                yield np.asarray(a[start:start + rows], dtype=np.float32)

    def rows(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), D] float32 embeddings of the given ids."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"id out of range [0, {self.count})")
        parts = np.searchsorted(self._starts, ids, side="right") - 1
        arrays = self.arrays(modality)
        for i, (p, row) in enumerate(zip(parts, ids - self._starts[parts])):
            out[i] = arrays[p][row]
        return out

    def all(self, modality: str) -> np.ndarray:
        """Every embedding as one [count, D] float32 array (count * D * 4 bytes of memory)."""
        if self.count == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(list(self.chunks(modality)))

    def metadata(self):
        """All metadata rows as one pyarrow table in id order (columns missing from some parts are null there)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._metadata is None:
            tables = [pq.read_table(part_files(self.dir, p["part"])["metadata"]) for p in self.parts]
            self._metadata = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        return self._metadata


def exact_topk(store: EmbeddingStore, modality: str, queries: np.ndarray, k: int) -> tuple:
    """Brute-force top-k by inner product over every stored embedding (the float16 values, computed in float32).

    queries: [Q, D] float32. Returns (scores [Q, k] float32, ids [Q, k] int64), best first; ties by lower id.
    """
    queries = np.asarray(queries, dtype=np.float32)
    k = min(k, store.count)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    start = 0
    for chunk in store.chunks(modality):
        scores = queries @ chunk.T
        ids = np.broadcast_to(np.arange(start, start + len(chunk)), scores.shape)
        if scores.shape[1] > k:  # only this chunk's k best can enter the top k (ties at the cut keep all equals)
            cut = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
            keep = scores >= cut
            width = int(keep.sum(1).max())
            order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
            scores = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(scores, order, 1), -np.inf)
            ids = np.take_along_axis(ids, order, 1)
        best_s = np.concatenate([best_s, scores], axis=1)
        best_i = np.concatenate([best_i, ids], axis=1)
        if best_s.shape[1] > k:
            order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        start += len(chunk)
    order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
