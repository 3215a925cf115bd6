"""index/embed.py and index/build.py: embeddings equal the model's, bad samples counted, reruns byte-identical, a
stopped run resumes, the manifest refuses mixing, FAISS search equals brute force, approximate recall is measured."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests._serve import export_random_model
from tests._shards import make_shards
from tests._train import REPO, env, free_port

BAD = ("corrupt_image", "bomb", "missing_caption", "html_image", "truncated_tar")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    model_dir = export_random_model(root / "model")
    shards = make_shards(str(root / "shards"), 3, 12, image_size=32, bad=BAD)
    return root, model_dir, shards


def _embed(model_dir, spec, out, *extra):
    from clipkit.index.cli import embed_main

    # One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): byte identity holds at equal thread counts
    # (another count may change a matmul's summation order, and so the last bit of a float16).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_main(["--model", str(model_dir), "--data", spec, "--output", str(out), "--workers", "0",
                    "--batch-size", "5", "--no-progress", *extra])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def embedded(setup):
    root, model_dir, shards = setup
    return _embed(model_dir, shards.spec, root / "emb")


BUILD_OUTPUTS = ("image.index", "text.index", "index.json", "map.npy", "map.json")


def _files(d: Path):
    """Every file embed wrote (index/build.py's outputs, which other tests add to the shared dir, left out)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in BUILD_OUTPUTS}


def test_embeddings_equal_the_models_and_metadata_is_complete(setup, embedded):
    from clipkit.eval.models import load_model
    from clipkit.images import decode_image
    from clipkit.index.store import EmbeddingStore

    root, model_dir, shards = setup
    store = EmbeddingStore(embedded)
    assert store.count == len(shards.good_keys) == 36
    meta = store.metadata().to_pylist()
    assert [m["id"] for m in meta] == list(range(36))
    assert [m["key"] for m in meta] == shards.good_keys
    assert [m["caption"] for m in meta] == [shards.captions[k] for k in shards.good_keys]
    assert {m["status"] for m in meta} == {"success"}  # a json extra column
    expected_bad = {k: v for k, v in shards.expected.items() if k != "ok"}
    assert store.info["rejected"] == expected_bad

    from clipkit.data.tar_stream import iter_shard

    members = {raw["__key__"]: raw for path in shards.paths for raw in iter_shard(path) if "__key__" in raw}
    loaded = load_model(str(model_dir))
    images, texts = [], []
    for m in meta:
        with open(m["shard"], "rb") as f:  # the stored offset/size point at exactly the image member
            f.seek(m["offset"])
            data = f.read(m["size"])
        assert data == members[m["key"]]["jpg"]
        img = decode_image(data)
        assert (m["width"], m["height"]) == img.size
        images.append(loaded.preprocess(img))
        texts.append(m["caption"])
    with torch.no_grad():
        ref_img = F.normalize(loaded.model.encode_image(torch.stack(images)), dim=-1).numpy()
        ref_txt = F.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()
    assert store.arrays("image")[0].dtype == np.float16
    np.testing.assert_allclose(store.all("image"), ref_img, atol=1e-3)  # float16 storage: ~5e-4 rounding
    np.testing.assert_allclose(store.all("text"), ref_txt, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(store.all("image"), axis=1), 1, atol=2e-3)


def test_rerun_is_byte_identical_whatever_the_workers(setup, embedded, tmp_path):
    root, model_dir, shards = setup
    again = _embed(model_dir, shards.spec, tmp_path / "again", "--workers", "2")
    assert _files(again).keys() == _files(embedded).keys()
    assert _files(again) == _files(embedded)
    before = _files(again)
    _embed(model_dir, shards.spec, again)  # all parts complete: nothing is redone, nothing changes
    assert _files(again) == before


def test_a_stopped_run_resumes_to_the_same_bytes(setup, embedded, tmp_path):
    """A run stopped after part 0 (part 1 half-written: a .tmp file, no marker) finishes on rerun, as if never
    stopped; before that, build refuses the unfinished directory."""
    from clipkit.eval.models import load_model
    from clipkit.index.cli import build_main
    from clipkit.index.embed import RUN_FILE, EmbedSettings, Encoder, embed_parts

    root, model_dir, shards = setup
    out = tmp_path / "stopped"
    out.mkdir()
    shutil.copy(embedded / RUN_FILE, out / RUN_FILE)
    loaded = load_model(str(model_dir))
    embed_parts(Encoder(loaded.model, "cpu", "fp32"), [(0, shards.paths[0])], out, loaded.preprocess,
                loaded.tokenizer, EmbedSettings(batch_size=5, workers=0), 128, progress=False)
    (out / "img_emb" / "img_emb_00001.npy.tmp").write_bytes(b"half a file")
    with pytest.raises(FileNotFoundError, match="embeddings.json"):
        build_main([str(out), "--no-map"])
    _embed(model_dir, shards.spec, out)
    files = {k: v for k, v in _files(out).items() if not k.endswith(".tmp")}
    assert files == _files(embedded)


def test_rerun_with_another_model_is_refused(setup, embedded, tmp_path):
    root, model_dir, shards = setup
    other = export_random_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        _embed(other, shards.spec, embedded)


def test_fingerprint_is_the_same_for_an_export_and_name_plus_weights(setup):
    from clipkit.eval.models import load_model
    from clipkit.index.fingerprint import model_fingerprint
    from clipkit.models import OPEN_CLIP_WEIGHTS

    _, model_dir, _ = setup
    a = model_fingerprint(load_model(str(model_dir)))
    b = model_fingerprint(load_model("clipkit-tiny", str(model_dir / OPEN_CLIP_WEIGHTS)))
    assert a == b
    loaded = load_model(str(model_dir))
    with torch.no_grad():
        loaded.model.visual.conv1.weight[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(loaded) != a


def test_flat_index_search_equals_brute_force(embedded):
    from clipkit.index.build import BuildSettings, build_indexes
    from clipkit.index.search import IndexDir

    manifest = build_indexes(embedded, BuildSettings(), progress=lambda s: None)
    assert manifest["indexes"]["image"]["kind"] == manifest["indexes"]["text"]["kind"] == "flat"
    assert manifest["indexes"]["image"]["recall@10"] == 1.0
    index = IndexDir(embedded)
    for modality, other in (("image", "text"), ("text", "image")):
        base = index.store.all(modality).astype(np.float64)
        queries = index.store.all(other)[:7]
        scores, ids = index.search(modality, queries, 5)
        ref = queries.astype(np.float64) @ base.T
        ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_ids, 1), atol=1e-5)


