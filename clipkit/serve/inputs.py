"""Image inputs of a request -> preprocessed tensors, refusing what is not a safe image with a 400 naming it.

Bytes come from a data: URI / base64 string, or from an http(s) URL when the service allows URL fetching; then the
URL goes through the data-prep SSRF guard (`clipkit.data_prep.ssrf`: public addresses only, pinned, redirects
re-checked) and its size and time caps. The header is checked before decoding (`clipkit.images.decode_image`), so a
decompression bomb is refused without allocating its pixels. Runs in a worker thread, never on the event loop.
"""

import base64
import binascii
import re
from typing import Any, Callable

from clipkit.images import ImageRejected, decode_image
from clipkit.serve.errors import APIError

_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,", re.ASCII)


def is_image_data_uri(text: str) -> bool:
    return text[:11].lower() == "data:image/"


def decode_base64_image(text: str, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI or of bare base64 (standard or URL-safe alphabet)."""
    payload = text
    if text[:5].lower() == "data:":
        m = _DATA_URI.match(text)
        if m is None or not m.group(3):
            raise APIError(400, f"{param}: a data: URI must look like data:image/png;base64,... (base64 only)", param)
        if m.group(1) and not m.group(1).lower().startswith("image/"):
            raise APIError(400, f"{param}: data URI of type {m.group(1)!r}, expected image/*", param)
        payload = text[m.end():]
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload.replace("-", "+").replace("_", "/") + "=" * (-len(payload) % 4),
                                validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: not valid base64 ({e})", param) from e
    if not data:
        raise APIError(400, f"{param}: empty image", param)
    return data


def fetch_image_bytes(url: str, fetcher, param: str) -> bytes:
    """Downloads an image URL through the SSRF guard; `fetcher` None means URL fetching is off."""
    if fetcher is None:
        raise APIError(400, f"{param}: image URLs are not fetched by this service (start it with "
                            "--allow-url-fetch to allow them); send the image as base64 instead", param,
                       code="url_fetch_disabled")
    from clipkit.data_prep.fetch import FetchError
    from clipkit.data_prep.ssrf import URLRefused

    try:
        return fetcher.fetch(url)
    except URLRefused as e:
        raise APIError(400, f"{param}: URL refused ({e})", param, code=e.reason) from e
    except FetchError as e:
        raise APIError(400, f"{param}: could not fetch the image ({e})", param, code=e.reason) from e


def image_tensor(data: bytes, preprocess: Callable, max_pixels: int, param: str) -> Any:
    """Header-checked decode + the model's preprocessing: [3, H, W] float tensor."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageRejected as e:
        raise APIError(400, f"{param}: {e}", param, code=e.reason) from e
    return preprocess(image)
