"""Micro-batching: concurrent requests share model forwards, and the model never runs on the event loop.

One thread owns the encoder. A request's inputs wait in a queue; the thread takes the oldest request, then keeps
collecting requests of the same kind (text or image) until `max_batch` inputs or `max_wait` seconds have passed,
runs one forward per `max_batch` inputs, and hands each request its rows. Requests of the other kind wait for the
next round. An exception in a forward fails the requests of that batch only; the thread carries on.
"""

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, List

import numpy as np


@dataclass
class _Job:
    kind: str
    items: List[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _resolve(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    def done() -> None:
        if job.future.cancelled():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(done)


class MicroBatcher:
    def __init__(self, encode: Callable[[str, List[Any]], np.ndarray], max_batch: int = 64,
                 max_wait_s: float = 0.005, on_batch: Callable[[str, int], None] | None = None):
        self.encode, self.max_batch, self.max_wait_s = encode, max(1, max_batch), max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: deque = deque()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="clipkit-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def submit(self, kind: str, items: List[Any]) -> np.ndarray:
        """[len(items), D] float32 rows for `items` (texts or preprocessed image tensors)."""
        if not items:
            raise ValueError("no inputs")
        loop = asyncio.get_running_loop()
        job = _Job(kind, list(items), loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def _next(self, timeout: float | None) -> "_Job | None":
        if self._carry:
            return self._carry.popleft()
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _collect(self, first: _Job) -> List[_Job]:
        jobs, n = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        skipped = []
        while n < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if job.kind != first.kind:
                skipped.append(job)
                continue
            jobs.append(job)
            n += len(job.items)
        self._carry.extend(skipped)
        return jobs

    def _run(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            jobs = self._collect(job)
            items = [x for j in jobs for x in j.items]
            try:
                rows = []
                for start in range(0, len(items), self.max_batch):
                    chunk = items[start:start + self.max_batch]
                    rows.append(self.encode(job.kind, chunk))
                    if self.on_batch is not None:
                        self.on_batch(job.kind, len(chunk))
                out = np.concatenate(rows)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests, logged by the app
                for j in jobs:
                    _resolve(j, error=e)
                continue
            start = 0
            for j in jobs:
                _resolve(j, out[start:start + len(j.items)])
                start += len(j.items)
