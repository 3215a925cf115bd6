"""The command line end to end: local dumps on several processes, webdataset loading, byte-identical reruns,
resume after a kill, errors before work, a worker that dies, and the Ray distributor."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from clipkit.data_prep import ShardConfig, build_shards
from clipkit.data_prep.distributors import run_on_processes
from clipkit.data_prep.pipeline import plan_jobs
from clipkit.data_prep.readers import read_dump
from clipkit.data_prep.shard import ShardJob, run_shard
from tests.data_prep_helpers import HTML_PAGE, ImageServer, Route, exif_jpeg, jpeg_bytes, rgba_png_bytes, write_dump

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 36


@pytest.fixture(scope="module")
def local_dump(tmp_path_factory):
    """36 images (one duplicate pair in different shards, an RGBA PNG, an HTML page, a missing file) + a parquet dump
    with relative paths, file:// URLs and an extra column."""
    root = tmp_path_factory.mktemp("local_dump")
    (root / "img").mkdir()
    rows, written = [], []
    for i in range(N_IMAGES):
        name = f"img/{i:03d}.jpg"
        if i == 30:
            data = written[3]  # same bytes as image 3: a cross-shard duplicate
        elif i == 31:
            data, name = rgba_png_bytes(), "img/031.png"
        elif i == 32:
            data = HTML_PAGE
        else:
            data = jpeg_bytes(120 + 7 * i, 90 + 3 * i, seed=i)
        if i != 33:  # 033.jpg is missing
            (root / name).write_bytes(data)
        written.append(data)
        path = f"file://{root / name}" if i % 5 == 0 else name
        rows.append({"path": path, "caption": f"photo number {i} &amp;amp; friends", "license": f"cc-{i % 3}"})
    write_dump(str(root / "dump.parquet"), rows, ["path", "caption", "license"])
    return root


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "build_shards.py"), *args, "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO, **kwargs,
    )


def _local_args(dump, out, *extra):
    return (str(dump / "dump.parquet"), "--path-col", "path", "--caption-col", "caption", "--extra-cols", "license",
            "--output", str(out), "--samples-per-shard", "8", "--image-size", "48", "--dedup", *extra)


def _shard_files(out: Path):
    """Everything that must be reproducible: tars, parquets, sizes.json (stats hold durations)."""
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet") or p.name == "sizes.json")
    return {name: (out / name).read_bytes() for name in names}


def test_local_dump_on_two_processes_loads_with_webdataset(local_dump, tmp_path):
    out = tmp_path / "out"
    result = _cli(*_local_args(local_dump, out, "--workers", "2"))
    assert result.returncode == 0, result.stderr
    assert "33 images in 5/5 shards from 36 rows; 1 duplicates removed" in result.stdout
    assert "file_not_found=1" in result.stdout and "not_an_image=1" in result.stdout

    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes) == [f"0000{i}.tar" for i in range(5)] and sum(sizes.values()) == 33
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["successes"] == 33 and manifest["status_counts"]["duplicate"] == 1
    rows = pa.concat_tables([pq.read_table(out / f"0000{i}.parquet") for i in range(5)]).to_pylist()
    assert len(rows) == N_IMAGES and [r["status"] for r in rows].count("success") == 33
    assert rows[30]["error_message"] == "duplicate of 000003"  # shard 00000, row 3

    urls = [str(out / name) for name in sizes]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 33
    for shard, count in sizes.items():
        with tarfile.open(out / shard) as tar:
            assert len(tar.getnames()) == 3 * count
    by_license = {s["json"]["license"] for s in samples}
    assert by_license == {"cc-0", "cc-1", "cc-2"}
    assert all(s["txt"].endswith("& friends") for s in samples)
    assert all((s.get("jpg") or s.get("png")).size == (48, 48) for s in samples)


