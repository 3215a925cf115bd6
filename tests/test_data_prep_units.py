"""Unit tests of the data-prep pieces: captions, readers, SSRF guard, X-Robots-Tag, image processing."""

import gzip
import hashlib
import io
import ipaddress

import pytest
from PIL import Image, ImageFile

from clipkit.data_prep import ssrf
from clipkit.data_prep.captions import clean_caption, repair_undecodable
from clipkit.data_prep.fetch import robots_disallowed
from clipkit.data_prep.process import ImageOptions, output_geometry, process_image
from clipkit.data_prep.readers import DumpError, read_dump
from clipkit.images import ImageRejected
from tests.data_prep_helpers import (
    HTML_PAGE,
    exif_jpeg,
    huge_png_bytes,
    jpeg_bytes,
    palette_png_bytes,
    rgba_png_bytes,
    write_dump,
)

# ---------------------------------------------------------------- captions


def test_caption_cleaning():
    assert clean_caption("Tom &amp;quot;Cat&amp;quot; &amp;amp; Jerry", 100) == 'Tom "Cat" & Jerry'
    assert clean_caption("  a\n\tb \u00a0 c  ", 100) == "a b c"
    assert clean_caption("cafÃ© au lait", 100) == "café au lait"  # mojibake fixed by ftfy
    assert clean_caption(None, 100) == "" and clean_caption(" \n ", 100) == ""
    assert clean_caption(12.5, 100) == "12.5"
    capped = clean_caption("word " * 100, 52)
    assert len(capped) <= 52 and capped.endswith("word")
    assert len(clean_caption("x" * 500, 100)) == 100


def test_bad_utf8_bytes_become_characters():
    raw = "caf\xe9 na\xefve".encode("latin-1").decode("utf-8", errors="surrogateescape")
    assert repair_undecodable(raw) == "café naïve"
    mixed = ("ok é ".encode() + b"\x93quoted\x94").decode("utf-8", errors="surrogateescape")
    assert clean_caption(mixed, 100) == 'ok é "quoted"'  # cp1252 curly quotes, then uncurled by ftfy


# ---------------------------------------------------------------- readers

ROWS = [
    {"url": "http://example.com/a.jpg", "caption": "first", "license": "cc-by", "n": 1},
    {"url": "http://example.com/b.jpg", "caption": "second", "license": "cc0", "n": 2},
]


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz", "tsv.gz", "jsonl.gz", "json.gz"])
def test_every_format_reads_the_same_rows(tmp_path, ext):
    path = write_dump(str(tmp_path / f"dump.{ext}"), ROWS, ["url", "caption", "license", "n"])
    table = read_dump([path], "url", "caption", ["license"])
    assert table.column("source").to_pylist() == [r["url"] for r in ROWS]
    assert table.column("caption").to_pylist() == ["first", "second"]
    assert table.column("license").to_pylist() == ["cc-by", "cc0"]


@pytest.mark.parametrize("ext", ["txt", "txt.gz"])
def test_txt_is_one_source_per_line(tmp_path, ext):
    path = write_dump(str(tmp_path / f"urls.{ext}"), ROWS, ["url"])
    table = read_dump([path], "url", None)
    assert table.column("source").to_pylist() == [r["url"] for r in ROWS]
    with pytest.raises(DumpError, match="txt dumps"):
        read_dump([path], "url", "caption")


def test_folder_glob_and_several_files(tmp_path):
    """A folder or glob is read in sorted name order; files named one by one are read in the order given."""
    write_dump(str(tmp_path / "b.csv"), ROWS[1:], ["url", "caption"])
    write_dump(str(tmp_path / "a.jsonl"), ROWS[:1], ["url", "caption"])
    (tmp_path / "notes.md").write_text("not a dump")
    expected = [ROWS[0]["url"], ROWS[1]["url"]]
    assert read_dump([str(tmp_path)], "url", "caption").column("source").to_pylist() == expected
    assert read_dump([str(tmp_path / "*.*sv"), str(tmp_path / "a.jsonl")], "url", "caption").num_rows == 2
    files = [str(tmp_path / "b.csv"), str(tmp_path / "a.jsonl")]
    assert read_dump(files, "url", "caption").column("source").to_pylist() == expected[::-1]


