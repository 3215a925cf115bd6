"""URL dumps against a local HTTP server on 127.0.0.1: failure kinds recorded per row, and the SSRF guard."""

import io
import json
import os
import socket
import ssl

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from clipkit.data_prep import ShardConfig, build_shards, ssrf
from tests.data_prep_helpers import (
    HTML_PAGE,
    ImageServer,
    Route,
    huge_png_bytes,
    jpeg_bytes,
    palette_png_bytes,
    rgba_png_bytes,
    write_dump,
)

OK = jpeg_bytes(300, 200, seed=1)


def _routes():
    return {
        "/ok.jpg": Route(OK, headers={"Content-Type": "image/jpeg"}),
        "/copy-of-ok.jpg": Route(OK),
        "/slow.jpg": Route(jpeg_bytes(50, 50), delay=2.5),
        "/truncated.jpg": Route(jpeg_bytes(300, 200, seed=2)[:-3000]),
        "/page.jpg": Route(HTML_PAGE, headers={"Content-Type": "text/html"}),
        "/huge.png": Route(huge_png_bytes(60000, 60000)),
        "/rgba.png": Route(rgba_png_bytes(96, 64)),
        "/palette.png": Route(palette_png_bytes(64, 64)),
        "/noai.jpg": Route(jpeg_bytes(80, 80, seed=3), headers={"X-Robots-Tag": "nofollow, noai"}),
        "/flaky.jpg": Route(jpeg_bytes(90, 70, seed=4), fail_first=1),
        "/moved.jpg": Route(status=302, headers={"Location": "/target.jpg"}),
        "/target.jpg": Route(jpeg_bytes(70, 90, seed=7)),
        "/big.jpg": Route(jpeg_bytes(600, 600, seed=5, quality=100)),
        "/tiny.jpg": Route(jpeg_bytes(20, 20, seed=6)),
        "/cut.jpg": Route(OK[:1000], headers={"Content-Length": str(len(OK))}, close=True),
        "/with%20space%C3%A9.jpg": Route(jpeg_bytes(50, 60, seed=8)),
    }


# (path, caption, expected status, expected reason)
CASES = [
    ("/ok.jpg", "a &amp;amp; b", "success", None),
    ("/missing.jpg", "404", "failed_download", "http_404"),
    ("/slow.jpg", "slow", "failed_download", "timeout"),
    ("/truncated.jpg", "truncated", "failed_image", "corrupt_image"),
    ("/page.jpg", "html", "failed_image", "not_an_image"),
    ("/huge.png", "bomb", "failed_image", "too_many_pixels"),
    ("/rgba.png", "rgba", "success", None),
    ("/palette.png", "palette", "success", None),
    ("/copy-of-ok.jpg", "BADUTF8", "duplicate", "same_sha256"),
    ("/noai.jpg", "opted out", "opt_out", "x_robots_tag_noai"),
    ("/flaky.jpg", "503 then 200", "success", None),
    ("/moved.jpg", "redirect", "success", None),
    ("/big.jpg", "too big", "failed_download", "too_large"),
    ("/ok.jpg", "   ", "empty_caption", "empty_caption"),
    ("/tiny.jpg", "tiny", "failed_image", "too_small"),
    ("/cut.jpg", "connection cut", "failed_download", "truncated_body"),
    ("ftp://127.0.0.1/a.jpg", "ftp", "refused", "unsupported_scheme"),
    ("/with spaceé.jpg", "raw space and é in the URL", "success", None),
]


def _read_results(output):
    tables = [pq.read_table(str(p)) for p in sorted(output.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def test_url_dump_records_every_failure_kind(tmp_path):
    with ImageServer(_routes()) as server:
        rows = [{"url": path if "://" in path else server.url(path), "text": cap, "id": i}
                for i, (path, cap, _, _) in enumerate(CASES)]
        dump = write_dump(str(tmp_path / "dump.csv"), rows, ["url", "text", "id"])
        raw = open(dump, "rb").read().replace(b"BADUTF8", b"na\xefve caf\xe9")  # Latin-1 bytes in a UTF-8 file
        open(dump, "wb").write(raw)
        config = ShardConfig(
            inputs=[dump], output=str(tmp_path / "out"), url_col="url", caption_col="text", extra_cols=["id"],
            samples_per_shard=6, image_size=64, min_size=32, max_bytes=100_000, timeout=1.0, retries=1,
            allow_private_network=True, dedup=True, workers=1, progress=False, keep_empty_captions=False,
        )
        manifest = build_shards(config, log=io.StringIO())
        assert server.routes["/ok.jpg"].hits == 1  # the empty-caption row was never fetched
        assert server.routes["/flaky.jpg"].hits == 2

    results = _read_results(tmp_path / "out")
    assert [r["id"] for r in results] == [str(i) for i in range(len(CASES))]  # every row, in input order
    for result, (path, _, status, reason) in zip(results, CASES):
        assert (result["status"], result["error_reason"]) == (status, reason), (path, result["error_message"])
        assert (result["error_message"] is None) == (status == "success")
    assert manifest["successes"] == 6 and manifest["duplicates_removed"] == 1
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 1, "00001.tar": 4,
                                                                         "00002.tar": 1}

    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False))
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    assert sorted(by_id) == ["0", "10", "11", "17", "6", "7"]
    meta = json.loads(by_id["0"]["json"])
    assert by_id["0"]["txt"].decode() == "a & b" and meta["caption"] == "a & b"
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (64, 64, 300, 200)
    import hashlib

    assert meta["sha256"] == hashlib.sha256(OK).hexdigest() and meta["source"].endswith("/ok.jpg")
    rgba = Image.open(io.BytesIO(by_id["6"]["jpg"])).convert("RGB")
    assert rgba.getpixel((2, 32)) >= (245, 245, 245)  # transparent half composited on white
    assert results[8]["caption"] == "naïve café"  # the duplicate row keeps its repaired caption in the parquet


