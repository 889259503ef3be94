"""Micro-batching for the service: cells from concurrent requests scored
together, off the event loop. Torch-free.

An inspection line sends one cell (or one module) per request, from several
clients at once. One ONNX Runtime call on 16 cells costs far less than 16
calls on one, so requests are queued and one worker thread takes them in
batches: a batch goes as soon as it holds `batch_size` cells, or when its
oldest request has waited `max_wait` seconds, whichever comes first. While
the worker is busy the queue fills, so under load batches are full and
nobody waits for the timer.

The queue is bounded in bytes (`max_queue_bytes`): a job counts what it
holds (its cells, or for a call the bytes its caller says it holds, such as
the module photo it inspects), not one per job, so a few large module photos
fill it as surely as many cells. Past it `submit` raises QueueFull at once,
which the service answers with 503 and Retry-After, instead of letting
latency and memory grow without limit. A job larger than the whole queue is
still taken when the queue is empty.

The model is only ever called from the worker thread (runtime.Model is safe
from one thread); other work that uses the model, such as inspecting a
module, goes through `call` and takes its turn in the same queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from elcell.infer.runtime import CellScores, Model, score_cells
from elcell.station.budget import Busy

CALL = ("call",)  # the key of a job that is a function call, not cells to score


class QueueFull(Busy):
    """The model's queue holds `max_queue_bytes` of work already (503, Retry-After)."""


@dataclass
class _Job:
    key: tuple  # jobs with the same key can share a batch
    size: int  # cells (1 for a call)
    nbytes: int  # what the job holds while it waits: the queue's bound counts these
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cells: np.ndarray | None = None  # uint8 [k, S, S] for scoring
    call: Callable[[], Any] | None = None
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    batches: int = 0
    cells: int = 0
    calls: int = 0
    nbytes: int = 0  # of the jobs done, for Retry-After
    largest: int = 0

    @property
    def mean_batch(self) -> float:
        return self.cells / self.batches if self.batches else 0.0