def test_input_errors_before_any_work(tmp_path):
    path = write_dump(str(tmp_path / "d.csv"), ROWS, ["url", "caption"])
    with pytest.raises(DumpError, match=r"missing column\(s\) \['TEXT'\]"):
        read_dump([path], "url", "TEXT")
    with pytest.raises(DumpError, match="no such file"):
        read_dump([str(tmp_path / "nope.csv")], "url", "caption")
    with pytest.raises(DumpError, match="no rows"):
        read_dump([write_dump(str(tmp_path / "e.csv"), [], ["url", "caption"])], "url", "caption")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DumpError, match="cannot read"):
        read_dump([str(tmp_path / "bad.parquet")], "url", "caption")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"url": "x"}\n{broken\n'))
    with pytest.raises(DumpError, match="cannot read"):
        read_dump([str(tmp_path / "bad.jsonl.gz")], "url", None)
    with pytest.raises(DumpError, match="unknown dump format"):
        read_dump([str((tmp_path / "x.xlsx").write_bytes(b"") or tmp_path / "x.xlsx")], "url", None)


def test_bad_utf8_in_csv_is_read(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"url,caption\nhttp://e.com/a.jpg,caf\xe9 cr\xe8me\n")
    assert read_dump([str(path)], "url", "caption").column("caption").to_pylist() == ["café crème"]


def test_local_paths_resolve_against_base_dir_or_dump_folder(tmp_path):
    rows = [{"p": "img/a.jpg"}, {"p": "/abs/b.jpg"}, {"p": "file:///abs/c%20d.jpg"}]
    path = write_dump(str(tmp_path / "d.jsonl"), rows, ["p"])
    default = read_dump([path], "p", None, local=True).column("location").to_pylist()
    assert default == [str(tmp_path / "img/a.jpg"), "/abs/b.jpg", "/abs/c d.jpg"]
    based = read_dump([path], "p", None, local=True, base_dir="/data").column("location").to_pylist()
    assert based[0] == "/data/img/a.jpg"


def test_shard_jobs_carry_only_their_own_rows():
    """Jobs are pickled to worker processes: a zero-copy slice would drag the whole dump along with each one."""
    import pickle

    import pyarrow as pa

    from clipkit.data_prep.config import ShardConfig
    from clipkit.data_prep.pipeline import plan_jobs

    n = 20000
    table = pa.table({"source": [f"http://e.com/{i}.jpg" for i in range(n)], "caption": ["a caption"] * n,
                      "location": pa.nulls(n, pa.string())})
    jobs = plan_jobs(table, ShardConfig(inputs=[], output="", url_col="u", caption_col="c", samples_per_shard=1000))
    assert len(jobs) == 20 and jobs[7].rows.column("source")[0].as_py() == "http://e.com/7000.jpg"
    assert len(pickle.dumps(jobs[7])) < len(pickle.dumps(table)) / 10
    assert len({job.fingerprint for job in jobs}) == 20


# ---------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/x", "loopback_address"),
        ("http://0x7f000001/x", "loopback_address"),
        ("http://2130706433/x", "loopback_address"),
        ("http://0177.0.0.1/x", "loopback_address"),
        ("http://127.1/x", "loopback_address"),
        ("http://[::1]/x", "loopback_address"),
        ("http://[::ffff:127.0.0.1]/x", "loopback_address"),
        ("http://[::ffff:a9fe:a9fe]/x", "link_local_address"),
        ("http://10.1.2.3:8080/admin", "private_address"),
        ("http://192.168.0.1/", "private_address"),
        ("http://169.254.169.254/latest/meta-data/", "link_local_address"),
        ("http://0.0.0.0/", "unspecified_address"),
        ("http://100.64.0.1/", "non_global_address"),
        ("http://[2002:7f00:1::]/", "loopback_address"),  # 6to4 wrapping 127.0.0.1
        ("file:///etc/passwd", "unsupported_scheme"),
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        ("gopher://127.0.0.1:6379/_INFO", "unsupported_scheme"),
        ("http:///nohost", "bad_url"),
    ],
)
def test_ssrf_refuses_private_and_odd_urls(url, reason, monkeypatch):
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: pytest.fail(f"DNS lookup for literal {host}"))
    with pytest.raises(ssrf.URLRefused) as info:
        ssrf.check_url(url)
    assert info.value.reason == reason


