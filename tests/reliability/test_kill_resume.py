"""Properties 1-4 and 13 of the reliability suite (issue 5), end to end through `accelerate launch` + ZeRO-2.

1. kill -9 of one rank between backward and optimizer step; `--resume auto` gives the uninterrupted losses.
2. A run killed while writing a checkpoint (before its COMPLETE marker): resume uses the previous complete one.
3. keep-last-N leaves exactly N complete checkpoints; N < 2 is refused; a newer incomplete dir is never pruned.
4. Resume refuses a checkpoint of another model config, batch size or world size, naming the difference.
13. Each sample is trained exactly once per epoch on 1 and 2 ranks (1 rank: test_bad_data.py); a resume exactly at
    an epoch boundary trains the next epoch.
"""

import shutil
from collections import Counter

import pytest

from clipkit.train import checkpoint as ckpt
from clipkit.train.config import parse_config
from clipkit.train.errors import EXIT_CHECKPOINT
from clipkit.train.metrics import read_metrics
from tests._train import assert_same_weights, final_weights, losses
from tests.reliability._helpers import (
    STEPS,
    all_checkpoint_dirs,
    assert_losses_equal,
    complete_checkpoints,
    keys_by_epoch,
    launch_train,
    recorded_batches,
    train_args,
)


def _step(n: int) -> str:
    return f"step_{n:08d}"