class _ConnectionLog:
    """Replaces socket.create_connection: records every attempt and refuses anything but loopback."""

    def __init__(self, monkeypatch):
        self.attempts = []
        self.real = socket.create_connection
        monkeypatch.setattr(socket, "create_connection", self)

    def __call__(self, address, *args, **kwargs):
        self.attempts.append(address[0])
        if address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"connection attempted to {address[0]}")
        return self.real(address, *args, **kwargs)


def _run_urls(tmp_path, urls, **kwargs):
    dump = write_dump(str(tmp_path / "urls.jsonl"), [{"url": u, "caption": f"c{i}"} for i, u in enumerate(urls)],
                      ["url", "caption"])
    config = ShardConfig(inputs=[dump], output=str(tmp_path / "out"), url_col="url", caption_col="caption",
                         image_size=32, workers=1, retries=0, timeout=2.0, progress=False, **kwargs)
    build_shards(config, log=io.StringIO())
    return _read_results(tmp_path / "out")


def test_ssrf_refusals_without_the_flag(tmp_path, monkeypatch):
    fake_dns = {"metadata.test": ["169.254.169.254"], "intranet.test": ["10.0.0.5"], "localhost": ["127.0.0.1"]}
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: fake_dns[host])
    connections = _ConnectionLog(monkeypatch)
    with ImageServer(_routes()) as server:
        port = server.httpd.server_address[1]
        urls = [
            server.url("/ok.jpg"),
            f"http://localhost:{port}/ok.jpg",
            f"http://0x7f000001:{port}/ok.jpg",
            f"http://2130706433:{port}/ok.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/ok.jpg",
            "http://metadata.test/latest/meta-data/",
            "http://intranet.test:8080/admin",
            "http://169.254.169.254/latest/meta-data/",
            "file:///etc/passwd",
        ]
        results = _run_urls(tmp_path, urls)
        assert server.requests == []
    assert connections.attempts == []
    reasons = [r["error_reason"] for r in results]
    assert reasons == ["loopback_address"] * 5 + ["link_local_address", "private_address", "link_local_address",
                                                   "unsupported_scheme"]
    assert all(r["status"] == "refused" and "allow-private-network" in r["error_message"] for r in results[:8])


def test_every_redirect_hop_is_rechecked(tmp_path, monkeypatch):
    """127.0.0.1 plays a public CDN here; its redirects to private targets must be refused at the next hop."""
    real_refusal = ssrf.address_refusal
    monkeypatch.setattr(ssrf, "address_refusal", lambda ip: None if str(ip) == "127.0.0.1" else real_refusal(ip))
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: {"metadata.test": ["169.254.169.254"]}[host])
    connections = _ConnectionLog(monkeypatch)
    routes = _routes()
    routes.update({
        "/to-metadata": Route(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
        "/to-name": Route(status=301, headers={"Location": "http://metadata.test/x"}),
        "/to-hex": Route(status=307, headers={"Location": "http://0x0a000001/x"}),
        "/to-file": Route(status=302, headers={"Location": "file:///etc/passwd"}),
        "/to-ok": Route(status=302, headers={"Location": "/moved.jpg"}),  # two hops, both public
    })
    with ImageServer(routes) as server:
        results = _run_urls(tmp_path, [server.url(p) for p in ("/to-metadata", "/to-name", "/to-hex", "/to-file",
                                                               "/to-ok")])
    assert [(r["status"], r["error_reason"]) for r in results] == [
        ("refused", "link_local_address"),
        ("refused", "link_local_address"),
        ("refused", "private_address"),
        ("refused", "unsupported_scheme"),
        ("success", None),
    ]
    assert set(connections.attempts) == {"127.0.0.1"}


def test_allow_private_network_still_only_http(tmp_path):
    results = _run_urls(tmp_path, ["file:///etc/passwd", "gopher://127.0.0.1/x"], allow_private_network=True)
    assert [r["error_reason"] for r in results] == ["unsupported_scheme"] * 2


@pytest.mark.parametrize("directives, status", [(frozenset(), "success"), (frozenset({"noai"}), "opt_out")])
def test_robots_opt_out_is_configurable(tmp_path, directives, status):
    with ImageServer(_routes()) as server:
        results = _run_urls(tmp_path, [server.url("/noai.jpg")], allow_private_network=True,
                            disallowed_directives=directives)
    assert results[0]["status"] == status


def test_https_uses_the_checked_address_and_verifies_the_name(tmp_path, monkeypatch):
    """The TLS connection goes to the address the guard checked, with SNI and certificate check for the URL's host."""
    cert = os.path.join(os.path.dirname(__file__), "data_prep_tls_cert.pem")  # CN/SAN img.test, self-signed
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, os.path.join(os.path.dirname(__file__), "data_prep_tls_key.pem"))
    real_context = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real_context(cafile=cert))
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: {"img.test": ["127.0.0.1"],
                                                                  "other.test": ["127.0.0.1"]}[host])
    connections = _ConnectionLog(monkeypatch)
    with ImageServer(_routes(), tls_context=server_context) as server:
        urls = [server.url("/ok.jpg", "img.test"), server.url("/moved.jpg", "img.test"),
                server.url("/ok.jpg", "other.test")]
        results = _run_urls(tmp_path, urls, allow_private_network=True)
    assert [(r["status"], r["error_reason"]) for r in results] == [
        ("success", None), ("success", None), ("failed_download", "tls_error")]
    assert "certificate" in results[2]["error_message"]
    assert set(connections.attempts) == {"127.0.0.1"}
