"""One epoch of micro-batches for one rank: its share of the data, then pads while other ranks still have data.

Ranks cannot step alone (the loss gathers every rank's features and the gradients are reduced over all ranks), so an
epoch lasts as long as the rank with the most batches. The loader splits an epoch by samples (clipkit.data.wds), so
ranks differ by at most a few batches (bad samples and each worker's dropped partial batch make the difference). A
rank that has run out while another still has data pads: it trains its own batches of this epoch again, from the
epoch's first one (a second pass, wrapping if needed), and the padded samples are counted (`padded_samples` in
metrics.jsonl and summary.json). Every sample of the epoch is trained at least once; only pads are trained twice.

Which rank pads is decided from one all-reduced status vector (see `local_status`), so every rank takes the same
decision. `position` + `pad_position` are where the checkpoint resumes both passes exactly.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from clipkit.data import REASONS, DataPosition, LoaderStalled, TrainLoader

# Fields of the data status vector, in order, then one count per clipkit.data.REASONS entry.
STATUS_FIELDS = ("ranks_with_data", "ranks_out_unpaddable", "ranks_stalled")


class EpochFeed:
    def __init__(self, make_loader: Callable[[DataPosition], TrainLoader], position: DataPosition,
                 pad_position: DataPosition | None, grad_accum: int, batch_size: int, num_workers: int):
        self.make_loader = make_loader
        self.grad_accum = grad_accum
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.epoch = position.epoch
        self.loader = make_loader(position)
        self._it = iter(self.loader)
        self._pad_start = pad_position
        self._pad_loader: TrainLoader | None = None
        self._pad_it = None
        self.exhausted = False
        self.stalled: LoaderStalled | None = None

    def take(self) -> List[dict]:
        """Up to grad_accum micro-batches of this rank's share (fewer, or none, once it has run out)."""
        batches: List[dict] = []
        while len(batches) < self.grad_accum and not self.exhausted:
            try:
                batches.append(next(self._it))
            except StopIteration:
                self.exhausted = True
            except LoaderStalled as e:
                self.stalled, self.exhausted = e, True
        return batches

    def batches_in_epoch(self) -> int:
        """Batches this rank's share produced so far in the epoch (before a resume too)."""
        return sum(self.loader.position.batches(self.num_workers, self.batch_size))

    def local_status(self, taken: List[dict], counts: Dict[str, int]) -> List[float]:
        """This rank's entry of the status vector (summed over ranks): whether it has data for the next step, whether
        it would need pads but has no batch to pad with, whether a worker stalled; then its counts by reason."""
        short = len(taken) < self.grad_accum
        return [float(bool(taken)), float(short and self.stalled is None and self.batches_in_epoch() == 0),
                float(self.stalled is not None)] + [float(counts.get(r, 0)) for r in REASONS]

    def pad(self, n: int) -> List[dict]:
        """n pad micro-batches: this rank's batches of the epoch again, in order, wrapping around."""
        pads: List[dict] = []
        while len(pads) < n:
            if self._pad_it is None:
                self._pad_loader = self.make_loader(self._pad_start or DataPosition(epoch=self.epoch))
                self._pad_it = iter(self._pad_loader)
            batch = next(self._pad_it, None)
            if batch is None:  # the pass ended: wrap to the epoch's first batch
                self._pad_start, self._pad_it, self._pad_loader = None, None, None
                continue
            pads.append(dict(batch, pad=True))
        return pads

    @property
    def position(self) -> DataPosition:
        """Where this rank's share stands, just after the last micro-batch taken."""
        return self.loader.position

    @property
    def pad_position(self) -> DataPosition | None:
        """Where the pad pass stands (None before any pad, or right after it wrapped)."""
        return self._pad_loader.position if self._pad_loader is not None else self._pad_start


def summed_status(reduced: List[float]) -> Dict[str, object]:
    """The all-reduced status vector as named fields, with `counts` by reason."""
    n = len(STATUS_FIELDS)
    out: Dict[str, object] = {name: int(round(v)) for name, v in zip(STATUS_FIELDS, reduced[:n])}
    out["counts"] = {r: int(round(v)) for r, v in zip(REASONS, reduced[n:n + len(REASONS)])}
    return out
