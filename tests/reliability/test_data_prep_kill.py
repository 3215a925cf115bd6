"""Property 14 of the reliability suite (issue 5): data prep killed mid-run (twice: the main process alone, as the OOM
killer would, then the whole process group) and run again gives byte-identical shards, no duplicate or missing key,
no temporary file, and no process left behind. Images come from a local HTTP server with a small delay per image so
the kills land mid-run."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests._train import REPO
from tests.data_prep_helpers import ImageServer, Route, jpeg_bytes, write_dump
from tests.reliability._helpers import launch, session_processes

N_IMAGES, PER_SHARD = 60, 6


def _shard_files(out):
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet") or p.name == "sizes.json")
    return {name: (out / name).read_bytes() for name in names}


def _complete(out):
    return sorted(n for n in os.listdir(out) if n.endswith("_stats.json")) if out.exists() else []


def _mid_run(names, at_least: int) -> bool:
    """`at_least` shards complete (stats json written last) and some file of a shard without stats (temporary, partial
    or journal, whatever the writer calls it): a shard is being written."""
    done = {n[: -len("_stats.json")] for n in names if n.endswith("_stats.json")}
    busy = [n for n in names if n[:5].isdigit() and n[:5] not in done]
    return len(done) >= at_least and bool(busy)


def _kill_when(command, out, ready, whole_group: bool, timeout: float = 120):
    """Starts `command`, SIGKILLs it once `ready(names in out)` holds; returns the processes of its session still
    alive 20 s later (then kills them)."""
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready(os.listdir(out) if out.exists() else []):
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run finished before it could be killed: {sorted(os.listdir(out))}"
        if whole_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return session_processes(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_twice_then_rerun_gives_identical_shards(tmp_path):
    images = {f"/{i}.jpg": Route(jpeg_bytes(60 + i, 50, seed=i), delay=0.05) for i in range(N_IMAGES)}
    images["/dup.jpg"] = Route(images["/7.jpg"].body, delay=0.05)  # a cross-shard duplicate for --dedup
    with ImageServer(images) as server:
        rows = [{"url": server.url(p), "caption": f"caption {p}"} for p in images]
        dump = write_dump(str(tmp_path / "urls.tsv"), rows, ["url", "caption"])

        def command(out):
            return [sys.executable, str(REPO / "data_prep" / "build_shards.py"), dump, "--url-col", "url",
                    "--caption-col", "caption", "--samples-per-shard", str(PER_SHARD), "--image-size", "32",
                    "--threads", "1", "--workers", "2", "--allow-private-network", "--dedup", "--no-progress",
                    "--output", str(out)]

        reference = tmp_path / "reference"
        ref = launch(command(reference), timeout=300)
        assert ref.returncode == 0 and ref.leftovers == [], ref.explain()

        out = tmp_path / "killed"
        # 1: the main process alone, while a shard is being written and at least one is complete
        left = _kill_when(command(out), out, lambda names: _mid_run(names, 1), whole_group=False)
        assert left == [], left  # its pool workers went with it
        first = _complete(out)
        # 2: the whole group, once this run completed a shard and is writing another
        left = _kill_when(command(out), out, lambda names: _mid_run(names, len(first) + 1), whole_group=True)
        assert left == []
        second = _complete(out)
        assert 1 <= len(first) < len(second) < 11, (first, second)

        final = launch(command(out), timeout=300)
        assert final.returncode == 0 and final.leftovers == [], final.explain()
        assert f"resuming: {len(second)} of 11 shards already complete" in final.stdout

    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # no temporary, partial or journal file left
    assert _shard_files(out) == _shard_files(reference)  # tars, parquets and sizes.json byte for byte
    # every input row exactly once in the parquets; every success exactly once in the tars, with all its members
    rows = [r for t in sorted(out.glob("*.parquet")) for r in pq.read_table(t).to_pylist()]
    assert len(rows) == len({r["key"] for r in rows}) == N_IMAGES + 1
    assert Counter(r["source"] for r in rows) == Counter(server.url(p) for p in images)
    success = sorted(r["key"] for r in rows if r["status"] == "success")
    assert len(success) == N_IMAGES  # the duplicate was dropped
    members = Counter()
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update(m.name.split(".", 1)[0] for m in tar)
    assert sorted(members) == success and set(members.values()) == {3}  # jpg, txt, json
