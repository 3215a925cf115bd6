"""Property 11 of the reliability suite (issue 5): the data-prep downloader's SSRF guard.

Refused before any connection: file:, ftp:, loopback in every spelling (127.0.0.1, [::1], 0x7f000001, 2130706433,
0177.0.0.1, 127.1, [::ffff:127.0.0.1]), 10.0.0.0/8, link-local 169.254.169.254, and host names that resolve (the
resolver is mocked) to private addresses. A redirect from a public-looking host to loopback is refused at that hop,
and a 100 MB body stops at the byte cap. A real HTTP server on 127.0.0.1 plays the allowed hosts.
"""

import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipkit.data_prep import ShardConfig, build_shards, fetch, ssrf
from clipkit.data_prep.fetch import FetchError, FetchOptions, HttpFetcher
from tests._shards import jpeg_bytes
from tests.data_prep_helpers import write_dump

FAKE_DNS = {
    "intranet.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "localhost": ["127.0.0.1"],
    "v6-loopback.example": ["::1"],
    "mixed.example": ["93.184.216.34", "192.168.1.10"],  # one private address among public ones is enough
    "cgnat.example": ["100.64.0.1"],
}
HUGE = 100 * 2**20
IMAGE = jpeg_bytes(np.random.default_rng(0), 32)