def test_reruns_are_byte_identical_and_resume_skips_complete_shards(local_dump, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert _cli(*_local_args(local_dump, first, "--workers", "2")).returncode == 0
    assert _cli(*_local_args(local_dump, second, "--workers", "1", "--threads", "3")).returncode == 0
    reference = _shard_files(first)
    assert len(reference) == 11 and _shard_files(second) == reference

    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = _cli(*_local_args(local_dump, first, "--workers", "2"))
    assert again.returncode == 0 and "resuming: 5 of 5 shards already complete" in again.stdout
    assert all(first.joinpath(n).stat().st_mtime_ns == t for n, t in before.items() if n.endswith(".tar"))

    changed = _cli(*_local_args(local_dump, first, "--workers", "1", "--image-size", "40"))  # last flag wins
    assert changed.returncode == 0 and "resuming" not in changed.stdout  # new settings: shards redone
    with tarfile.open(first / "00000.tar") as tar:
        assert tar.extractfile(tar.getmember("000000.json")).read().count(b'"width": 40') == 1


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    images = {f"/{i}.jpg": Route(jpeg_bytes(60 + i, 50, seed=i), delay=0.04) for i in range(47)}
    images["/dup.jpg"] = Route(images["/3.jpg"].body, delay=0.04)
    with ImageServer(images) as server:
        rows = [{"url": server.url(p), "caption": f"caption {p}"} for p in images]
        dump = write_dump(str(tmp_path / "urls.tsv"), rows, ["url", "caption"])
        args = [dump, "--url-col", "url", "--caption-col", "caption", "--samples-per-shard", "12",
                "--image-size", "32", "--threads", "2", "--allow-private-network", "--dedup"]
        reference = tmp_path / "reference"
        build_shards(ShardConfig(inputs=[dump], output=str(reference), url_col="url", caption_col="caption",
                                 samples_per_shard=12, image_size=32, threads=2, allow_private_network=True, dedup=True,
                                 workers=1, progress=False), log=io.StringIO())

        out = tmp_path / "killed"
        command = [sys.executable, str(REPO / "data_prep" / "build_shards.py"), *args, "--output", str(out),
                   "--workers", "2", "--no-progress"]
        process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                names = os.listdir(out) if out.exists() else []
                journals = [out / n for n in names if n.endswith(".rows.partial")]
                if any(n.endswith("_stats.json") for n in names) and any(3 <= _lines(j) < 10 for j in journals):
                    break  # one shard complete, another one half-written
                time.sleep(0.01)
            assert process.poll() is None, "the run finished before it could be killed"
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the whole tree, like an OOM kill or a lost machine
            process.wait(timeout=30)
        partial = sorted(n for n in os.listdir(out) if n.endswith("_stats.json"))
        assert 1 <= len(partial) < 4

        resumed = _cli(*args, "--output", str(out), "--workers", "2")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming: {len(partial)} of 4 shards already complete" in resumed.stdout

    assert not [n for n in os.listdir(out) if ".tmp" in n or ".partial" in n]
    assert _shard_files(out) == _shard_files(reference)
    resumed_rows = [json.loads(p.read_text())["resumed_rows"] for p in out.glob("*_stats.json")]
    assert sum(resumed_rows) >= 2  # the half-written shard went on from its last finished row
    keys = [k for t in sorted(out.glob("*.parquet")) for k in pq.read_table(t).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == 48


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_row_level_resume_in_process(local_dump, tmp_path):
    """A shard interrupted after row 5 goes on from row 6 and ends byte-identical to an uninterrupted one."""
    config = ShardConfig(inputs=[str(local_dump / "dump.parquet")], output=str(tmp_path / "ref"), path_col="path",
                         caption_col="caption", extra_cols=["license"], samples_per_shard=12, image_size=40,
                         workers=1, threads=2, dedup=True, progress=False)
    table = read_dump(config.inputs, "path", "caption", ["license"], local=True)
    job = plan_jobs(table, config)[2]  # rows 24..35: the duplicate, the RGBA PNG, the HTML page, the missing file
    os.makedirs(config.output)
    reference = run_shard(job, config)

    class Interrupt(Exception):
        pass

    def stop_after_six(done):
        if done >= 6:
            raise Interrupt

    config.output = str(tmp_path / "resumed")
    os.makedirs(config.output)
    counted = []
    with pytest.raises(Interrupt):
        run_shard(job, config, lambda n: (counted.append(n), stop_after_six(sum(counted))))
    assert sorted(os.listdir(config.output)) == ["00002.rows.partial", "00002.tar.partial"]
    stats = run_shard(job, config)
    assert stats["resumed_rows"] >= 6 and reference["resumed_rows"] == 0
    assert _shard_files(tmp_path / "resumed") == _shard_files(tmp_path / "ref")


def test_bad_input_fails_before_any_work(local_dump, tmp_path):
    out = tmp_path / "out"
    dump = str(local_dump / "dump.parquet")
    missing = _cli(dump, "--path-col", "path", "--caption-col", "TEXT", "--output", str(out))
    assert missing.returncode == 2 and "missing column(s) ['TEXT']" in missing.stderr
    empty = write_dump(str(tmp_path / "empty.jsonl"), [], ["url", "caption"])
    result = _cli(empty, "--url-col", "url", "--caption-col", "caption", "--output", str(out))
    assert result.returncode == 2 and "no rows" in result.stderr
    assert not out.exists()
    module = subprocess.run([sys.executable, "-m", "clipkit.data_prep", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert module.returncode == 0 and "--allow-private-network" in module.stdout


class _DiesWhenRead:
    """Stands in for a shard's rows; reading it kills the worker process the way the OOM killer would."""

    num_rows = 1

    def to_pylist(self):
        os._exit(9)


def test_a_dying_worker_fails_its_shard_without_hanging(local_dump, tmp_path):
    config = ShardConfig(inputs=[], output=str(tmp_path), path_col="path", caption_col="caption", workers=2,
                         image_size=32, progress=False)
    table = pa.table({"source": ["img/000.jpg"], "caption": ["c"], "location": [str(local_dump / "img/001.jpg")]})
    jobs = [ShardJob(i, f"0000{i}", i, _DiesWhenRead() if i == 1 else table, "fp", 1) for i in range(4)]
    outcome = {}
    run_on_processes(jobs, config, lambda job, stats, error: outcome.update({job.name: error}), lambda n: None)
    assert sorted(outcome) == ["00000", "00001", "00002", "00003"]
    assert "died" in outcome["00001"]
    assert [outcome[n] for n in ("00000", "00002", "00003")] == [None] * 3
    assert (tmp_path / "00003.tar").exists() and not (tmp_path / "00001.tar").exists()


@pytest.mark.slow
def test_ray_distributor_matches_multiprocessing(local_dump, tmp_path):
    pytest.importorskip("ray", reason="Ray is in the dev extra: pip install -e '.[dev]'")
    reference, out = tmp_path / "mp", tmp_path / "ray"
    assert _cli(*_local_args(local_dump, reference, "--workers", "2")).returncode == 0
    result = _cli(*_local_args(local_dump, out, "--distributor", "ray", "--workers", "2"),
                  env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "33 images in 5/5 shards" in result.stdout
    assert _shard_files(out) == _shard_files(reference)


def test_extract_exif_into_json_and_parquet(tmp_path):
    (tmp_path / "a.jpg").write_bytes(exif_jpeg())
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(80, 60))
    write_dump(str(tmp_path / "dump.csv"), [{"path": "a.jpg", "caption": "red"}, {"path": "b.jpg", "caption": "grey"}],
               ["path", "caption"])
    for flag, out in (("--extract-exif", tmp_path / "with"), (None, tmp_path / "without")):
        result = _cli(str(tmp_path / "dump.csv"), "--path-col", "path", "--caption-col", "caption", "--output",
                      str(out), "--image-size", "32", "--workers", "1", *([flag] if flag else []))
        assert result.returncode == 0, result.stderr
        samples = {s["txt"]: s["json"] for s in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode()}
        rows = {r["caption"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
        if flag:
            tags = json.loads(samples["red"]["exif"])
            assert tags["Image Make"] == "Canon" and tags["EXIF ISOSpeedRatings"] == "400"
            assert not any("GPS" in name for name in tags)
            assert json.loads(rows["red"]["exif"]) == tags and json.loads(samples["grey"]["exif"]) == {}
        else:
            assert "exif" not in samples["red"] and rows["red"]["exif"] is None
