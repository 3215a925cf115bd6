"""One image in, one resized and encoded image out, with img2dataset's resize modes.

Speed without losing safety:
- size, aspect ratio and pixel count are checked from the header (clipkit.images.probe_image) before any pixel is
  decoded, so decompression bombs cost nothing;
- JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the target allows it (`Image.draft`: libjpeg's DCT scaling);
- downscaling is area averaging (BOX, like img2dataset's INTER_AREA) with PIL's `reducing_gap`, and a center crop
  resizes only the crop box;
- an image already in the output format and size is copied byte for byte; it is still decoded (at 1/8 scale for a
  JPEG) so a truncated file is not copied;
- an image above `max_pixels` that is no decompression bomb (bytes per pixel, a pixel cap, a time budget) is decoded
  by libvips in bounded memory, shrinking while it streams (clipkit/data_prep/huge.py), instead of being dropped.
"""

import dataclasses
import io
import math
import re
import threading
from dataclasses import dataclass
from typing import Dict, Tuple

from PIL import ExifTags, Image, ImageOps

from clipkit.data_prep import huge
from clipkit.images import DEFAULT_MAX_PIXELS, ImageRejected, probe_image, to_rgb

RESIZE_MODES = ("no", "center_crop", "keep_ratio", "keep_ratio_largest", "border")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# --extract-exif: IFD0 ("Image ...") and the Exif IFD ("EXIF ..."), named as img2dataset's exifread names them. The GPS
# IFD is left out (a photo's location is personal data), so are binary values (MakerNote, thumbnails, UserComment);
# a hostile file cannot make the json big: at most EXIF_MAX_TAGS values of EXIF_MAX_CHARS characters.
_EXIF_POINTERS = {0x8769, 0x8825, 0xA005}  # Exif, GPS and interoperability IFD offsets
EXIF_MAX_TAGS = 100
EXIF_MAX_CHARS = 200


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    format: str = "jpg"
    quality: int = 95
    min_size: int = 0
    max_aspect_ratio: float = math.inf
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decoded by PIL in memory up to this; above, streamed (huge.py)
    extract_exif: bool = False
    stream_max_pixels: int = huge.DEFAULT_MAX_PIXELS  # streamed decoding up to this; 0: refuse above max_pixels
    stream_min_bytes_per_pixel: float = huge.DEFAULT_MIN_BYTES_PER_PIXEL  # fewer: a decompression bomb
    stream_time_budget_s: float = huge.DEFAULT_TIME_BUDGET_S  # wall-clock limit of one streamed decode

    def stream_limits(self) -> huge.StreamLimits:
        return huge.StreamLimits(self.stream_max_pixels, self.stream_min_bytes_per_pixel, self.stream_time_budget_s)


@dataclass
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    exif: Dict[str, str] | None = None  # with ImageOptions.extract_exif


def check_header(width: int, height: int, options: ImageOptions) -> None:
    """Raises ImageRejected for sizes the options refuse; uses only the header's width and height."""
    if width <= 0 or height <= 0:
        raise ImageRejected("bad_size", f"{width}x{height}")
    if options.max_pixels is not None and width * height > options.max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {options.max_pixels} pixels")
    if min(width, height) < options.min_size:
        raise ImageRejected("too_small", f"{width}x{height} < {options.min_size}")
    if max(width, height) / min(width, height) > options.max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{width}x{height} > {options.max_aspect_ratio:g}")


def output_geometry(width: int, height: int, options: ImageOptions) -> Tuple[float, Tuple[int, int], bool]:
    """For an upright image: (scale, output size, padded). The crop of center_crop is in the output size."""
    size, mode = options.image_size, options.resize_mode
    if mode == "no":
        return 1.0, (width, height), False
    side = min(width, height) if mode in ("center_crop", "keep_ratio") else max(width, height)
    scale = size / side
    if options.resize_only_if_bigger and scale >= 1.0:
        return 1.0, (width, height), False
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    if mode == "center_crop":
        return scale, (size, size), False
    if mode == "border":
        return scale, (size, size), scaled != (size, size)
    return scale, scaled, False


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not reject an image that decodes fine
        return 1


def exif_tags(img: Image.Image) -> Dict[str, str]:
    """The source image's EXIF as {"Image Make": "Canon", "EXIF ExposureTime": "0.01", ...} (see EXIF_MAX_TAGS)."""
    try:
        exif = img.getexif()
    except Exception:  # a broken EXIF block must not reject an image that decodes fine
        return {}
    return _exif_dict(exif)


def _exif_dict(exif: Image.Exif) -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        for prefix, ifd in (("Image", exif), ("EXIF", exif.get_ifd(0x8769))):
            for tag, value in ifd.items():
                if tag in _EXIF_POINTERS or isinstance(value, bytes):
                    continue
                text = str(value).replace("\x00", "").strip()
                if text:
                    out[f"{prefix} {ExifTags.TAGS.get(tag, f'Tag 0x{tag:04X}')}"] = text[:EXIF_MAX_CHARS]
                if len(out) == EXIF_MAX_TAGS:
                    return out
    except Exception:  # a broken EXIF block must not reject an image that decodes fine
        pass
    return out


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # "image file is truncated", broken PNG chunks, bad JPEG markers
        raise ImageRejected("corrupt_image", str(e)) from e
    return img