def test_ssrf_checks_every_resolved_address_and_pins_it(monkeypatch):
    fake_dns = {
        "cdn.example": ["93.184.216.34"],
        "rebind.example": ["93.184.216.34", "10.0.0.7"],
        "metadata.example": ["169.254.169.254"],
        "v6.example": ["::1"],
    }
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: fake_dns[host])
    target = ssrf.check_url("https://cdn.example/img/a.jpg?size=2")
    assert (target.address, target.host, target.port) == ("93.184.216.34", "cdn.example", 443)
    assert target.path == "/img/a.jpg?size=2"
    for host, reason in [("rebind", "private_address"), ("metadata", "link_local_address"), ("v6", "loopback_address")]:
        with pytest.raises(ssrf.URLRefused) as info:
            ssrf.check_url(f"http://{host}.example/a.jpg")
        assert info.value.reason == reason
    assert ssrf.check_url("http://metadata.example/", allow_private_network=True).address == "169.254.169.254"


def test_public_addresses_pass():
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert ssrf.address_refusal(ipaddress.ip_address(address)) is None


def test_x_robots_tag_parsing():
    disallowed = frozenset({"noai", "noimageai"})
    assert robots_disallowed(["noai"], "clipkit-data-prep", disallowed) == "noai"
    assert robots_disallowed(["noindex, NoImageAI"], "clipkit-data-prep", disallowed) == "noimageai"
    assert robots_disallowed(["otherbot: noai"], "clipkit-data-prep", disallowed) is None
    assert robots_disallowed(["clipkit-data-prep: noai"], "clipkit-data-prep", disallowed) == "noai"
    assert robots_disallowed(["unavailable_after: 2020-01-01", "nofollow"], "x", disallowed) is None


# ---------------------------------------------------------------- images


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize(
    "mode, source, expected",
    [
        ("center_crop", (400, 300), (64, 64)),
        ("keep_ratio", (400, 300), (85, 64)),
        ("keep_ratio_largest", (400, 300), (64, 48)),
        ("border", (400, 300), (64, 64)),
        ("no", (400, 300), (400, 300)),
        ("center_crop", (30, 20), (64, 64)),  # upscaled
    ],
)
def test_resize_modes(mode, source, expected):
    out = process_image(jpeg_bytes(*source, seed=1), ImageOptions(image_size=64, resize_mode=mode))
    img = _decode(out.data)
    assert img.size == expected == (out.width, out.height)
    assert (out.original_width, out.original_height) == source
    if mode == "border":  # 64x48 content centred, white bars above and below
        assert img.convert("RGB").getpixel((32, 2)) == pytest.approx((255, 255, 255), abs=6)


@pytest.mark.parametrize("size", [(206, 240), (240, 206), (1021, 767), (333, 1000), (257, 256), (1600, 1199)])
def test_center_crop_any_source_size(size):
    """Odd sizes (and JPEG draft scaling of them) must not produce a crop box outside the image."""
    for target in (64, 224, 256):
        out = process_image(jpeg_bytes(*size, seed=size[0]), ImageOptions(image_size=target))
        assert _decode(out.data).size == (target, target)


def test_resize_only_if_bigger_and_formats():
    options = ImageOptions(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True, format="webp")
    out = process_image(jpeg_bytes(40, 30), options)
    assert (out.width, out.height, out.ext) == (40, 30, "webp") and _decode(out.data).format == "WEBP"
    out = process_image(jpeg_bytes(80, 60), ImageOptions(image_size=32, format="png"))
    assert _decode(out.data).format == "PNG" and out.ext == "png"


def test_draft_decoding_matches_full_decode():
    """A 1600x1200 JPEG reduced with DCT scaling + reducing_gap stays close to a full-precision resize."""
    data = jpeg_bytes(1600, 1200, seed=3)
    out = _decode(process_image(data, ImageOptions(image_size=128, resize_mode="center_crop")).data)
    full = Image.open(io.BytesIO(data)).convert("RGB").crop((200, 0, 1400, 1200)).resize((128, 128), Image.LANCZOS)
    import numpy as np

    diff = np.abs(np.asarray(out, np.float64) - np.asarray(full, np.float64)).mean()
    assert diff < 6.0, diff


def test_exif_orientation_applied():
    out = process_image(jpeg_bytes(80, 40, orientation=6), ImageOptions(resize_mode="no"))
    assert (out.width, out.height) == (40, 80) and _decode(out.data).size == (40, 80)
    assert (out.original_width, out.original_height) == (40, 80)


