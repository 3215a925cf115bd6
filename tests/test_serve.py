"""serve/app.py, started for real on 127.0.0.1: embeddings equal the model's own, search equals exact top-k, the
official OpenAI client and clip-retrieval's ClipClient work against it, images come back byte for byte, concurrent
requests share forwards."""

import base64
import importlib.util
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F

from tests._serve import Server, build_index, export_random_model
from tests._shards import make_shards
from tests._train import REPO
from tests._train import env as run_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = export_random_model(root / "model")
    shards = make_shards(str(root / "shards"), 2, 15, image_size=48)
    index_dir = build_index(root / "index", model_dir, shards.spec, ["--no-map"])
    from clipkit.eval.models import load_model

    loaded = load_model(str(model_dir))
    with Server(["--index", str(index_dir), "--model", str(model_dir), "--max-batch", "16",
                 "--max-wait-ms", "30"]) as server:
        yield {"server": server, "url": server.url, "loaded": loaded, "index": index_dir, "shards": shards,
               "model": model_dir}


def _png(seed: int, size: int = 40) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _ref_text(loaded, texts):
    with torch.no_grad():
        return F.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()


def _ref_image(loaded, blobs):
    from clipkit.images import decode_image

    with torch.no_grad():
        x = torch.stack([loaded.preprocess(decode_image(b)) for b in blobs])
        return F.normalize(loaded.model.encode_image(x), dim=-1).numpy()


