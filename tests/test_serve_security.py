"""serve/app.py refuses what it must: every bad input gets its 4xx with a JSON error naming the problem (never a
500), a missing or wrong API key gets 401 on every route but /health, URLs go through the SSRF guard, and an index
built by another model is refused at start."""

import base64
import io
import json

import pytest
import requests

from tests._serve import Server, build_index, export_random_model, run_serve
from tests._shards import bomb_png, make_shards

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_sec")
    model_dir = export_random_model(root / "model")
    shards = make_shards(str(root / "shards"), 1, 10, image_size=32)
    index_dir = build_index(root / "index", model_dir, shards.spec, ["--no-map"])
    args = ["--index", str(index_dir), "--model", str(model_dir), "--api-key", KEY, "--max-inputs", "4",
            "--max-body-bytes", "300000", "--max-text-chars", "50", "--max-image-pixels", "1000000",
            "--max-results", "20", "--allow-url-fetch"]
    with Server(args) as server:
        yield {"url": server.url, "root": root, "model": model_dir, "index": index_dir, "server": server}


def _png(size=32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/embeddings", {"input": "x"}), ("GET", "/indices-list", None),
          ("POST", "/knn-service", {"text": "x"}), ("POST", "/metadata", {"ids": [0]}), ("GET", "/images/0", None),
          ("GET", "/metrics", None)]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_auth_refuses_missing_and_wrong_keys(srv, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = requests.request(method, srv["url"] + path, json=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    r = requests.request(method, srv["url"] + path, json=body, headers=AUTH)
    assert r.status_code == 200, (path, r.text)


def test_health_needs_no_key(srv):
    assert requests.get(srv["url"] + "/health").status_code == 200


def _truncated_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()[:-60]


BAD_EMBEDDINGS = [
    ("not json", b"{input:", 400, "not valid JSON"),
    ("no input", {"model": "x"}, 422, "input"),
    ("input of wrong type", {"input": {"a": 1}}, 422, "input"),
    ("empty list", {"input": []}, 400, "empty list"),
    ("too many inputs", {"input": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("text too long", {"input": "x" * 51}, 400, "at most 50"),
    ("token arrays", {"input": [[1, 2, 3]]}, 400, "token arrays"),
    ("bad base64", {"input": "data:image/png;base64,@@@notbase64"}, 400, "base64"),
    ("data uri not base64", {"input": "data:image/png,abc"}, 400, "base64"),
    ("html as image", {"input": [_uri(b"<!DOCTYPE html><html>404</html>")]}, 400, "not_an_image"),
    ("decompression bomb", {"input": [_uri(bomb_png())]}, 400, "too_many_pixels"),
    ("too many pixels", {"input": [{"type": "image", "image": _uri(_png(1200))}]}, 400, "too_many_pixels"),
    ("truncated jpeg", {"input": [{"type": "image", "image": base64.b64encode(_truncated_jpeg()).decode()}]}, 400,
     "corrupt_image"),
    ("image item with two sources", {"input": [{"type": "image", "image": "AAAA", "url": "http://x"}]}, 400,
     "exactly one"),
    ("unknown item type", {"input": [{"type": "audio", "audio": "x"}]}, 422, "input"),
    ("bad encoding_format", {"input": "x", "encoding_format": "xml"}, 422, "encoding_format"),
    ("wrong dimensions", {"input": "x", "dimensions": 3}, 400, "dimensions"),
    ("unknown model", {"input": "x", "model": "gpt-4"}, 404, "not served here"),
    ("private image url", {"input": [{"type": "image", "url": "http://127.0.0.1:9/x.png"}]}, 400, "loopback"),
    ("metadata address url", {"input": [{"type": "image", "url": "http://169.254.169.254/latest"}]}, 400,
     "link_local"),
    ("file url", {"input": [{"type": "image", "url": "file:///etc/passwd"}]}, 400, "scheme"),
]

BAD_KNN = [
    ("nothing to search with", {"num_images": 3}, 400, "give one of"),
    ("num_images 0", {"text": "x", "num_images": 0}, 422, "num_images"),
    ("num_images over the cap", {"text": "x", "num_images": 21}, 400, "at most 20"),
    ("unknown modality", {"text": "x", "modality": "audio"}, 422, "modality"),
    ("wrong embedding size", {"embedding_input": [0.1, 0.2]}, 400, "embedding_input"),
    ("NaN embedding", b'{"embedding_input": [NaN' + b", 0.0" * 127 + b"]}", 400, "finite"),
    ("unknown index", {"text": "x", "indice_name": "laion5B"}, 404, "laion5B"),
    ("bad base64 image", {"image": "%%%"}, 400, "base64"),
    ("text too long", {"text": "y" * 51}, 400, "at most 50"),
    ("private image_url", {"image_url": "http://10.0.0.1/x.jpg"}, 400, "private"),
    ("array body", [1, 2], 422, "body"),
]

BAD_METADATA = [
    ("id out of range", {"ids": [10]}, 400, "not an id"),
    ("negative id", {"ids": [-1]}, 400, "not an id"),
    ("huge id", {"ids": [10 ** 30]}, 400, "not an id"),
    ("too many ids", {"ids": list(range(21))}, 400, "at most 20"),
    ("ids not a list", {"ids": "0"}, 422, "ids"),
]


def _post(srv, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(srv["url"] + path, data=data, headers={**AUTH, "Content-Type": "application/json"})


@pytest.mark.parametrize("path,case", [("/v1/embeddings", c) for c in BAD_EMBEDDINGS]
                         + [("/knn-service", c) for c in BAD_KNN] + [("/metadata", c) for c in BAD_METADATA],
                         ids=lambda x: x if isinstance(x, str) else x[0])
def test_bad_input_gets_its_4xx(srv, path, case):
    name, body, status, words = case
    r = _post(srv, path, body)
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), (name, err)


def test_bad_paths_and_oversized_bodies(srv):
    for path, status in (("/images/-1", 422), ("/images/abc", 422), ("/images/10", 404), ("/images/1e100", 422),
                         ("/nope", 404), ("/images/99999999999999999999999", 422)):
        r = requests.get(srv["url"] + path, headers=AUTH)
        assert r.status_code == status, (path, r.text)
        assert "error" in r.json()
    r = requests.post(srv["url"] + "/v1/embeddings", headers=AUTH, data=b"x" * 400_000)
    assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap applies to what is streamed
        for _ in range(40):
            yield b"y" * 10_000

    r = requests.post(srv["url"] + "/v1/embeddings", headers=AUTH, data=chunks())
    assert r.status_code == 413
    r = requests.get(srv["url"] + "/v1/embeddings", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_no_hostile_input_reached_a_500(srv):
    """Runs last in this file: nothing above may have been answered 500, and the service still works."""
    metrics = requests.get(srv["url"] + "/metrics", headers=AUTH).text
    assert 'status="500"' not in metrics
    assert 'clipkit_errors_total{route="/v1/embeddings",status="400"}' in metrics
    r = _post(srv, "/v1/embeddings", {"input": ["ok", _uri(_png())]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert "Traceback" not in srv["server"].output()


def test_index_of_another_model_is_refused_at_start(srv, tmp_path):
    other = export_random_model(tmp_path / "other", seed=7)
    proc = run_serve(["--index", str(srv["index"]), "--model", str(other)])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: index ") and "fingerprint" in last and "embed the data again" in last


def test_binds_loopback_by_default():
    from clipkit.serve.cli import serve_parser

    assert serve_parser().parse_args(["--index", "i", "--model", "m"]).host == "127.0.0.1"
