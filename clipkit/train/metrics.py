"""Rank-0 metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard when available."""

import json
import logging
from pathlib import Path
from typing import Any, Dict

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step > 0 and self.path.exists():
            # Drop lines past the checkpoint we resume from: those steps are trained again.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_step == 0 and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")

    def log(self, record: Dict[str, Any], step: int | None = None) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", step)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir) -> list:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
