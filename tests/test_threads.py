"""Issue 10: how many intra-op threads a training process picks (clipkit/train/threads.py)."""

import os
import subprocess
import sys

import pytest

from clipkit.synthetic import write_train_shards
from clipkit.train.threads import choose_threads, physical_cores
from tests._train import MAIN, REPO, free_port


def test_accelerate_default_of_one_thread_is_replaced_by_cores_per_process():
    # accelerate launch without a config: OMP_NUM_THREADS=1 in the process, absent from the launcher's own start
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    assert choose_threads(None, env, launcher_env={}, cores=16) == (8, "16 physical cores / 2 process(es) on this node")
    env1 = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    assert choose_threads(None, env1, launcher_env={}, cores=2)[0] == 2
    assert choose_threads(None, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}, launcher_env={}, cores=4)[0] == 1


def test_a_users_choice_wins():
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    # exported by the user: the launcher started with it, so it is theirs
    assert choose_threads(None, env, launcher_env={"OMP_NUM_THREADS": "1"}, cores=16)[0] == 1
    assert choose_threads(3, env, launcher_env={}, cores=16) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}, cores=16) == (5, "OMP_NUM_THREADS")  # plain python
    assert choose_threads(None, {}, cores=6) == (6, "6 physical cores / 1 process(es) on this node")


@pytest.mark.slow
def test_accelerate_launch_uses_the_cores_unless_the_user_exported_a_count(tmp_path):
    """`accelerate launch --num_processes 1` with no config exports OMP_NUM_THREADS=1; the run logs what it chose."""
    write_train_shards(tmp_path / "s", n=32, per_shard=32, seed=0, size=32)

    def launch(extra_env):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env.update(extra_env)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--main_process_port",
               str(free_port()), MAIN, "--train-data", str(tmp_path / "s" / "00000.tar"), "--batch-size", "8",
               "--steps", "1", "--workers", "0", "--output-dir", str(tmp_path / "run"), "--no-progress",
               "--no-report", "--no-tensorboard"]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stderr.splitlines() if "intra-op thread" in line)

    cores = physical_cores()
    assert f"using {cores} intra-op thread(s) per process ({cores} physical cores / 1 process(es)" in launch({})
    assert "using 1 intra-op thread(s) per process (OMP_NUM_THREADS (set by you" in launch({"OMP_NUM_THREADS": "1"})
