"""Huge legitimate images (scans, clip-art: 100 to 600+ Mpx) decoded in bounded memory, bombs still refused.

PIL decodes a whole image into memory (a 20990 x 29700 RGB PNG is 1.9 GB), so images above `--max-pixels` used to be
dropped as `too_many_pixels`, as img2dataset drops them (issue 14). libvips (pyvips, with the libvips binary wheel
pyvips-binary) shrinks JPEG and WebP on load (DCT scaling) and streams PNG row by row through a block shrink, so
`thumbnail_buffer` holds a few hundred rows, not the image: measured 190 MB peak RSS and 1.3 s for 20990 x 29700.

A decompression bomb is a file far smaller than its pixels could be. Deflate (PNG) compresses at most 1032:1, so even
an all-zero 1-bit PNG needs 1/8/1032 = 1/8256 byte per pixel (the 20000 x 20000 bomb of tests/_shards.py: 48 KB);
a blank 8-bit RGB 16000 x 16000 PNG measures 1/330 (zlib level 9), a flat one as JPEG at quality 90 1/37. Real
drawings and scans hold content: the generated 16000 x 16000 flat-colour drawing of the tests is 3.8 MB, 1/67 byte
per pixel. Images above --max-pixels are
refused from the header (no pixel decoded) when they claim more than `max_pixels` (default 2^30, 1.07 Gpx) or have
fewer than `min_bytes_per_pixel` (default 1/4096) bytes per pixel; the rest are decoded under a wall-clock budget
(`time_budget_s`, libvips's kill flag from its progress callback), and at most `slots` at a time per process.
"""

import math
import threading
import time
from dataclasses import dataclass
from typing import Tuple

from PIL import Image

from clipkit.images import ImageRejected

# EXIF orientation -> the PIL transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
STREAM_LOADERS = ("jpegload_buffer", "pngload_buffer", "webpload_buffer")
DEFAULT_MAX_PIXELS = 1 << 30
DEFAULT_MIN_BYTES_PER_PIXEL = 1 / 4096
DEFAULT_TIME_BUDGET_S = 60.0


@dataclass(frozen=True)
class StreamLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # 0: refuse every image above --max-pixels, as before
    min_bytes_per_pixel: float = DEFAULT_MIN_BYTES_PER_PIXEL
    time_budget_s: float = DEFAULT_TIME_BUDGET_S


@dataclass
class HugeHeader:
    width: int  # as stored (before EXIF orientation)
    height: int
    orientation: int
    loader: str
    exif: bytes | None


def _vips():
    try:
        import pyvips
    except (ImportError, OSError) as e:  # OSError: pyvips without a libvips library
        raise ImageRejected("too_many_pixels", f"streamed decoding needs pyvips + pyvips-binary ({e})") from e
    pyvips.cache_set_max(0)  # no operation cache: it would keep input buffers and results alive
    return pyvips


def read_header(data: bytes) -> HugeHeader:
    """libvips reads the header only (milliseconds, whatever the pixel count)."""
    pyvips = _vips()
    try:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential")
    except pyvips.Error as e:
        raise ImageRejected("not_an_image", str(e).strip()[:300]) from e
    fields = set(image.get_fields())
    orientation = int(image.get("orientation")) if "orientation" in fields else 1
    exif = image.get("exif-data") if "exif-data" in fields else None
    return HugeHeader(image.width, image.height, orientation, image.get("vips-loader"), exif)


def check_huge(header: HugeHeader, size_bytes: int, limits: StreamLimits) -> None:
    """Raises ImageRejected("too_many_pixels") for a file that cannot be a real image of the size it claims."""
    pixels = header.width * header.height
    if not limits.max_pixels or pixels > limits.max_pixels:
        raise ImageRejected("too_many_pixels", f"{header.width}x{header.height} > {limits.max_pixels} pixels "
                                               "(the streamed-decoding cap)")
    if size_bytes < limits.min_bytes_per_pixel * pixels:
        raise ImageRejected("too_many_pixels", f"{header.width}x{header.height} in {size_bytes} bytes: fewer than "
                                               f"{limits.min_bytes_per_pixel:.3g} bytes per pixel (a decompression "
                                               "bomb)")
    if header.loader not in STREAM_LOADERS:
        raise ImageRejected("too_many_pixels", f"{header.width}x{header.height} {header.loader}: streamed decoding "
                                               "covers JPEG, PNG and WebP only")


def upright_size(header: HugeHeader) -> Tuple[int, int]:
    swap = header.orientation in (5, 6, 7, 8)
    return (header.height, header.width) if swap else (header.width, header.height)


def decode_huge(data: bytes, header: HugeHeader, upright_target: Tuple[int, int], limits: StreamLimits,
                slots: threading.Semaphore | None = None) -> Image.Image:
    """Decodes to an upright RGB PIL image of `upright_target` pixels (alpha composited on white, 16-bit reduced to
    8), without ever holding the full-resolution image."""
    pyvips = _vips()
    stored = upright_target[::-1] if header.orientation in (5, 6, 7, 8) else upright_target
    deadline = math.inf
    if slots is not None:
        slots.acquire()
    try:
        try:
            image = pyvips.Image.thumbnail_buffer(data, stored[0], height=stored[1], size="force", no_rotate=True,
                                                  option_string="fail_on=error")
            if image.format == "ushort":
                image = (image / 257).cast("uchar")
            if image.hasalpha():
                image = image.flatten(background=[255] * (image.bands - 1))
            if image.bands != 3 or image.interpretation != "srgb":
                image = image.colourspace("srgb")
            if image.bands > 3:
                image = image.extract_band(0, n=3)
            deadline = time.monotonic() + limits.time_budget_s
            image.set_progress(True)
            image.signal_connect("eval", lambda img, progress: img.set_kill(time.monotonic() > deadline))
            pixels = image.write_to_memory()
        except pyvips.Error as e:
            if time.monotonic() > deadline:
                raise ImageRejected("decode_too_slow", f"{header.width}x{header.height}: streamed decoding ran past "
                                                       f"{limits.time_budget_s:g} s") from e
            raise ImageRejected("corrupt_image", str(e).strip()[:300]) from e
    finally:
        if slots is not None:
            slots.release()
    rgb = Image.frombuffer("RGB", (image.width, image.height), pixels, "raw", "RGB", 0, 1)
    if header.orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[header.orientation])
    return rgb


def intermediate_size(upright: Tuple[int, int], scale: float) -> Tuple[int, int]:
    """The size libvips shrinks to: twice the final scale (PIL's area resize then makes the final pixels, as for
    every other image), never above the source."""
    factor = min(1.0, 2.0 * scale)
    return max(1, math.ceil(upright[0] * factor)), max(1, math.ceil(upright[1] * factor))
