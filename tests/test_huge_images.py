"""Huge legitimate images are decoded in bounded memory and kept; decompression bombs are still refused from the header
(clipkit/data_prep/huge.py, issue 14 part 2)."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from clipkit.data_prep.process import ImageOptions, process_image
from clipkit.images import ImageRejected
from tests._shards import bomb_png
from tests._train import REPO, env
from tests.data_prep_helpers import huge_png_bytes

PALETTE = np.array([[255, 255, 255], [0, 0, 0], [200, 30, 30], [30, 120, 200], [250, 220, 40], [40, 160, 60]],
                   np.uint8)


def drawing(width: int, height: int, block: int = 500, alpha: bool = False, seed: int = 0):
    """A clip-art-like image: flat colour blocks of `block` px (a pyvips image, never held whole in memory)."""
    import pyvips

    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(PALETTE), (height // block + 1, width // block + 1))
    arr = np.ascontiguousarray(PALETTE[cells])
    if alpha:
        arr = np.ascontiguousarray(np.dstack([arr, np.where(cells % 2 == 0, 255, 0).astype(np.uint8)]))
    small = pyvips.Image.new_from_memory(arr.tobytes(), arr.shape[1], arr.shape[0], arr.shape[2], "uchar")
    return small.resize(block, kernel="nearest").crop(0, 0, width, height), cells


def png_file(path: Path, width: int, height: int, **kw) -> Path:
    if not path.exists():
        drawing(width, height, **kw)[0].pngsave(str(path), compression=6)
    return path


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    root = tmp_path_factory.mktemp("huge")
    return {"16k": png_file(root / "drawing_16000.png", 16000, 16000),
            "21k": png_file(root / "drawing_20990x29700.png", 20990, 29700, block=700, seed=1), "root": root}


def test_a_16000_px_drawing_is_kept_and_resized(huge):
    data = huge["16k"].read_bytes()
    assert 1e6 < len(data) < 10e6  # a few MB: 1/67 byte per pixel
    out = process_image(data, ImageOptions(image_size=256, resize_mode="center_crop", format="png"))
    assert (out.width, out.height, out.original_width, out.original_height) == (256, 256, 16000, 16000)
    _, cells = drawing(16000, 16000)
    got = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), np.int16)
    want = PALETTE[cells[:32, :32]].repeat(8, 0).repeat(8, 1).astype(np.int16)  # 500 px blocks -> 8 output px
    inside = np.zeros((256, 256), bool)
    inside[[i for i in range(256) if 1 < i % 8 < 6]] = True
    inside[:, [i for i in range(256) if not 1 < i % 8 < 6]] = False
    assert np.abs(got - want)[inside].max() <= 6  # every block's colour, away from its edges


def test_streamed_decoding_equals_the_in_memory_decode(tmp_path):
    """Just above --max-pixels (9000 x 8000): alpha composited on white and EXIF orientation applied as PIL does."""
    image, _ = drawing(9000, 8000, block=250, alpha=True, seed=3)
    rgba = tmp_path / "rgba.png"
    image.pngsave(str(rgba), compression=1)
    import pyvips

    rotated = tmp_path / "rotated.jpg"
    flat = image.flatten(background=[255, 255, 255]).copy()
    flat.set_type(pyvips.GValue.gint_type, "orientation", 6)
    flat.jpegsave(str(rotated), Q=90)
    for path, fmt in ((rgba, "png"), (rotated, "jpg")):
        data = path.read_bytes()
        options = ImageOptions(image_size=224, resize_mode="keep_ratio", format="png")
        streamed = process_image(data, options)
        in_memory = process_image(data, ImageOptions(image_size=224, resize_mode="keep_ratio", format="png",
                                                     max_pixels=None))
        assert (streamed.width, streamed.height) == (in_memory.width, in_memory.height)
        assert (streamed.original_width, streamed.original_height) == (
            (8000, 9000) if fmt == "jpg" else (9000, 8000))
        a = np.asarray(Image.open(io.BytesIO(streamed.data)), np.float64)
        b = np.asarray(Image.open(io.BytesIO(in_memory.data)), np.float64)
        assert np.abs(a - b).mean() < 4.0, fmt


def test_bombs_are_refused_from_the_header_in_milliseconds(monkeypatch):
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    import pyvips

    monkeypatch.setattr(pyvips.Image, "thumbnail_buffer", lambda *a, **k: pytest.fail("pixels decoded"))
    bomb = bomb_png(20000)  # a valid 1-bit PNG: rows of zeros, deflate at its 1032:1 limit
    assert len(bomb) < 64_000
    for data in (bomb, huge_png_bytes(20000, 20000), huge_png_bytes(9000, 9000), huge_png_bytes(60000, 60000)):
        start = time.perf_counter()
        with pytest.raises(ImageRejected) as info:
            process_image(data, ImageOptions())
        assert time.perf_counter() - start < 1.0
        assert info.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected, match="bytes per pixel"):
        process_image(bomb, ImageOptions())


def test_decode_budget_and_the_off_switch(huge):
    data = huge["16k"].read_bytes()
    with pytest.raises(ImageRejected) as info:
        process_image(data, ImageOptions(stream_time_budget_s=0.05))
    assert info.value.reason == "decode_too_slow"
    with pytest.raises(ImageRejected) as info:
        process_image(data, ImageOptions(stream_max_pixels=0))  # streaming off: refused as before
    assert info.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as info:
        process_image(data, ImageOptions(resize_mode="no"))  # would keep 256 Mpx in memory
    assert info.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as info:
        process_image(data[: len(data) // 2], ImageOptions())  # cut in the middle of its pixel data
    assert info.value.reason == "corrupt_image"


RSS_SAMPLER = """
import json, subprocess, sys, time
import psutil
proc = subprocess.Popen(sys.argv[1:])
peak_total, peak_by_pid = 0, {}
ps = psutil.Process(proc.pid)
while proc.poll() is None:
    try:
        tree = [ps] + ps.children(recursive=True)
        rss = {p.pid: p.memory_info().rss for p in tree}
    except psutil.Error:
        continue
    peak_total = max(peak_total, sum(rss.values()))
    for pid, value in rss.items():
        peak_by_pid[pid] = max(peak_by_pid.get(pid, 0), value)
    time.sleep(0.05)