def process_image(data: bytes, options: ImageOptions, huge_slots: threading.Semaphore | None = None
                  ) -> ProcessedImage:
    """Checks, decodes, orients, composites on white, resizes and encodes; raises ImageRejected.

    Images above options.max_pixels take the streamed path (`huge_slots` bounds how many at a time)."""
    try:
        img, (width, height) = probe_image(data)
    except ImageRejected as e:  # PIL's own bomb check (> 89 Mpx) fires before the size is known
        if e.reason == "too_many_pixels" and options.stream_max_pixels:
            _refuse_sparse_bomb(data, str(e), options)  # from PIL's pixel count: libvips is never loaded for it
            return _process_huge(data, options, huge_slots)
        raise
    if options.max_pixels is not None and width * height > options.max_pixels and options.stream_max_pixels:
        return _process_huge(data, options, huge_slots)
    check_header(width, height, options)
    orientation = _orientation(img)
    exif = exif_tags(img) if options.extract_exif else None
    upright = (height, width) if orientation in _ROTATED else (width, height)
    scale, out_size, padded = output_geometry(*upright, options)
    out_format = FORMATS[options.format]

    if img.format == out_format and out_size == (width, height) and orientation == 1 and not padded:
        if img.mode == "RGB" and "transparency" not in img.info:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # full entropy decode, 1/8 IDCT
            _load(img)
            return ProcessedImage(data, options.format, width, height, *upright, exif=exif)

    if img.format == "JPEG" and scale < 1.0:
        img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    img = _load(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    img = _resize(img, upright, out_size, padded, options)
    return _encode(img, upright, exif, options)


def _encode(img: Image.Image, upright: Tuple[int, int], exif, options: ImageOptions) -> ProcessedImage:
    out_format = FORMATS[options.format]
    buffer = io.BytesIO()
    if out_format == "JPEG":
        img.save(buffer, "JPEG", quality=options.quality)
    elif out_format == "WEBP":
        img.save(buffer, "WEBP", quality=options.quality)
    else:
        img.save(buffer, "PNG", compress_level=6)
    return ProcessedImage(buffer.getvalue(), options.format, img.width, img.height, *upright, exif=exif)


def _resize(
    img: Image.Image, upright: Tuple[int, int], out_size: Tuple[int, int], padded: bool, options: ImageOptions
) -> Image.Image:
    """Resizes the decoded image (possibly already reduced by draft) to the geometry computed on `upright`."""
    width, height = img.size
    if options.resize_mode == "no" or (width, height) == out_size and not padded:
        return img
    if options.resize_mode == "center_crop" and out_size != upright:
        size = options.image_size
        side = min(width, height)  # the crop is the centred side x side square, in source pixels
        left, top = (width - side) / 2, (height - side) / 2
        return _resample(img, (size, size), (left, top, left + side, top + side))
    if options.resize_mode == "border":
        scale = options.image_size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = _resample(img, inner) if inner != (width, height) else img
        canvas = Image.new("RGB", out_size, (255, 255, 255))
        canvas.paste(img, ((out_size[0] - inner[0]) // 2, (out_size[1] - inner[1]) // 2))
        return canvas
    return _resample(img, out_size)


def _resample(img: Image.Image, size: Tuple[int, int], box=None) -> Image.Image:
    source_w = (box[2] - box[0]) if box else img.width
    if size[0] < source_w:
        # Downscale: area averaging (img2dataset's cv2.INTER_AREA), with an integer reduce() first when the factor is
        # large. Half the CPU of an antialiased bicubic at the same output quality for photos.
        return img.resize(size, Image.Resampling.BOX, box=box, reducing_gap=3.0)
    return img.resize(size, Image.Resampling.LANCZOS, box=box)  # upscale: lanczos, as img2dataset


_PIL_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


def _refuse_sparse_bomb(data: bytes, pil_message: str, options: ImageOptions) -> None:
    """PIL's bomb warning names the pixel count ("Image size (400000000 pixels) exceeds limit ..."): a file with
    fewer than --stream-min-bytes-per-pixel bytes per claimed pixel is refused right here, in microseconds and without
    importing libvips (~13 MB of RSS, the reliability suite's bomb probe)."""
    match = _PIL_BOMB_PIXELS.search(pil_message)
    if match is None:
        return
    pixels = int(match.group(1))
    if len(data) < options.stream_min_bytes_per_pixel * pixels:
        raise ImageRejected("too_many_pixels", f"{pixels} pixels in {len(data)} bytes: fewer than "
                                               f"{options.stream_min_bytes_per_pixel:.3g} bytes per pixel (a "
                                               "decompression bomb)")


def _process_huge(data: bytes, options: ImageOptions, slots: threading.Semaphore | None) -> ProcessedImage:
    """An image above max_pixels: refused from the header when it looks like a bomb, else streamed through libvips
    down to twice the output scale, then resized and encoded like every other image."""
    limits = options.stream_limits()
    header = huge.read_header(data)
    huge.check_huge(header, len(data), limits)
    upright = huge.upright_size(header)
    check_header(*upright, dataclasses.replace(options, max_pixels=None))  # min size, aspect ratio
    scale, out_size, padded = output_geometry(*upright, options)
    target = huge.intermediate_size(upright, scale)
    if options.max_pixels is not None and target[0] * target[1] > options.max_pixels:
        raise ImageRejected("too_many_pixels", f"{upright[0]}x{upright[1]}: --resize-mode {options.resize_mode} "
                                               f"would keep {target[0]}x{target[1]} > {options.max_pixels} pixels")
    img = huge.decode_huge(data, header, target, limits, slots)
    exif = None
    if options.extract_exif:
        exif_block = Image.Exif()
        if header.exif:
            try:
                exif_block.load(header.exif)
            except Exception:  # a broken EXIF block must not reject an image that decodes fine
                pass
        exif = _exif_dict(exif_block)
    return _encode(_resize(img, upright, out_size, padded, options), upright, exif, options)