@pytest.mark.slow
def test_kill9_and_torn_checkpoint_then_resume_matches_uninterrupted(clean_shards, reference_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = train_args(clean_shards.spec, out, extra=["--save-every", "2", "--keep-last", "3"])
    record = {"CLIPKIT_TEST_RECORD_BATCHES": str(out)}

    # (2) rank 0 is SIGKILLed after every rank wrote step 4's files, right before the COMPLETE marker.
    torn = launch_train(args, nproc=2, extra_env={**record, "CLIPKIT_TEST_KILL_BEFORE_COMPLETE": "4"})
    assert torn.returncode != 0, torn.explain()
    assert torn.leftovers == [], torn.leftovers
    assert complete_checkpoints(out) == [_step(2)]
    assert all_checkpoint_dirs(out) == [_step(2), _step(4)]  # step 4 is there, written but unmarked

    # The resume must take step 2 and ignore the unmarked step 4; it stops at step 4, the end of epoch 0.
    to_boundary = launch_train(args + ["--resume", "auto", "--stop-at", "4"], nproc=2, extra_env=record)
    assert to_boundary.returncode == 0 and to_boundary.leftovers == [], to_boundary.explain()
    assert f"resumed from {out / 'checkpoints' / _step(2)} at step 2" in to_boundary.stderr
    assert f"ignoring incomplete checkpoint(s) (no COMPLETE marker; written when a run died): {_step(4)}" in (
        to_boundary.stderr)
    assert complete_checkpoints(out) == [_step(2), _step(4)]

    # (1, 13) resume exactly at the epoch boundary; rank 1 is SIGKILLed between backward and optimizer step of step 7.
    killed = launch_train(args + ["--resume", "auto"], nproc=2,
                          extra_env={**record, "CLIPKIT_TEST_KILL_AT_STEP": "7", "CLIPKIT_TEST_KILL_RANK": "1"})
    assert killed.returncode != 0, killed.explain()  # the launcher notices and exits non-zero ...
    assert killed.leftovers == [], killed.leftovers  # ... and takes every rank and data worker with it
    assert f"resumed from {out / 'checkpoints' / _step(4)} at step 4" in killed.stderr
    assert max(losses(out)) == 6  # steps 5 and 6 of epoch 1 were trained, step 7 never finished
    assert complete_checkpoints(out) == [_step(2), _step(4), _step(6)]

    final = launch_train(args + ["--resume", "auto"], nproc=2, extra_env=record)
    assert final.returncode == 0 and final.leftovers == [], final.explain()
    assert f"resumed from {out / 'checkpoints' / _step(6)} at step 6" in final.stderr

    # Per-step losses of the four launches, stitched, equal the uninterrupted run's; so do the final weights.
    assert_losses_equal(losses(out), losses(reference_run))
    assert_same_weights(final_weights(out), final_weights(reference_run), atol=1e-6)
    assert [r["epoch"] for r in read_metrics(out) if "loss" in r] == [0] * 4 + [1] * 4
    # Every step trained the same samples on the same rank as the uninterrupted run.
    got, want = recorded_batches(out), recorded_batches(reference_run)
    assert sorted(got) == sorted(want) == [(s, r) for s in range(1, STEPS + 1) for r in (0, 1)]
    assert all(got[k]["keys"] == want[k]["keys"] for k in want)

    # (3) keep-last 3: exactly the three newest complete checkpoints survive, nothing else.
    assert all_checkpoint_dirs(out) == complete_checkpoints(out) == [_step(4), _step(6), _step(8)]


@pytest.mark.slow
def test_each_sample_once_per_epoch_on_two_ranks(clean_shards, reference_run):
    records = recorded_batches(reference_run)
    assert {rank for _, rank in records} == {0, 1}
    by_epoch = keys_by_epoch(records)
    assert sorted(by_epoch) == [0, 1]
    for epoch, keys in by_epoch.items():
        assert Counter(keys) == Counter(clean_shards.good_keys), epoch  # each of the 64 exactly once
    # the two ranks read disjoint data within a step
    for step in range(1, STEPS + 1):
        assert not set(records[(step, 0)]["keys"]) & set(records[(step, 1)]["keys"])


def test_keep_last_below_two_is_refused():
    """train/main.py parses its flags with parse_config before anything else."""
    for keep in ("1", "0", "-3"):
        with pytest.raises(ValueError, match=f"--keep-last must be >= 2 \\(the newest checkpoint may be mid-write\\), "
                                             f"got {keep}"):
            parse_config(["--train-data", "x.tar", "--keep-last", keep])
    assert parse_config(["--train-data", "x.tar", "--keep-last", "2"]).keep_last == 2


def test_prune_keeps_exactly_n_complete_and_never_a_newer_incomplete(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for step in range(1, 7):
        path = ckpt.checkpoint_path(tmp_path, step)
        path.mkdir(parents=True)
        (path / ckpt.STATE_FILE).write_text("{}")
        if step != 3 and step != 6:  # 3: died mid-write long ago; 6: being written right now
            (path / ckpt.COMPLETE).write_text("done")
    for keep in (3, 2):
        ckpt.prune(tmp_path, keep)
        assert complete_checkpoints(tmp_path) == [_step(s) for s in (1, 2, 4, 5)[-keep:]]
        # the stale incomplete step 3 is gone; the in-progress step 6 is left alone
        assert sorted(p.name for p in root.iterdir()) == [_step(s) for s in (1, 2, 4, 5)[-keep:]] + [_step(6)]


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    ([], ["world_size: checkpoint has 2, this run has 1"]),
    (["--batch-size", "4", "--model", "clipkit-tiny-resnet"], ["batch_size: checkpoint has 8, this run has 4",
                                                               "model config differs (checkpoint: ",
                                                               "world_size: checkpoint has 2, this run has 1"]),
])
def test_resume_refuses_other_config_naming_the_difference(clean_shards, reference_run, tmp_path, change, named):
    """The 2-process checkpoint resumed by one process, alone or also with another batch size and model config."""
    saved = reference_run / "checkpoints" / _step(STEPS)
    copy = tmp_path / "checkpoints" / _step(STEPS)
    shutil.copytree(saved, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.rglob("*")}
    out = tmp_path / "out"
    result = launch_train(train_args(clean_shards.spec, out, steps=STEPS + 2, extra=["--resume", str(copy), *change]))
    assert result.returncode == EXIT_CHECKPOINT, result.explain()
    message = next(line for line in result.stderr.splitlines() if line.startswith("error: cannot resume"))
    differences = message.split(f"cannot resume exactly from {copy}: ", 1)[1].split("; ")
    assert len(differences) == len(named), message  # what differs is named, nothing else is
    for difference, text in zip(differences, named):
        assert difference.startswith(text), message
    assert {p.name: p.stat().st_mtime_ns for p in copy.rglob("*")} == before
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
