"""Property 5 (issue 5): a NaN loss on one rank only makes every rank skip the same step with weights and optimizer
state unchanged; K non-finite steps in a row stop the run. 2 processes under ZeRO-2, so each rank holds its own
optimizer partition: a rank that stepped alone would change its partition in the checkpoint."""

import json
import math

import pytest
import torch

from clipkit.train.errors import EXIT_NONFINITE
from tests.reliability._helpers import (
    checkpoint_tensors,
    complete_checkpoints,
    launch_train,
    recorded_batches,
    train_args,
)

NAN_STEPS = (2, 4, 5)  # step 2 alone, then 4 and 5 in a row: with --max-nonfinite-steps 2 the run stops at 5


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_everywhere_and_a_streak_stops_the_run(clean_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = launch_train(
        train_args(clean_shards.spec, out,
                   extra=["--save-every", "1", "--keep-last", "10", "--max-nonfinite-steps", "2", "--warmup", "6"]),
        nproc=2,
        extra_env={"CLIPKIT_TEST_NAN_AT_STEPS": ",".join(map(str, NAN_STEPS)), "CLIPKIT_TEST_NAN_RANK": "1",
                   "CLIPKIT_TEST_RECORD_BATCHES": str(out)},
    )
    assert result.returncode != 0 and result.leftovers == [], result.explain()
    assert ("error: 2 consecutive steps had a non-finite loss (--max-nonfinite-steps 2): stopping at "
            "step 5") in result.stderr
    assert f"exitcode  : {EXIT_NONFINITE}" in result.stderr  # the launcher's summary of the ranks' exit code

    # Both ranks agree on which steps were skipped, although only rank 1 saw NaN.
    records = recorded_batches(out)
    assert sorted(records) == [(s, r) for s in range(1, 6) for r in (0, 1)]
    for rank in (0, 1):
        assert [s for s in range(1, 6) if records[(s, rank)]["nonfinite"]] == list(NAN_STEPS)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # the run stops inside step 5, before logging it
    assert [math.isnan(m["loss"]) for m in metrics] == [s in NAN_STEPS for s in range(1, 5)]
    assert [m["nonfinite_steps"] for m in metrics] == [0, 1, 1, 2]
    # Warm-up over 6 steps: every step's rate differs, so a schedule stepped on a skipped step would show here.
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3 * k / 6 for k in (1, 2, 2, 3)], rel=1e-6)

    # A checkpoint after every step (the stop itself writes none): model, both ZeRO-2 optimizer partitions and the
    # scheduler are bit-identical across a skipped step and change across a trained one.
    assert complete_checkpoints(out) == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    state = {s: checkpoint_tensors(out / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3, 4)}
    assert any("zero_pp_rank_1" in k for k in state[1]) and any("zero_pp_rank_0" in k for k in state[1])
    assert _same(state[1], state[2])  # step 2 skipped
    assert not _same(state[2], state[3])  # step 3 trained
    assert _same(state[3], state[4])  # step 4 skipped
    for rank in (0, 1):  # each rank's own optimizer partition moved on the trained step
        part = [k for k in state[2] if f"zero_pp_rank_{rank}" in k]
        assert any(not torch.equal(state[2][k], state[3][k]) for k in part), rank
    # The scheduler's own state (not only its tensors): steps taken, and the rate it would hand out next.
    sched = {s: torch.load(out / "checkpoints" / f"step_{s:08d}" / "scheduler.bin", weights_only=True)
             for s in (1, 2, 3, 4)}
    assert [sched[s]["last_epoch"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert sched[1]["_last_lr"] == sched[2]["_last_lr"] != sched[3]["_last_lr"] == sched[4]["_last_lr"]
    assert not (out / "final").exists()
