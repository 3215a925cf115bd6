"""Safe image decoding shared by data prep, the training loader and eval.

Every image comes from the open web. The size is checked from the header before any pixel is decoded, so a
decompression bomb (a few-KB PNG that claims 20000 x 20000 pixels) is rejected without allocating its pixels.
"""

import io
import warnings
from typing import Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

# Default cap for decoded pixels: 8192 x 8192. PIL's own guard (MAX_IMAGE_PIXELS, ~179 MP) only warns below 2x.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageRejected(ValueError):
    """An image that must be skipped. `reason` is a short machine-readable kind used in counters."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def probe_image(data: bytes) -> Tuple[Image.Image, Tuple[int, int]]:
    """Opens `data` lazily: reads the header only. Returns (lazy image, (width, height))."""
    if not data:
        raise ImageRejected("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from e
    except Image.DecompressionBombWarning as e:
        raise ImageRejected("too_many_pixels", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # HTML error pages saved as .jpg land here: PIL cannot identify them.
        raise ImageRejected("not_an_image", str(e)) from e
    return img, img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts to RGB; alpha and palette-with-transparency images are composited on white, not on black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> Image.Image:
    """Decodes image bytes into an RGB PIL image, or raises ImageRejected.

    The width x height from the header is checked against `max_pixels` before decoding; EXIF orientation is applied;
    truncated files raise instead of returning a half-grey image.
    """
    img, (w, h) = probe_image(data)
    if w <= 0 or h <= 0:
        raise ImageRejected("bad_size", f"{w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    try:
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        # "image file is truncated", broken PNG chunks, bad JPEG markers
        raise ImageRejected("corrupt_image", str(e)) from e
