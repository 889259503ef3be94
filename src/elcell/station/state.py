"""What one `elcell serve` app holds: its settings, the model and its batcher,
the kept results and the review loop; and the lookups its routes share, which
answer a missing thing with a 404 and an unreadable upload with a 400.
Torch-free."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import numpy as np
from fastapi import HTTPException

from elcell.cells.images import read_pixels
from elcell.errors import ImageError
from elcell.infer.runtime import Model
from elcell.pvmodules.grading import load_rules
from elcell.pvmodules.inspect import as_gray
from elcell.station.batcher import Batcher
from elcell.station.budget import MB, Budget, PixelBudget
from elcell.station.results import CellResult, ModuleResult, ResultStore, clean
from elcell.station.review import LabelsFolder, ReviewItem, ReviewQueue

T = TypeVar("T")


@dataclass
class Settings(Budget):
    """How `elcell serve` runs (its command-line options; the memory budget's are
    declared in Budget, elcell.station.budget)."""

    token: str | None = None
    host: str = "127.0.0.1"  # the address it listens on: a name it answers to, as the loopback names are
    allowed_hosts: tuple[str, ...] = ()  # further names it answers to (--allowed-host)
    labels_out: Path | None = None
    batch_size: int = 16
    max_wait_ms: float = 5.0
    thresholds: list[float] | None = None
    review_thresholds: list[float] | None = None
    rules: str | None = None
    max_results_mb: int = 512


class Station:
    """Everything one app holds: the model, its batcher, kept results, the review loop."""

    def __init__(self, model: Model, settings: Settings):
        self.model = model
        self.settings = settings
        self.labels = model.info.labels
        self.thresholds = settings.thresholds or model.info.thresholds
        self.review_thresholds = settings.review_thresholds or model.info.review_thresholds
        self.rules = load_rules(settings.rules)
        self.batcher = Batcher(model, settings.batch_size, settings.max_wait_ms / 1000, int(settings.max_queue_mb * MB),
                               self.thresholds, self.review_thresholds)
        self.pixels = PixelBudget(settings)
        self._decoders: anyio.CapacityLimiter | None = None
        self.store = ResultStore(max_bytes=settings.max_results_mb * 2**20)
        self.folder = LabelsFolder(settings.labels_out, self.labels) if settings.labels_out else None
        self.queue = ReviewQueue()

    def keep(self, result: CellResult) -> str:
        """Store a scored cell; queue it for review when flagged and reviews are on."""
        if self.folder is not None and result.flagged:
            item = ReviewItem(result.name, result.pixels, dict(zip(self.labels, map(float, result.probs))),
                              dict(zip(self.labels, map(str, result.decisions))))
            result.review = item.id
            item.result = self.store.put(result)
            self.queue.add(item)
            return item.result
        return self.store.put(result)

    @property
    def decoders(self) -> anyio.CapacityLimiter:
        """The threads that may decode images at once (--decoders), over all requests;
        made on first use, inside the event loop that uses it."""
        if self._decoders is None:
            self._decoders = anyio.CapacityLimiter(self.settings.decoders)
        return self._decoders

    async def decode(self, function: Callable[[], T]) -> T:
        """`function()` (which decodes images, one at a time) in a thread, when a decoder is free."""
        return await anyio.to_thread.run_sync(function, limiter=self.decoders)

    def cell(self, key: str) -> CellResult:
        result = self.store.get(key, CellResult)
        if result is None:
            raise HTTPException(404, f"no result {key!r}: unknown, or dropped from the store since")
        return result

    def review_folder(self) -> LabelsFolder:
        if self.folder is None:
            raise HTTPException(404, "the review loop is off: start elcell serve with --labels-out DIR")
        return self.folder


def module_result(station: Station, key: str) -> ModuleResult:
    found = station.store.get(key, ModuleResult)
    if found is None:
        raise HTTPException(404, f"no module {key!r}: unknown, or dropped from the store since")
    return found


def decode_module(data: bytes, name: str) -> np.ndarray:
    """A module photo as geometry takes it (uint8 or uint16); 400 naming the file if unreadable."""
    try:
        if not data:
            raise ImageError(f"{name}: empty file")
        return as_gray(read_pixels(io.BytesIO(data), name=name, min_size=32))
    except ImageError as err:
        raise HTTPException(400, clean(str(err))) from None
    except Exception as err:  # noqa: BLE001 - whatever else a crafted file provokes is still bad input
        raise HTTPException(400, f"{name}: not a readable image ({type(err).__name__})") from None