def _random_dir(out: Path, n: int, dim: int, seed: int = 0) -> Path:
    from clipkit.index.embed import write_arrays

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(32, dim))
    img = centers[rng.integers(0, 32, n)] + 0.5 * rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    write_arrays(out, img.astype(np.float32), txt.astype(np.float32), {"fingerprint": "random", "name": "random"},
                 rows_per_part=n // 2 + 1)
    return out


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_report_true_recall(tmp_path, kind):
    from clipkit.index.build import BuildSettings, build_indexes, recall
    from clipkit.index.search import IndexDir
    from clipkit.index.store import exact_topk

    out = _random_dir(tmp_path / kind, 4000, 64)
    manifest = build_indexes(out, BuildSettings(kind=kind, queries=200, modalities=["image"]), progress=lambda s: None)
    info = manifest["indexes"]["image"]
    assert info["kind"] == kind and info["count"] == 4000
    assert info["params"] and info["tuning"]
    assert info["size_bytes"] == (out / "image.index").stat().st_size
    # the manifest's recall is what the loaded index really achieves on the same held-out queries
    index = IndexDir(out, mmap=True)
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(4000, 200, replace=False))
    queries = index.store.rows("text", ids)
    _, truth = exact_topk(index.store, "image", queries, 10)
    _, found = index.search("image", queries, 10)
    assert recall(found, truth) == pytest.approx(info["recall@10"], abs=1e-6)
    assert info["recall@10"] > 0.6
    if kind == "ivfpq":
        assert info["rerank"] == 4 and info["recall@10"] >= info["recall@10_without_rerank"]


def test_plan_follows_the_memory_budget():
    from clipkit.index.build import plan_index

    assert plan_index(50_000, 512, "auto", 4 << 30).kind == "flat"
    assert plan_index(1_000_000, 512, "auto", 4 << 30).kind == "hnsw"
    pq = plan_index(1_000_000, 512, "auto", 200 << 20)
    assert pq.kind == "ivfpq" and pq.memory <= 200 << 20 and pq.params["code_size"] == 64
    assert plan_index(1_000_000, 512, "auto", 40 << 20).params["code_size"] == 16
    with pytest.raises(ValueError, match="max-index-memory"):
        plan_index(1_000_000, 512, "flat", 1 << 30)


def test_build_cli_errors_name_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "index" / "build.py"), str(tmp_path)], capture_output=True,
                          text=True, env=env())
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "index/embed.py" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "index" / "build.py"), str(tmp_path), "--max-index-memory",
                           "lots"], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "--max-index-memory 'lots'" in proc.stderr


@pytest.mark.slow
def test_accelerate_two_ranks_write_the_same_bytes(setup, embedded, tmp_path):
    root, model_dir, shards = setup
    out = tmp_path / "ranks"
    # --multi_gpu: accelerate's torchrun launcher (with --cpu it would start one process); ranks use gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "index" / "embed.py"), "--model", str(model_dir), "--data", shards.spec, "--output", str(out),
           "--workers", "1", "--batch-size", "5", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0:" in proc.stdout and "rank 1:" in proc.stdout
    assert _files(out) == _files(embedded)


