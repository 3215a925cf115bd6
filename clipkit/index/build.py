"""FAISS indexes over an embedding directory: choose a kind within a memory budget, build, tune, measure recall.

`auto` follows autofaiss's reasoning: exact search (a flat inner-product index) while the collection is small enough
that scanning it is fast; beyond that HNSW if its graph plus raw vectors fit the memory budget, else IVF-PQ with the
largest code size that fits. Approximate indexes are tuned on held-out queries (the other modality's embeddings of a
random sample: real cross-modal queries that are not themselves in the index): the smallest nprobe / efSearch whose
recall@10 against exact search is within 0.01 of the best tried. IVF-PQ results are re-ranked exactly against the
stored float16 embeddings (`rerank`), which the manifest records for the service.
"""

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from clipkit.index.embed import write_json
from clipkit.index.search import INDEX_MANIFEST, faiss_search
from clipkit.index.store import MODALITIES, EmbeddingStore, exact_topk

KINDS = ("auto", "flat", "hnsw", "ivfpq")
AUTO_EXACT_MAX = 100_000  # auto: exact search up to this many vectors (a scan of 100k x 512 floats is ~10 ms)
HNSW_M = 32
PQ_CODE_SIZES = (64, 48, 32, 16, 8, 4)  # bytes per vector, largest first
# Sub-vectors of at least 8 dimensions: k-means on 1-4 dimensional sub-vectors is both slow in faiss (no BLAS path)
# and a poor use of the code bytes.
PQ_MIN_SUBDIM = 8
IVF_TRAIN_PER_LIST = 39  # training vectors per inverted list (faiss's minimum before it warns)
RECALL_K = 10


