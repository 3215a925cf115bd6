"""Test data for the data-prep tests: images (good and hostile), dumps in every format, a local HTTP server."""

import csv
import gzip
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg_bytes(width: int, height: int, seed: int = 0, quality: int = 90, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth gradient + a little noise: compresses like a photo, differs per seed
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width), y * 255 / max(1, height), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape) + rng.integers(0, 80), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def rgba_png_bytes(width: int = 64, height: int = 48) -> bytes:
    """Left half fully transparent black, right half opaque red: on white, the left half must come out white."""
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[:, width // 2 :, 0] = 255
    pixels[:, width // 2 :, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def palette_png_bytes(width: int = 40, height: int = 40) -> bytes:
    """Palette image whose index 0 (black) is transparent: background must come out white."""
    img = Image.new("P", (width, height), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (width // 2, 0, width, height))
    buffer = io.BytesIO()
    img.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


def huge_png_bytes(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking PNG whose header claims width x height pixels (a decompression bomb): a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HTML_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"


def write_dump(path: str, rows: Sequence[Dict], columns: Sequence[str]) -> str:
    """Writes `rows` in the format named by `path`'s extension (csv tsv jsonl json parquet txt, optional .gz)."""
    name = path[:-3] if path.endswith(".gz") else path
    fmt = name.rsplit(".", 1)[-1]
    if fmt == "parquet":
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
        return path
    text = io.StringIO(newline="")
    if fmt in ("csv", "tsv"):
        writer = csv.writer(text, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[r.get(c, "") for c in columns] for r in rows])
    elif fmt == "jsonl":
        text.write("".join(json.dumps({c: r.get(c) for c in columns}) + "\n" for r in rows))
    elif fmt == "json":
        json.dump([{c: r.get(c) for c in columns} for r in rows], text)
    elif fmt == "txt":
        text.write("".join(str(r[columns[0]]) + "\n" for r in rows))
    data = text.getvalue().encode("utf-8")
    with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
        f.write(data)
    return path


class Route:
    def __init__(self, body: bytes = b"", status: int = 200, headers: Dict[str, str] | None = None,
                 delay: float = 0.0, fail_first: int = 0, close: bool = False):
        self.body, self.status, self.headers, self.delay = body, status, headers or {}, delay
        self.close = close  # close the connection after the (possibly short) body
        self.fail_first = fail_first  # answer 503 to the first N requests
        self.hits = 0


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 serving fixed routes; `with ImageServer(routes) as s: s.url('/a.jpg')`."""

    def __init__(self, routes: Dict[str, Route], tls_context=None):
        self.routes = routes
        self.scheme = "https" if tls_context else "http"
        self.requests: List[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                route = server.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    return self._send(404, {}, HTML_PAGE)
                route.hits += 1
                if route.delay:
                    time.sleep(route.delay)
                if route.hits <= route.fail_first:
                    return self._send(503, {}, b"busy")
                self._send(route.status, route.headers, route.body)
                self.close_connection = route.close

            def _send(self, status, headers, body):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients closing keep-alive sockets is normal
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def exif_jpeg() -> bytes:
    """A 64 x 48 JPEG whose EXIF has IFD0 text, an over-long description, Exif-IFD values, a binary MakerNote and a
    GPS position."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "EOS\x00 5D"  # Model, with a NUL
    exif[0x010E] = "d" * 5000  # ImageDescription
    exif[0x0112] = 1  # Orientation
    sub = exif.get_ifd(0x8769)
    sub[0x8827] = 400  # ISOSpeedRatings
    sub[0x927C] = b"\x00\x01binary maker note"
    exif.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef: the GPS IFD must not come out
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()