class Batcher:
    """Queue in front of one model. `score` and `call` are awaited from the event
    loop; the work runs in the batcher's thread, started on first use."""

    def __init__(self, model: Model, batch_size: int = 16, max_wait: float = 0.005, max_queue_bytes: int = 64 * 2**20,
                 thresholds: Sequence[float] | None = None, review_thresholds: Sequence[float] | None = None):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_wait = max(0.0, max_wait)
        self.max_queue_bytes = max(1, max_queue_bytes)
        self.thresholds = thresholds
        self.review_thresholds = review_thresholds
        self.stats = BatcherStats()
        self._pending: deque[_Job] = deque()
        self._queued_cells = 0
        self._queued_bytes = 0
        self._busy = False
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds = 0.0  # the worker's busy time, for Retry-After

    # ------------------------------------------------------------------ front (event loop)
    @property
    def queued(self) -> int:
        """Cells waiting to be scored."""
        return self._queued_cells

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="elcell-batcher", daemon=True)
                self._thread.start()

    async def score(self, cells: np.ndarray, heatmaps: bool = False, tta: bool = False) -> CellScores:
        """Scores of decoded model inputs (uint8 [k, S, S]), batched with other requests'."""
        cells = np.asarray(cells, dtype=np.uint8)
        if len(cells) == 0:
            return score_cells(self.model, cells, thresholds=self.thresholds,
                               review_thresholds=self.review_thresholds)
        return await self._submit(("score", bool(heatmaps), bool(tta)), len(cells), cells.nbytes, cells=cells)

    async def call(self, function: Callable[[], Any], nbytes: int = 0) -> Any:
        """Run `function()` (which may use the model) in the worker thread, in turn.
        nbytes: what the call holds while it waits (e.g. the photo it inspects)."""
        return await self._submit(CALL, 1, max(0, int(nbytes)), call=function)

    async def _submit(self, key: tuple, size: int, nbytes: int, **work) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(key, size, nbytes, loop, loop.create_future(), **work)
        self.start()
        with self._cond:
            if self._stopping:
                raise QueueFull("the service is stopping; try again in 5 s", 5)
            if self._pending and self._queued_bytes + nbytes > self.max_queue_bytes:
                wait = self._retry_after()
                raise QueueFull(f"the service is busy: {self._queued_bytes / 2**20:.1f} MB of work is queued for "
                                f"the model ({self._queued_cells} cells; --max-queue-mb "
                                f"{self.max_queue_bytes / 2**20:g}); try again in {wait} s", wait)
            self._pending.append(job)
            self._queued_cells += size if key != CALL else 0
            self._queued_bytes += nbytes
            self._cond.notify()
        return await job.future

    def _retry_after(self) -> int:
        """Seconds to come back after: the time the queue takes to drain, from
        the bytes of work done so far (at least 1)."""
        rate = self.stats.nbytes / self._seconds if self._seconds else 0
        return max(1, min(60, int(self._queued_bytes / rate) + 1 if rate else 1))

    async def stop(self) -> None:
        """Finish every queued job, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ worker (thread)
    def _take(self) -> list[_Job] | None:
        """The next batch: jobs with the first job's key, up to batch_size cells,
        once full or once the first has waited max_wait. None: stop."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending[0]
            if first.key == CALL:
                return self._pop([first])
            deadline = first.queued + self.max_wait
            while not self._stopping:
                if self._cells_with(first.key) >= self.batch_size:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, cells = [], 0
            for job in self._pending:
                if job.key != first.key:
                    continue
                if batch and cells + job.size > self.batch_size:
                    break
                batch.append(job)
                cells += job.size
            return self._pop(batch)

    def _cells_with(self, key: tuple) -> int:
        return sum(job.size for job in self._pending if job.key == key)

    def _pop(self, jobs: list[_Job]) -> list[_Job]:
        for job in jobs:
            self._pending.remove(job)
            self._queued_cells -= job.size if job.key != CALL else 0
            self._queued_bytes -= job.nbytes
            self.stats.nbytes += job.nbytes
        self._busy = True
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            started = time.perf_counter()
            try:
                if jobs[0].key == CALL:
                    self.stats.calls += 1
                    _deliver(jobs[0], jobs[0].call())
                else:
                    self._score(jobs)
            except BaseException as err:  # noqa: BLE001 - every waiting request must hear of it
                for job in jobs:
                    _fail(job, err)
            finally:
                self._seconds += time.perf_counter() - started
                self._busy = False

    def _score(self, jobs: list[_Job]) -> None:
        _, heatmaps, tta = jobs[0].key
        cells = np.concatenate([job.cells for job in jobs])
        parts = [score_cells(self.model, cells[i:i + self.batch_size], heatmaps=heatmaps, tta=tta,
                             thresholds=self.thresholds, review_thresholds=self.review_thresholds)
                 for i in range(0, len(cells), self.batch_size)]
        scores = parts[0] if len(parts) == 1 else _concat(parts)
        self.stats.batches += len(parts)
        self.stats.cells += len(cells)
        self.stats.largest = max(self.stats.largest, len(cells))
        start = 0
        for job in jobs:
            _deliver(job, _slice(scores, start, start + job.size))
            start += job.size


def _concat(parts: list[CellScores]) -> CellScores:
    maps = None if parts[0].heatmaps is None else np.concatenate([p.heatmaps for p in parts])
    return CellScores(np.concatenate([p.probs for p in parts]), np.concatenate([p.plain for p in parts]),
                      np.concatenate([p.decisions for p in parts]), maps,
                      np.concatenate([p.cells for p in parts]))


def _slice(scores: CellScores, start: int, stop: int) -> CellScores:
    maps = None if scores.heatmaps is None else scores.heatmaps[start:stop]
    return CellScores(scores.probs[start:stop], scores.plain[start:stop], scores.decisions[start:stop], maps,
                      None if scores.cells is None else scores.cells[start:stop])


def _deliver(job: _Job, result: Any) -> None:
    def settle() -> None:
        if not job.future.done():  # the client may have gone away
            job.future.set_result(result)
    _settle(job, settle)


def _fail(job: _Job, err: BaseException) -> None:
    def settle() -> None:
        if not job.future.done():
            job.future.set_exception(err)
    _settle(job, settle)


def _settle(job: _Job, settle: Callable[[], None]) -> None:
    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