def parse_memory(text: str) -> int:
    """'4G', '512M', '100k', '123' -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"--max-index-memory {text!r}: expected a size like 4G, 512M or 100000")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


@dataclass
class IndexPlan:
    kind: str  # flat | hnsw | ivfpq
    factory: str  # faiss.index_factory string
    memory: int  # estimated bytes of the built index
    params: Dict[str, Any] = field(default_factory=dict)


def _ivf_lists(n: int) -> int:
    """Inverted lists: ~2 sqrt(n) rounded to a power of two (2048 for 1M vectors), >= 39 training points each."""
    lists = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return int(max(1, min(lists, n // 39 or 1)))


def plan_index(n: int, dim: int, kind: str, budget: int) -> IndexPlan:
    """The index to build for n vectors of `dim` within `budget` bytes; ValueError when nothing fits."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    flat = IndexPlan("flat", "Flat", n * dim * 4)
    hnsw = IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", n * (dim * 4 + HNSW_M * 2 * 4 + 8), {"M": HNSW_M})
    lists = _ivf_lists(n)
    bits = max(1, min(8, int(math.log2(max(2, n)))))  # PQ centroids (2^bits) need as many training vectors
    pq = [IndexPlan("ivfpq", f"IVF{lists},PQ{m}x{bits}", n * (m + 8) + lists * dim * 4 + 256 * dim * 4,
                    {"nlist": lists, "code_size": m})
          for m in PQ_CODE_SIZES if dim % m == 0 and dim // m >= PQ_MIN_SUBDIM]
    if kind == "flat":
        options = [flat]
    elif kind == "hnsw":
        options = [hnsw]
    elif kind == "ivfpq":
        options = pq
    else:
        options = ([flat] if n <= AUTO_EXACT_MAX else []) + [hnsw] + pq
    for plan in options:
        if plan.memory <= budget:
            return plan
    need = min((p.memory for p in options), default=0)
    raise ValueError(f"no {kind} index of {n} x {dim} vectors fits --max-index-memory {budget} bytes (the smallest "
                     f"needs {need}); raise --max-index-memory or choose another --kind")


def _train_sample(store: EmbeddingStore, modality: str, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(store.count, size=min(size, store.count), replace=False))
    return store.rows(modality, ids)


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (which has no get_num_gpus), else what faiss-gpu sees."""
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def _to_gpus(index, kind: str):
    """With faiss-gpu and a GPU: the index cloned onto every GPU (IVF-PQ with float16 lookup tables, which its
    64-byte codes need), or None to stay on the CPU (HNSW has no GPU version). Not exercised here: no GPU."""
    import faiss

    if kind == "hnsw" or gpu_count() == 0:
        return None
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16LookupTables = True
    try:
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError as e:  # a GPU build that cannot hold this index: build it on the CPU instead
        import logging

        logging.getLogger("clipkit.index").warning("faiss-gpu could not take the %s index (%s): building on the CPU",
                                                   kind, e)
        return None


def build_faiss(store: EmbeddingStore, modality: str, plan: IndexPlan, seed: int = 0):
    """Trains (IVF-PQ) and fills the index; on GPUs when faiss-gpu sees any (then copied back to the CPU, which is
    what gets written and served)."""
    import faiss

    index = faiss.index_factory(store.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivfpq":
        # Polysemous training (faiss's default for IVFPQ) re-orders codes for Hamming pre-filtering, which is not
        # used here; it took 2/3 of the training time.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    work = _to_gpus(index, plan.kind) or index
    if plan.kind == "ivfpq":
        size = max(plan.params["nlist"] * IVF_TRAIN_PER_LIST, 256 * IVF_TRAIN_PER_LIST)
        work.train(_train_sample(store, modality, size, seed))
    for chunk in store.chunks(modality):
        work.add(chunk)
    return index if work is index else faiss.index_gpu_to_cpu(work)


def recall(found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None,
           truth_scores: np.ndarray | None = None) -> float:
    """Mean over queries of |found ∩ truth| / k (recall@k of an approximate top-k against the exact one).

    With the exact scores of both (`found_scores` [Q, k] of the found ids, `truth_scores` [Q, k]), a found id whose
    exact score ties the k-th true score counts too: with duplicate embeddings (repeated captions) the exact top-k
    is one arbitrary pick among equals (lowest ids first), and another pick is not a miss."""
    k = truth.shape[1]
    if found_scores is None or truth_scores is None:
        return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))
    kth = truth_scores[:, -1:]
    tol = 1e-5 * np.maximum(1.0, np.abs(kth))
    ties = ((found >= 0) & (found_scores >= kth - tol)).sum(1)
    same_ids = np.array([len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth)])
    return float(np.mean(np.minimum(np.maximum(ties, same_ids), k) / k))


def exact_scores(store: EmbeddingStore, modality: str, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[Q, k] inner products of each query with its found ids' stored embeddings (as exact_topk computes them);
    -inf where an id is -1."""
    out = np.full(ids.shape, -np.inf, np.float32)
    for q, row in enumerate(ids):
        ok = row >= 0
        if ok.any():
            out[q, ok] = store.rows(modality, row[ok]) @ np.asarray(queries[q], dtype=np.float32)
    return out


def _held_out_queries(store: EmbeddingStore, modality: str, n: int, seed: int) -> np.ndarray:
    """Queries for `modality`'s index: the other modality's embeddings of a random sample (cross-modal search)."""
    other = "text" if modality == "image" else "image"
    rng = np.random.default_rng(seed + 1)
    ids = np.sort(rng.choice(store.count, size=min(n, store.count), replace=False))
    return store.rows(other, ids)


def tune(index, plan: IndexPlan, store: EmbeddingStore, modality: str, queries: np.ndarray, truth: np.ndarray,
         rerank: int, truth_scores: np.ndarray | None = None) -> Dict[str, Any]:
    """Picks nprobe (IVF) or efSearch (HNSW): the smallest whose recall@10 is within 0.01 of the best tried."""
    import faiss

    k = truth.shape[1]
    if plan.kind == "ivfpq":
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256) if v <= plan.params["nlist"]]
    elif plan.kind == "hnsw":
        name, values = "efSearch", [16, 32, 64, 128, 256]
    else:
        return {"params": {}, "curve": []}
    curve = []
    for v in values:
        if name == "nprobe":
            faiss.extract_index_ivf(index).nprobe = v
        else:
            faiss.downcast_index(index).hnsw.efSearch = v
        t0 = time.perf_counter()
        _, ids = faiss_search(index, queries, k, rerank, store, modality)
        ms = 1000 * (time.perf_counter() - t0) / len(queries)
        got = recall(ids, truth, exact_scores(store, modality, queries, ids), truth_scores)
        curve.append({name: v, f"recall@{k}": round(got, 4), "ms_per_query": round(ms, 4)})
    best = max(c[f"recall@{k}"] for c in curve)
    chosen = next(c for c in curve if c[f"recall@{k}"] >= best - 0.01)
    return {"params": {name: chosen[name]}, "curve": curve}


