"""Issue 10: a training process keeps its freed memory for the next step (clipkit.train.allocator): the choice, the
page faults it saves, and the trainer's log line."""

import platform
import subprocess
import sys

import pytest

from clipkit.synthetic import write_train_shards
from clipkit.train.allocator import malloc_plan
from tests._train import REPO, run_train

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def test_plan_respects_the_users_allocator_and_settings():
    assert malloc_plan(True, {}, libc="glibc")[0]
    assert malloc_plan(False, {}, libc="glibc") == (False, "--no-malloc-tuning")
    assert malloc_plan(True, {}, libc="musl") == (False, "not glibc (musl)")
    assert malloc_plan(True, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, libc="glibc") == (
        False, "jemalloc preloaded (LD_PRELOAD)")
    assert malloc_plan(True, {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, libc="glibc")[0] is False
    assert malloc_plan(True, {"MALLOC_TRIM_THRESHOLD_": "0"}, libc="glibc") == (
        False, "MALLOC_TRIM_THRESHOLD_ set by you")
    assert malloc_plan(True, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, libc="glibc")[0] is False
    assert malloc_plan(True, {"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.rtld.x=1"}, libc="glibc")[0]


# A step's worth of large buffers allocated, touched and freed, as a training step does; minor page faults counted
# once the allocator has settled (aligned allocations take a few rounds to find reusable room). The buffers are above
# the 32 MiB that glibc's dynamic mmap threshold can reach, so its defaults map them anew every round.
_STEPS = """
import resource, sys, torch
from clipkit.train.allocator import tune_malloc
print(tune_malloc(sys.argv[1] == "on"), file=sys.stderr)
faults = []
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [torch.ones(10 << 20) for _ in range(4)]  # 4 x 40 MiB
    del bufs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4:]))
"""


@glibc
def test_tuned_process_does_not_fault_its_buffers_in_again():
    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1]), proc.stderr

    default, log_off = faults("off")
    tuned, log_on = faults("on")
    assert "left as it is (--no-malloc-tuning)" in log_off and "freed memory kept for reuse" in log_on
    pages = 4 * 160 * 1024 * 1024 // 4096  # 4 rounds of 160 MiB
    assert default > pages // 2, default  # glibc's defaults map the buffers anew each round
    assert tuned < pages // 50, tuned


@glibc
def test_trainer_logs_its_choice(tmp_path):
    d = tmp_path / "shards"
    write_train_shards(d, n=16, per_shard=16, seed=0, size=32)
    for flag, expect in (([], "malloc: freed memory kept for reuse"),
                         (["--no-malloc-tuning"], "malloc: left as it is (--no-malloc-tuning)")):
        proc = run_train(["--train-data", str(d / "00000.tar"), "--batch-size", "8", "--steps", "1",
                          "--output-dir", str(tmp_path / f"run{len(flag)}"), *flag])
        assert expect in proc.stdout + proc.stderr
