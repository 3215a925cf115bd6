"""Shared fixtures: clean shards and one uninterrupted 2-process ZeRO-2 reference run, made once per session."""

import pytest

from tests._shards import make_shards
from tests.reliability._helpers import launch_train, train_args


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory):
    """4 shards of 16 good samples (32 px JPEGs)."""
    return make_shards(str(tmp_path_factory.mktemp("clean_shards")), 4, 16)


@pytest.fixture(scope="session")
def reference_run(clean_shards, tmp_path_factory):
    """8 steps (2 epochs) on 2 processes under ZeRO-2, never interrupted; records every rank's batch keys."""
    out = tmp_path_factory.mktemp("reference") / "run"
    out.mkdir()
    result = launch_train(train_args(clean_shards.spec, out), nproc=2,
                          extra_env={"CLIPKIT_TEST_RECORD_BATCHES": str(out)})
    assert result.returncode == 0 and not result.leftovers, result.explain()
    return out


@pytest.fixture(scope="session")
def one_process_run(clean_shards, tmp_path_factory):
    """2 steps in one process (no DeepSpeed): a complete accelerate checkpoint at step 2."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    result = launch_train(["--model", "clipkit-tiny", "--train-data", clean_shards.spec, "--batch-size", "8",
                           "--steps", "2", "--workers", "0", "--shuffle-buffer", "0", "--output-dir", str(out),
                           "--no-progress", "--no-tensorboard"])
    assert result.returncode == 0 and not result.leftovers, result.explain()
    return out