@dataclass
class BuildSettings:
    kind: str = "auto"
    max_index_memory: int = 4 << 30
    queries: int = 1000  # held-out queries for recall@10
    rerank: int | None = None  # exact re-rank factor; default 4 for ivfpq, 1 (none) otherwise
    modalities: Sequence[str] = MODALITIES
    seed: int = 0


def build_one(store: EmbeddingStore, modality: str, settings: BuildSettings, out: Path) -> Dict[str, Any]:
    import faiss

    plan = plan_index(store.count, store.dim, settings.kind, settings.max_index_memory)
    rerank = settings.rerank if settings.rerank is not None else (4 if plan.kind == "ivfpq" else 1)
    t0 = time.perf_counter()
    index = build_faiss(store, modality, plan, settings.seed)
    build_s = time.perf_counter() - t0
    queries = _held_out_queries(store, modality, settings.queries, settings.seed)
    k = min(RECALL_K, store.count)
    truth_scores, truth = exact_topk(store, modality, queries, k)
    tuned = tune(index, plan, store, modality, queries, truth, rerank, truth_scores)
    for name, value in tuned["params"].items():
        if name == "nprobe":
            faiss.extract_index_ivf(index).nprobe = value
        else:
            faiss.downcast_index(index).hnsw.efSearch = value
    t1 = time.perf_counter()
    _, found = faiss_search(index, queries, k, rerank, store, modality)
    query_ms = 1000 * (time.perf_counter() - t1) / max(1, len(queries))
    raw = faiss_search(index, queries, k, 1, None, modality)[1]
    raw_recall = recall(raw, truth, exact_scores(store, modality, queries, raw), truth_scores)
    path = out / f"{modality}.index"
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    return {"kind": plan.kind, "factory": plan.factory, "file": path.name, "count": int(index.ntotal),
            "params": tuned["params"], "rerank": rerank, "estimated_bytes": plan.memory,
            "size_bytes": path.stat().st_size, "build_s": round(build_s, 3),
            f"recall@{k}": round(recall(found, truth, exact_scores(store, modality, queries, found), truth_scores), 4),
            f"recall@{k}_without_rerank": round(raw_recall, 4), "query_ms": round(query_ms, 4),
            "held_out_queries": len(queries), "tuning": tuned["curve"]}


def build_indexes(directory: str | Path, settings: BuildSettings, progress=print) -> Dict[str, Any]:
    """Builds `image.index` / `text.index` and writes `index.json` (the manifest a service checks)."""
    out = Path(directory)
    store = EmbeddingStore(out)
    if store.count == 0:
        raise ValueError(f"{out}: no embeddings (every sample was rejected: {store.info.get('rejected')})")
    unknown = set(settings.modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; use image and/or text")
    indexes: Dict[str, Any] = {}
    for modality in settings.modalities:
        indexes[modality] = info = build_one(store, modality, settings, out)
        progress(f"{modality}: {info['kind']} ({info['factory']}) over {info['count']} vectors, "
                 f"{info['size_bytes'] / 2**20:.1f} MiB, built in {info['build_s']:.1f} s, recall@{RECALL_K} "
                 f"{info[f'recall@{min(RECALL_K, store.count)}']:.3f} vs exact on {info['held_out_queries']} "
                 f"held-out queries, {info['query_ms']:.2f} ms/query")
    build = asdict(settings)
    build["modalities"] = list(settings.modalities)
    manifest = {"format": "clipkit-index/1", "name": out.resolve().name, "model": store.info["model"]
                | {"fingerprint": store.fingerprint}, "dim": store.dim, "count": store.count,
                "indexes": indexes, "build": build}
    write_json(out / INDEX_MANIFEST, manifest)
    return manifest


def check_modalities(names: List[str]) -> List[str]:
    bad = [n for n in names if n not in MODALITIES]
    if bad:
        raise ValueError(f"--modalities: unknown {bad}; use image, text or both")
    return names
