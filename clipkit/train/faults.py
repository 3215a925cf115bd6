"""Test-only fault injection, read from the environment once at start-up (never at import).

CLIPKIT_TEST_KILL_AT_STEP=S, CLIPKIT_TEST_KILL_RANK=R: SIGKILL rank R between backward and optimizer step of step S
    (1-based step numbers, as in metrics.jsonl): after its last micro-step's backward, before gradient clipping and
    the optimizer step, with and without DeepSpeed (clipkit calls the engine's backward and step itself for this).
    Used by the kill -9 reliability test.
CLIPKIT_TEST_KILL_BEFORE_COMPLETE=S: SIGKILL rank 0 after checkpoint step S's files, right before its COMPLETE marker.
CLIPKIT_TEST_NAN_AT_STEPS=S1,S2,..., CLIPKIT_TEST_NAN_RANK=R: rank R's loss becomes NaN at those steps.
CLIPKIT_TEST_RECORD_BATCHES=DIR: every rank appends one JSON line per step to DIR/batches_rank{R}.jsonl with the
    step, epoch, sample keys, the keys of pad batches (see clipkit.train.feed) and whether the step was skipped (the
    reliability suite checks that each sample is trained once per epoch).
"""

import json
import os
import signal
from dataclasses import dataclass, field
from typing import FrozenSet, List


@dataclass(frozen=True)
class Faults:
    kill_at_step: int | None = None
    kill_rank: int = 0
    nan_at_steps: FrozenSet[int] = field(default_factory=frozenset)
    nan_rank: int = 0
    record_dir: str | None = None
    kill_before_complete: int | None = None

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        kill = env.get("CLIPKIT_TEST_KILL_AT_STEP")
        torn = env.get("CLIPKIT_TEST_KILL_BEFORE_COMPLETE")
        nan = env.get("CLIPKIT_TEST_NAN_AT_STEPS", "")
        return cls(
            kill_at_step=int(kill) if kill else None,
            kill_rank=int(env.get("CLIPKIT_TEST_KILL_RANK", "0")),
            nan_at_steps=frozenset(int(s) for s in nan.split(",") if s.strip()),
            nan_rank=int(env.get("CLIPKIT_TEST_NAN_RANK", "0")),
            record_dir=env.get("CLIPKIT_TEST_RECORD_BATCHES") or None,
            kill_before_complete=int(torn) if torn else None,
        )

    def maybe_kill(self, step: int, rank: int) -> None:
        if self.kill_at_step == step and self.kill_rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_complete(self, step: int) -> None:
        """checkpoint.save's hook, on rank 0."""
        if self.kill_before_complete == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, rank: int) -> bool:
        return step in self.nan_at_steps and rank == self.nan_rank

    def record_batches(self, step: int, rank: int, batches: List[dict], nonfinite: bool) -> None:
        if self.record_dir is None:
            return
        line = {"step": step, "epoch": int(batches[0]["epoch"]),
                "keys": [k for b in batches if not b.get("pad") for k in b["keys"]],
                "pad_keys": [k for b in batches if b.get("pad") for k in b["keys"]], "nonfinite": bool(nonfinite)}
        with open(os.path.join(self.record_dir, f"batches_rank{rank}.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
