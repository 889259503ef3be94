"""What one `elcell serve` app holds: its settings, the model and its batcher,
the kept results and the review loop; and the lookups its routes share, which
answer a missing thing with a 404 and an unreadable upload with a 400.
Torch-free."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import numpy as np
from fastapi import HTTPException

from elcell.cells.images import read_reduced
from elcell.errors import ImageError
from elcell.infer.predict import model_column
from elcell.infer.runtime import Model, score_cells
from elcell.options import MAP_DETAIL, MAP_VIEWS
from elcell.pvmodules.grading import load_rules
from elcell.pvmodules.inspect import as_gray
from elcell.station.batcher import Batcher
from elcell.station.budget import MB, Budget, PixelBudget
from elcell.station.queue import ReviewQueue, Scored
from elcell.station.results import CellResult, ModuleResult, ResultStore, clean
from elcell.station.review import LabelsFolder

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
    review_random: float = 0.1  # share of the cells handed out for review that are random `ok` ones
    map_views: int | None = MAP_VIEWS  # views a module's flagged cells' heatmaps average (None: the model's)
    map_detail: str = MAP_DETAIL  # their maps coarse (from the scoring pass) or fine (elcell.options)
    review_order: str = "check"  # elcell.infer.review_order: check decisions, or teach a fine-tuning
    review_seed: int | None = None  # for the random draws (tests)


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
        self.queue = ReviewQueue(self.folder, list(self.thresholds), random_share=settings.review_random,
                                 seed=settings.review_seed, order=settings.review_order) if self.folder else None
        # cells left waiting by another model (or thresholds) show this one's scores and order
        self.rescored = self.queue.rescore(self.scorer(), self._score_pixels) if self.queue is not None else None

    def scorer(self) -> dict:
        """What decides which cells wait for review: the model (its weights' hash, as
        predict and inspect record it) and the thresholds."""
        return {"model": model_column(self.model),
                "thresholds": [float(t) for t in self.thresholds],
                "review_thresholds": [float(t) for t in self.review_thresholds]}

    def _score_pixels(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores = score_cells(self.model, pixels, thresholds=self.thresholds, review_thresholds=self.review_thresholds)
        return scores.probs, scores.decisions

    def keep(self, results: list[CellResult]) -> list[str]:
        """Store scored cells (their result ids, in order); with reviews on, offer
        them to the review queue, which takes the flagged, borderline and some
        random `ok` ones, each once however often it is scored."""
        keys = [self.store.put(result) for result in results]
        if self.queue is not None:
            offered = [Scored(r.name, r.pixels, r.probs, r.decisions) for r in results]
            for result, review in zip(results, self.queue.offer(offered), strict=True):
                result.review = review
        return keys

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


def read_grid(text: str) -> tuple[int, int]:
    """A module's grid as a person types it ("6x10"), or a 422 saying in words what
    is wrong (not a pattern, not a command-line option)."""
    found = re.fullmatch(r"\s*(\d{1,4})\s*[xX×*]\s*(\d{1,4})\s*", text or "")
    if not found:
        raise HTTPException(422, f"grid: {text!r} is not a grid; write the cells as the module appears in the "
                                 "photo, rows x columns, e.g. 6x10")
    rows, cols = int(found[1]), int(found[2])
    if rows < 1 or cols < 1:
        raise HTTPException(422, f"grid: {text!r} has no cells; a module has at least 1 row and 1 column, "
                                 "e.g. 6x10")
    return rows, cols


def looks_like_module(shape: tuple[int, ...], size: int) -> str | None:
    """Why an upload to /cells looks like a photo of a whole module, else None.
    A cell is about square (a half-cut cell 2:1); a module of 6 x 10 cells is
    about 5:3 and, at any camera resolution, several cells' worth of pixels
    on its long side: refused only when it is both off-square (not a half
    cell) and larger than three of the model's cells."""
    height, width = shape[:2]
    aspect = max(height, width) / max(1, min(height, width))
    half_cell = 1.8 <= aspect <= 2.2
    if aspect >= 1.3 and not half_cell and max(height, width) >= 3 * size:
        return (f"{width}x{height} pixels ({aspect:.2f}:1) looks like a photo of a whole module, not a cell; "
                "inspect it in Modules mode (POST /api/v1/modules with its grid)")
    return None


def module_result(station: Station, key: str) -> ModuleResult:
    found = station.store.get(key, ModuleResult)
    if found is None:
        raise HTTPException(404, f"no module {key!r}: unknown, or dropped from the store since")
    return found


def decode_module(data: bytes, name: str, at_least: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """A module photo as geometry takes it (uint8 or uint16), a JPEG decoded no
    larger than `at_least` needs as `elcell inspect` does (pvmodules.inspect.
    decode_size), and how many of the file's pixels one of its pixels spans;
    400 naming the file if unreadable."""
    try:
        if not data:
            raise ImageError(f"{name}: empty file")
        pixels, scale = read_reduced(io.BytesIO(data), at_least, min_size=32, name=name)
        return as_gray(pixels), scale
    except ImageError as err:
        raise HTTPException(400, clean(str(err))) from None
    except Exception as err:  # noqa: BLE001 - whatever else a crafted file provokes is still bad input
        raise HTTPException(400, f"{name}: not a readable image ({type(err).__name__})") from None
