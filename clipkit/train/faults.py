"""Test-only fault injection, read from the environment once at start-up (never at import).

CLIPKIT_TEST_KILL_AT_STEP=S, CLIPKIT_TEST_KILL_RANK=R: SIGKILL rank R between backward and optimizer step of step S
    (1-based step numbers, as in metrics.jsonl). Used by the kill -9 reliability test.
CLIPKIT_TEST_NAN_AT_STEPS=S1,S2,..., CLIPKIT_TEST_NAN_RANK=R: rank R's loss becomes NaN at those steps.
"""

import os
import signal
from dataclasses import dataclass, field
from typing import FrozenSet, Optional


@dataclass(frozen=True)
class Faults:
    kill_at_step: Optional[int] = None
    kill_rank: int = 0
    nan_at_steps: FrozenSet[int] = field(default_factory=frozenset)
    nan_rank: int = 0

    @classmethod
    def from_env(cls) -> "Faults":
        env = os.environ
        kill = env.get("CLIPKIT_TEST_KILL_AT_STEP")
        nan = env.get("CLIPKIT_TEST_NAN_AT_STEPS", "")
        return cls(
            kill_at_step=int(kill) if kill else None,
            kill_rank=int(env.get("CLIPKIT_TEST_KILL_RANK", "0")),
            nan_at_steps=frozenset(int(s) for s in nan.split(",") if s.strip()),
            nan_rank=int(env.get("CLIPKIT_TEST_NAN_RANK", "0")),
        )

    def maybe_kill(self, step: int, rank: int) -> None:
        if self.kill_at_step == step and self.kill_rank == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, rank: int) -> bool:
        return step in self.nan_at_steps and rank == self.nan_rank