def test_alpha_and_palette_composited_on_white():
    for data in (rgba_png_bytes(), palette_png_bytes()):
        img = _decode(process_image(data, ImageOptions(resize_mode="no", format="png")).data)
        assert img.mode == "RGB"
        assert img.getpixel((1, 1)) == (255, 255, 255)  # transparent part: white, not black
        assert img.getpixel((img.width - 2, 1)) != (255, 255, 255)


def test_same_format_and_size_is_copied_byte_for_byte():
    data = jpeg_bytes(64, 64, seed=5)
    assert process_image(data, ImageOptions(image_size=64, resize_mode="center_crop")).data == data
    assert process_image(data, ImageOptions(image_size=64, resize_mode="no", format="png")).data != data


@pytest.mark.parametrize(
    "data, reason",
    [
        (jpeg_bytes(300, 200)[:-2500], "corrupt_image"),  # truncated: not copied even when no resize is needed
        (HTML_PAGE, "not_an_image"),
        (b"", "empty_image"),
        (huge_png_bytes(60000, 60000), "too_many_pixels"),
        (huge_png_bytes(9000, 9000), "too_many_pixels"),
    ],
)
def test_hostile_images_rejected(data, reason):
    for mode in ("no", "center_crop"):
        with pytest.raises(ImageRejected) as info:
            process_image(data, ImageOptions(image_size=300 if mode == "center_crop" else 256, resize_mode=mode))
        assert info.value.reason == reason


def test_header_checks_run_before_decoding(monkeypatch):
    """min-size, aspect ratio and pixel limits reject from the header: the pixel decoder is never called."""
    cases = [
        (jpeg_bytes(30, 30), ImageOptions(min_size=64), "too_small"),
        (jpeg_bytes(400, 40), ImageOptions(max_aspect_ratio=3.0), "bad_aspect_ratio"),
        (jpeg_bytes(200, 200), ImageOptions(max_pixels=100 * 100), "too_many_pixels"),
    ]
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    for data, options, reason in cases:
        with pytest.raises(ImageRejected) as info:
            process_image(data, options)
        assert info.value.reason == reason
    for data in (huge_png_bytes(60000, 60000), huge_png_bytes(9000, 9000)):
        with pytest.raises(ImageRejected) as info:
            process_image(data, ImageOptions())
        assert info.value.reason == "too_many_pixels"


def test_output_geometry_rounding():
    assert output_geometry(1000, 333, ImageOptions(image_size=100, resize_mode="keep_ratio"))[1] == (300, 100)
    assert output_geometry(333, 1000, ImageOptions(image_size=100, resize_mode="keep_ratio_largest"))[1] == (33, 100)


# ---------------------------------------------------------------- cross-shard dedup table


def test_first_seen_table(tmp_path):
    from clipkit.data_prep.pipeline import FirstSeen

    path = tmp_path / "_dedup.sqlite"
    path.write_bytes(b"left by a killed run")  # not a database: must be replaced, not opened
    seen = FirstSeen(str(path))
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    assert [seen.first(d, f"k{i}") for i, d in enumerate(digests)] == [f"k{i}" for i in range(2000)]
    assert seen.first(digests[7], "later") == "k7" and seen.first(digests[7], "k7") == "k7"
    assert seen.first(digests[1999], "again") == "k1999"
    assert seen.first(hashlib.sha256(b"new").hexdigest(), "n") == "n"
    seen.close()
    assert not path.exists()


# ---------------------------------------------------------------- EXIF


def test_exif_extracted_only_when_asked_without_gps_or_binary():
    from clipkit.data_prep.process import EXIF_MAX_CHARS

    data = exif_jpeg()
    assert process_image(data, ImageOptions(image_size=32)).exif is None
    tags = process_image(data, ImageOptions(image_size=32, extract_exif=True)).exif
    assert tags["Image Make"] == "Canon" and tags["Image Model"] == "EOS 5D" and tags["Image Orientation"] == "1"
    assert tags["Image ImageDescription"] == "d" * EXIF_MAX_CHARS
    assert tags["EXIF ISOSpeedRatings"] == "400"
    assert not any("GPS" in name or "MakerNote" in name or "ExifOffset" in name for name in tags), tags
    # the byte-for-byte copy path (already 64 x 48 JPEG) extracts it too
    copied = process_image(data, ImageOptions(image_size=48, resize_mode="keep_ratio", extract_exif=True))
    assert copied.data == data and copied.exif == tags
    assert process_image(jpeg_bytes(40, 30), ImageOptions(image_size=32, extract_exif=True)).exif == {}