@pytest.fixture
def no_real_network(monkeypatch):
    """Fake DNS; every outgoing TCP connection is recorded (and only 127.0.0.1 is allowed through)."""

    def resolve(host, port):
        if host not in FAKE_DNS:
            raise AssertionError(f"real DNS lookup attempted for {host}")
        return FAKE_DNS[host]

    connections = []
    real_connect = socket.create_connection

    def connect(address, *args, **kwargs):
        connections.append(address[0])
        if address[0] != "127.0.0.1":
            raise AssertionError(f"connection attempted to {address}")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(ssrf, "resolve_host", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    return connections


REFUSED = [
    ("file:///etc/passwd", "unsupported_scheme"),
    ("ftp://example.com/a.jpg", "unsupported_scheme"),
    ("gopher://example.com/a.jpg", "unsupported_scheme"),
    ("http://127.0.0.1/a.jpg", "loopback_address"),
    ("http://[::1]/a.jpg", "loopback_address"),
    ("http://0x7f000001/a.jpg", "loopback_address"),
    ("http://2130706433/a.jpg", "loopback_address"),
    ("http://0177.0.0.1/a.jpg", "loopback_address"),
    ("http://127.1/a.jpg", "loopback_address"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "loopback_address"),
    ("http://localhost:8080/a.jpg", "loopback_address"),
    ("http://v6-loopback.example/a.jpg", "loopback_address"),
    ("http://10.0.0.1/a.jpg", "private_address"),
    ("http://10.255.255.254:8080/admin", "private_address"),
    ("http://0x0a000001/a.jpg", "private_address"),
    ("http://[::ffff:10.1.2.3]/a.jpg", "private_address"),
    ("http://intranet.example/a.jpg", "private_address"),
    ("http://mixed.example/a.jpg", "private_address"),
    ("https://169.254.169.254/latest/meta-data/", "link_local_address"),
    ("http://metadata.example/latest/meta-data/", "link_local_address"),
    ("http://[fe80::1]/a.jpg", "link_local_address"),
    ("http://0.0.0.0/a.jpg", "unspecified_address"),
    ("http://cgnat.example/a.jpg", "non_global_address"),
]


@pytest.mark.parametrize("url, reason", REFUSED)
def test_refused_before_any_connection(no_real_network, url, reason):
    with pytest.raises(FetchError) as e:
        HttpFetcher(FetchOptions(retries=0)).fetch(url)
    assert (e.value.status, e.value.reason) == ("refused", reason)
    assert no_real_network == []


class _Server:
    """127.0.0.1 server: /start-* redirect to loopback targets, /secret must never be asked for, /huge streams 100 MB
    without a Content-Length (or with one, /huge-declared), /ok.jpg is an image."""

    def __init__(self):
        self.requests = []
        self.sent = 0
        self.stream_ended = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # close-delimited bodies: the client cannot know the size in advance

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                port = server.port
                redirects = {
                    "/start-ip": f"http://127.0.0.1:{port}/secret",
                    "/start-name": f"http://localhost:{port}/secret",
                    "/start-v6": f"http://[::1]:{port}/secret",
                    "/start-int": f"http://2130706433:{port}/secret",
                    "/start-relative": "/secret",  # same host: allowed, since the host itself passed
                    "/start-public": f"http://cdn.example.com:{port}/ok.jpg",
                }
                if self.path in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[self.path])
                    self.end_headers()
                elif self.path in ("/ok.jpg", "/secret"):
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(IMAGE)
                elif self.path.startswith("/huge"):
                    self.send_response(200)
                    if self.path == "/huge-declared":
                        self.send_header("Content-Length", str(HUGE))
                    self.end_headers()
                    chunk = b"\0" * 65536
                    try:
                        for _ in range(HUGE // len(chunk)):
                            self.wfile.write(chunk)
                            server.sent += len(chunk)
                    except OSError:
                        pass  # the client hung up: what we want
                    finally:
                        server.stream_ended.set()
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def public_cdn(no_real_network, monkeypatch):
    """`cdn.example.com` is a public host that happens to be served from 127.0.0.1: only that first hop skips the
    guard; every other URL, redirect targets included, goes through the real check."""
    real_check = fetch.check_url

    def check(url, allow_private_network=False):
        target = real_check(url.replace("cdn.example.com", "93.184.216.34"), allow_private_network)
        if target.host == "93.184.216.34":
            return ssrf.Target(target.scheme, "cdn.example.com", target.port, target.path, "127.0.0.1")
        return target

    monkeypatch.setattr(fetch, "check_url", check)
    with _Server() as server:
        yield server


@pytest.mark.parametrize("start", ["/start-ip", "/start-name", "/start-v6", "/start-int"])
def test_redirect_to_loopback_is_refused_at_the_hop(public_cdn, start):
    url = f"http://cdn.example.com:{public_cdn.port}{start}"
    with pytest.raises(FetchError) as e:
        HttpFetcher(FetchOptions(retries=0)).fetch(url)
    assert (e.value.status, e.value.reason) == ("refused", "loopback_address")
    assert public_cdn.requests == [start]  # /secret was never requested


def test_redirects_between_public_urls_are_followed(public_cdn):
    """The control for the test above: a redirect is followed when its target passes the guard."""
    fetcher = HttpFetcher(FetchOptions(retries=0))
    assert fetcher.fetch(f"http://cdn.example.com:{public_cdn.port}/start-public") == IMAGE
    assert fetcher.fetch(f"http://cdn.example.com:{public_cdn.port}/start-relative") == IMAGE
    assert public_cdn.requests == ["/start-public", "/ok.jpg", "/start-relative", "/secret"]


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_a_100mb_body_stops_at_the_byte_cap(public_cdn, path):
    cap = 2**20
    try:
        HttpFetcher(FetchOptions(retries=0, max_bytes=cap, timeout=60)).fetch(
            f"http://cdn.example.com:{public_cdn.port}{path}")
        outcome = None
    except FetchError as e:  # not kept: the traceback must not keep the response (and so the socket) alive
        outcome = (e.status, e.reason)
    assert outcome == ("failed_download", "too_large")
    assert public_cdn.stream_ended.wait(timeout=60)  # the handler saw the hang-up (or sent everything)
    # the client hung up after ~1 MB; what the server got out is that plus socket buffers, far from 100 MB
    assert public_cdn.sent < 32 * 2**20, public_cdn.sent
    print(f"\n{path}: server sent {public_cdn.sent / 2**20:.1f} MB of 100 MB before the client hung up at 1 MB")


def test_build_shards_records_refusals_per_row(no_real_network, tmp_path):
    urls = [u for u, _ in REFUSED]
    dump = write_dump(str(tmp_path / "urls.jsonl"), [{"url": u, "caption": f"c{i}"} for i, u in enumerate(urls)],
                      ["url", "caption"])
    config = ShardConfig(inputs=[dump], output=str(tmp_path / "out"), url_col="url", caption_col="caption",
                         image_size=32, workers=1, retries=0, timeout=2.0, progress=False)
    build_shards(config, log=io.StringIO())
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [(r["source"], r["status"], r["error_reason"]) for r in rows] == [(u, "refused", why) for u, why in REFUSED]
    assert no_real_network == []