def test_text_and_image_embeddings_equal_the_models(env):
    texts = ["a red star", "two blue squares on a table", ""]
    blobs = [_png(1), _png(2, 64)]
    body = {"input": [texts[0], _data_uri(blobs[0]), texts[1], {"type": "image", "image": _data_uri(blobs[1])},
                      {"type": "text", "text": texts[2]}]}
    r = requests.post(env["url"] + "/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["index"] for d in out["data"]] == list(range(5))
    got = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    ref_t, ref_i = _ref_text(env["loaded"], texts), _ref_image(env["loaded"], blobs)
    np.testing.assert_allclose(got[[0, 2, 4]], ref_t, atol=1e-5)
    np.testing.assert_allclose(got[[1, 3]], ref_i, atol=1e-5)
    assert out["usage"]["prompt_tokens"] == int((env["loaded"].tokenizer(texts) != 0).sum())
    # base64: little-endian float32, the same numbers
    r = requests.post(env["url"] + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref_t[0], atol=1e-5)
    # curl -d sends a form content type: the body is still read as JSON
    r = requests.post(env["url"] + "/v1/embeddings", data=json.dumps({"input": "x"}),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_openai_client(env):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused")
    models = client.models.list()
    name = models.data[0].id
    resp = client.embeddings.create(model=name, input=["a photo of a cat", "a dog"])
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    np.testing.assert_allclose(got, _ref_text(env["loaded"], ["a photo of a cat", "a dog"]), atol=1e-5)
    resp = client.embeddings.create(model=name, input=[_data_uri(_png(3))], encoding_format="float")
    np.testing.assert_allclose(np.array(resp.data[0].embedding), _ref_image(env["loaded"], [_png(3)])[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="not-this-one", input="x")


def _exact(env, modality, query, k):
    from clipkit.index.store import EmbeddingStore

    base = EmbeddingStore(env["index"]).all(modality).astype(np.float64)
    scores = base @ np.asarray(query, np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_knn_service_equals_exact_search(env):
    url = env["url"] + "/knn-service"
    for query in ({"text": "a synthetic photo number 3"}, {"image": base64.b64encode(_png(4)).decode()}):
        for modality in ("image", "text"):
            r = requests.post(url, json={**query, "modality": modality, "num_images": 7, "deduplicate": False,
                                         "indice_name": "index"})
            assert r.status_code == 200, r.text
            res = r.json()
            qvec = (_ref_text(env["loaded"], [query["text"]]) if "text" in query
                    else _ref_image(env["loaded"], [_png(4)]))[0]
            ids, scores = _exact(env, modality, qvec, 7)
            assert [x["id"] for x in res] == ids.tolist()
            np.testing.assert_allclose([x["similarity"] for x in res], scores, atol=1e-4)
    emb = _ref_text(env["loaded"], ["anything"])[0]
    res = requests.post(url, data=json.dumps({"embedding_input": emb.tolist(), "modality": "image", "num_images": 3,
                                              "deduplicate": False})).json()
    assert [x["id"] for x in res] == _exact(env, "image", emb, 3)[0].tolist()
    first = res[0]
    assert first["caption"].startswith("a synthetic photo number") and first["url"].endswith(f"/images/{first['id']}")
    assert "shard" not in first and "offset" not in first  # server paths stay private


def test_knn_returns_num_result_ids_with_metadata_for_the_first_num_images(env):
    """clip-back's shape, which clip-retrieval's front relies on: every one of the num_result_ids results comes back
    (the front pages through them), the first num_images with their metadata, the rest as {id, similarity}."""
    r = requests.post(env["url"] + "/knn-service", json={"text": "a synthetic photo number 3", "num_images": 4,
                                                          "num_result_ids": 12, "deduplicate": False})
    res = r.json()
    assert r.status_code == 200 and len(res) == 12
    assert all("caption" in x and "url" in x for x in res[:4]) and all(set(x) == {"id", "similarity"} for x in res[4:])
    qvec = _ref_text(env["loaded"], ["a synthetic photo number 3"])[0]
    assert [x["id"] for x in res] == _exact(env, "image", qvec, 12)[0].tolist()


def test_deduplicate_drops_near_identical_results(env):
    r = requests.post(env["url"] + "/knn-service", json={"text": "x", "num_images": 30, "deduplicate": True})
    kept = r.json()
    from clipkit.index.store import EmbeddingStore

    emb = EmbeddingStore(env["index"]).rows("image", [x["id"] for x in kept])
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.94 and len(kept) < 30  # a random model's images are near-duplicates of each other


def test_clip_retrieval_client(env):
    """clip-retrieval's own ClipClient, unchanged (its clip_client.py only needs requests; the package itself pins
    open-clip-torch<3 and numpy<2, so the test venv installs it with --no-deps and loads just that module)."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "clip_client.py"
    mod_spec = importlib.util.spec_from_file_location("clip_client_only", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    client = mod.ClipClient(url=env["url"] + "/knn-service", indice_name="index", num_images=5, deduplicate=False)
    res = client.query(text="a synthetic photo number 7")
    qvec = _ref_text(env["loaded"], ["a synthetic photo number 7"])[0]
    assert [x["id"] for x in res] == _exact(env, "image", qvec, 5)[0].tolist()
    assert {"id", "similarity", "caption", "url"} <= set(res[0])
    png = Path(env["index"]) / "query.png"
    png.write_bytes(_png(5))
    assert [x["id"] for x in client.query(image=str(png))] == _exact(
        env, "image", _ref_image(env["loaded"], [_png(5)])[0], 5)[0].tolist()
    text_client = mod.ClipClient(url=env["url"] + "/knn-service", indice_name="index", num_images=3,
                                 modality=mod.Modality.TEXT, deduplicate=False)
    assert len(text_client.query(text="hello")) == 3


def test_metadata_indices_and_images(env):
    assert requests.get(env["url"] + "/indices-list").json() == ["index"]
    r = requests.post(env["url"] + "/metadata", json={"ids": [3, 0], "indice_name": "index"})
    meta = r.json()
    keys = env["shards"].good_keys
    assert [m["id"] for m in meta] == [3, 0] and meta[0]["metadata"]["key"] == keys[3]
    # clip-retrieval's front asks for the metadata of no ids when its first page already has all of it (was a 500)
    r = requests.post(env["url"] + "/metadata", json={"ids": [], "indice_name": "index"})
    assert r.status_code == 200 and r.json() == []
    from clipkit.data.tar_stream import iter_shard

    raw = {x["__key__"]: x for p in env["shards"].paths for x in iter_shard(p)}
    for i in (0, 17, 29):
        r = requests.get(env["url"] + f"/images/{i}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == raw[keys[i]]["jpg"]
    health = requests.get(env["url"] + "/health").json()
    assert health["count"] == 30 and health["backend"] == "torch"


def test_concurrent_requests_are_micro_batched(env):
    texts = [f"caption number {i}" for i in range(24)]

    def one(t):
        r = requests.post(env["url"] + "/v1/embeddings", json={"input": t})
        return np.array(r.json()["data"][0]["embedding"], dtype=np.float32)

    def batch_counts():
        text = requests.get(env["url"] + "/metrics").text
        count = [ln for ln in text.splitlines() if ln.startswith('clipkit_batch_size_count{kind="text"}')]
        total = [ln for ln in text.splitlines() if ln.startswith('clipkit_batch_size_sum{kind="text"}')]
        return float(count[0].split()[-1]), float(total[0].split()[-1])

    n0, s0 = batch_counts()
    with ThreadPoolExecutor(12) as pool:
        got = np.stack(list(pool.map(one, texts)))
    n1, s1 = batch_counts()
    assert s1 - s0 == len(texts)  # every text went through a forward once
    assert n1 - n0 < len(texts)  # ... in fewer forwards than requests
    np.testing.assert_allclose(got, _ref_text(env["loaded"], texts), atol=1e-5)
    metrics = requests.get(env["url"] + "/metrics").text
    assert 'clipkit_requests_total{method="POST",route="/v1/embeddings",status="200"}' in metrics
    assert "clipkit_request_seconds_bucket" in metrics


def test_image_url_is_off_by_default(env):
    item = {"type": "image", "url": "http://example.com/a.png"}
    r = requests.post(env["url"] + "/v1/embeddings", json={"input": [item]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_disabled"
    r = requests.post(env["url"] + "/knn-service", json={"image_url": "http://example.com/a.png"})
    assert r.status_code == 400 and "--allow-url-fetch" in r.json()["error"]["message"]


def test_onnx_backend_matches_torch(env, tmp_path):
    onnx_dir = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, str(REPO / "serve" / "export_onnx.py"), "--model", str(env["model"]),
                           "--output", str(onnx_dir)], capture_output=True, text=True, env=run_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((onnx_dir / "onnx.json").read_text())
    assert max(manifest["parity"].values()) <= 1e-4
    texts, blobs = ["a red star", "hello world"], [_png(6)]
    with Server(["--index", str(env["index"]), "--model", str(env["model"]), "--onnx", "--onnx-dir",
                 str(onnx_dir)]) as server:
        assert requests.get(server.url + "/health").json()["backend"] == "onnxruntime"
        r = requests.post(server.url + "/v1/embeddings", json={"input": texts + [_data_uri(blobs[0])]})
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got[:2], _ref_text(env["loaded"], texts), atol=1e-4)
    np.testing.assert_allclose(got[2:], _ref_image(env["loaded"], blobs), atol=1e-4)
