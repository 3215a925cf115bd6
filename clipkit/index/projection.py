"""The explorer's map: a 2-D projection of the indexed image embeddings, computed once at index time.

UMAP (umap-learn, cosine metric, fixed seed) up to `UMAP_MAX` points; PCA beyond that, where UMAP's neighbour graph
would take too long. Coordinates are scaled into [0, 1] x [0, 1] and stored as `map.npy` ([count, 2] float32, row i =
id i) with `map.json` (method, count, seconds).
"""

import json
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np

from clipkit.index.embed import write_json
from clipkit.index.store import EmbeddingStore

MAP_FILE = "map.npy"
MAP_INFO = "map.json"
UMAP_MAX = 200_000


def project(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple:
    """[n, D] -> ([n, 2] float32 in [0, 1], method used)."""
    n = len(x)
    if method == "auto":
        method = "umap" if 16 <= n <= UMAP_MAX else "pca"
    if n < 3:
        xy = np.zeros((n, 2), np.float32)
    elif method == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by setting random_state": determinism wanted
            xy = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed,
                           init="spectral" if n > 50 else "random").fit_transform(x)
    elif method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"map method must be auto, umap or pca, got {method!r}")
    xy = np.asarray(xy, np.float64)
    lo, span = xy.min(0) if n else 0, np.ptp(xy, 0) if n else 1
    xy = (xy - lo) / np.where(span > 0, span, 1)
    return xy.astype(np.float32), method


def write_map(directory: str | Path, method: str = "auto", seed: int = 0) -> Dict[str, Any]:
    out = Path(directory)
    store = EmbeddingStore(out)
    t0 = time.perf_counter()
    xy, used = project(store.all("image"), method, seed)
    with open(out / MAP_FILE, "wb") as f:
        np.save(f, xy)
    info = {"file": MAP_FILE, "method": used, "count": int(len(xy)), "seconds": round(time.perf_counter() - t0, 2),
            "fingerprint": store.fingerprint}
    write_json(out / MAP_INFO, info)
    return info


def read_map(directory: str | Path) -> tuple:
    """(xy [n, 2] float32, info) or (None, None) when the index has no map."""
    out = Path(directory)
    if not (out / MAP_FILE).is_file():
        return None, None
    return np.load(out / MAP_FILE), json.loads((out / MAP_INFO).read_text())