print(json.dumps({"rc": proc.returncode, "peak_total": peak_total, "peak_worker": max(
    [v for pid, v in peak_by_pid.items() if pid != proc.pid] or [0]), "peak_main": peak_by_pid.get(proc.pid, 0)}))
"""


@pytest.mark.slow
def test_build_shards_keeps_huge_drawings_in_bounded_memory(huge, tmp_path):
    root = huge["root"]
    (root / "bomb.png").write_bytes(bomb_png(20000))
    Image.new("RGB", (640, 480), (10, 200, 30)).save(root / "normal.jpg")
    rows = ["drawing_16000.png,a 16000 px drawing", "bomb.png,a bomb", "normal.jpg,a normal photo",
            "drawing_20990x29700.png,a 20990 x 29700 px drawing"]
    (root / "dump.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    sampler = tmp_path / "sampler.py"
    sampler.write_text(RSS_SAMPLER)
    cmd = [sys.executable, str(sampler), sys.executable, str(REPO / "data_prep" / "build_shards.py"),
           str(root / "dump.csv"), "--path-col", "path", "--caption-col", "caption", "--output", str(tmp_path / "out"),
           "--samples-per-shard", "2", "--workers", "2", "--image-size", "256", "--no-progress"]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO,
                                       timeout=600).stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    rows = [r for p in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    status = {r["caption"]: (r["status"], r["error_reason"], r["original_width"], r["original_height"]) for r in rows}
    assert status["a 16000 px drawing"] == ("success", None, 16000, 16000)
    assert status["a 20990 x 29700 px drawing"] == ("success", None, 20990, 29700)
    assert status["a bomb"][:2] == ("failed_image", "too_many_pixels")
    assert status["a normal photo"][0] == "success"
    gib = 1 << 30
    print(f"peak RSS: worker {result['peak_worker'] / 2**20:.0f} MiB, whole run {result['peak_total'] / 2**20:.0f} MiB")
    assert 0 < result["peak_worker"] < gib and result["peak_total"] < 2 * gib
    assert os.path.getsize(tmp_path / "out" / "00001.tar") > 10_000