def test_store_rows_and_chunks_agree(embedded):
    from clipkit.index.store import EmbeddingStore

    store = EmbeddingStore(embedded)
    ids = [35, 0, 17, 12, 12]
    np.testing.assert_array_equal(store.rows("image", ids), store.all("image")[ids])
    with pytest.raises(IndexError):
        store.rows("image", [36])
    assert json.loads((embedded / "embeddings.json").read_text())["parts"][1]["first_id"] == 12


def test_exact_topk_is_brute_force_in_order(tmp_path):
    from clipkit.index.store import EmbeddingStore, exact_topk

    out = _random_dir(tmp_path / "r", 3000, 16)
    store = EmbeddingStore(out)
    queries = store.rows("text", [0, 5, 2999])
    scores, ids = exact_topk(store, "image", queries, 7)
    ref = queries.astype(np.float64) @ store.all("image").astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :7], atol=1e-5)


@pytest.mark.slow
def test_umap_map_is_stored_beside_the_index(tmp_path):
    from clipkit.index.projection import read_map, write_map

    out = _random_dir(tmp_path / "m", 400, 16)
    info = write_map(out, "umap")
    xy, stored = read_map(out)
    assert info["method"] == stored["method"] == "umap" and xy.shape == (400, 2) and xy.dtype == np.float32
    assert xy.min() >= 0 and xy.max() <= 1
    # neighbours in the embedding space stay near on the map: each point's nearest map neighbour is among its
    # 10 nearest embeddings far more often than chance (10/399)
    from clipkit.index.store import EmbeddingStore

    emb = EmbeddingStore(out).all("image")
    near = np.argsort(-(emb @ emb.T), axis=1)[:, 1:11]
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    hits = np.mean([d[i].argmin() in near[i] for i in range(400)])
    assert hits > 0.3


def test_gpu_path_trains_and_fills_on_the_gpu_copy(setup, embedded, monkeypatch):
    """With faiss-gpu's calls stood in (no GPU here): train and add go to the GPU clone, the CPU copy comes back;
    HNSW and faiss-cpu stay on the CPU."""
    import faiss

    from clipkit.index import build as build_mod
    from clipkit.index.store import EmbeddingStore

    calls = []

    class Clone:
        def __init__(self, index):
            self.index = index

        def train(self, x):
            calls.append(("train", len(x)))
            self.index.train(x)

        def add(self, x):
            calls.append(("add", len(x)))
            self.index.add(x)

    class Options:
        useFloat16LookupTables = False

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, options: Clone(index), raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda clone: clone.index, raising=False)
    store = EmbeddingStore(embedded)
    plan = build_mod.IndexPlan("ivfpq", "IVF2,PQ8x4", 0, {"nlist": 2, "code_size": 4})
    index = build_mod.build_faiss(store, "image", plan)
    assert calls[0][0] == "train" and {c[0] for c in calls[1:]} == {"add"}  # one add per stored part
    assert sum(n for kind, n in calls[1:]) == index.ntotal == store.count
    calls.clear()
    hnsw = build_mod.build_faiss(store, "image", build_mod.IndexPlan("hnsw", "HNSW8", 0, {}))
    assert calls == [] and hnsw.ntotal == store.count
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    build_mod.build_faiss(store, "image", build_mod.IndexPlan("flat", "Flat", 0, {}))
    assert calls == []


def test_exact_index_over_duplicate_captions_reports_full_recall(tmp_path):
    """Repeated captions give identical text embeddings: the exact top 10 is then one pick among equals, and a flat
    index's other pick is not a miss (the demo's text index read 0.879 before ties counted)."""
    from clipkit.index.build import BuildSettings, build_indexes, recall
    from clipkit.index.embed import write_arrays

    rng = np.random.default_rng(3)
    n, dim = 600, 16
    img = rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    captions = rng.normal(size=(12, dim))  # 12 distinct captions, 50 samples each
    txt = captions[np.arange(n) % 12]
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    out = tmp_path / "dups"
    write_arrays(out, img.astype(np.float32), txt.astype(np.float32), {"fingerprint": "dups", "name": "dups"},
                 rows_per_part=n)
    manifest = build_indexes(out, BuildSettings(kind="flat", queries=100, modalities=["text"]), progress=lambda s: None)
    assert manifest["indexes"]["text"]["recall@10"] == 1.0
    # the id-only count would call the flat index's pick among 50 equals a miss
    found = np.array([[5, 17, 29]])
    truth = np.array([[5, 41, 53]])
    assert recall(found, truth) == pytest.approx(1 / 3)
    assert recall(found, truth, np.array([[0.9, 0.8, 0.8]]), np.array([[0.9, 0.8, 0.8]])) == 1.0
    assert recall(found, truth, np.array([[0.9, 0.8, 0.7]]), np.array([[0.9, 0.8, 0.8]])) == pytest.approx(2 / 3)
