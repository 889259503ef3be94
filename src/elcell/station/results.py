"""What the service keeps of its answers, and how they become JSON and
pictures. Torch-free, no web framework.

Each scored cell and inspected module is kept, under a random id, in a
bounded in-memory store (oldest out first, by count and by bytes), so the page
can ask for its overlays and maps afterwards by URL; an id that has gone is a
404 there. Heatmaps are computed when a picture first needs them, not with
every answer: an inspection line that wants only the numbers does not pay
for them.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from elcell.cells.images import Decoding, open_image, read_pixels, to_cell, to_uint8
from elcell.errors import ImageError
from elcell.infer.heatmaps import heatmap_box, overlay_png, png_bytes
from elcell.infer.runtime import OK
from elcell.pvmodules.judge import ModuleInspection
from elcell.pvmodules.modulemap import MAX_WIDTH, encode_png

API = "/api/v1"
MAX_CELL_PIXELS = 25_000_000  # an uploaded cell larger than this (5000 x 5000) is refused from its header


# --------------------------------------------------------------------------- uploads
@dataclass
class Upload:
    """One uploaded cell file, decoded: as stored, as uint8, and as the model's input."""

    name: str
    pixels: np.ndarray | None = None  # gray as stored (uint8, uint16 or float), own size
    gray: np.ndarray | None = None  # uint8, own size
    cell: np.ndarray | None = None  # uint8 [S, S]
    error: str | None = None


def check_header(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header says it is larger than `max_pixels`, before
    decoding a single pixel (a decompression bomb is a tiny file)."""
    try:
        with open_image(io.BytesIO(data), name) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - read_pixels names what is wrong with it
        return
    if width * height > max_pixels:
        raise ImageError(f"{name}: image is {width}x{height} pixels, more than the {max_pixels // 1_000_000} "
                         "million accepted here")


def decode_cell(data: bytes, name: str, decoding: Decoding) -> Upload:
    """An uploaded cell decoded exactly as `elcell predict` decodes the same file
    (`load_cell`: read_gray, then to_cell). Never raises: the reason goes in `error`."""
    try:
        if not data:
            raise ImageError(f"{name}: empty file")
        check_header(data, name, MAX_CELL_PIXELS)
        pixels = read_pixels(io.BytesIO(data), name=name)
        gray = to_uint8(pixels, decoding.bit_depth, name)
        return Upload(name, pixels, gray, to_cell(gray, decoding))
    except ImageError as err:
        return Upload(name, error=clean(str(err)))
    except Exception as err:  # noqa: BLE001 - whatever else a crafted file provokes is still bad input
        return Upload(name, error=f"{name}: not a readable image ({type(err).__name__})")


def clean(message: str) -> str:
    """A message about an upload without Python's name for the in-memory file."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message)


# --------------------------------------------------------------------------- kept results
@dataclass
class CellResult:
    """A scored cell: its pixels at its own resolution, and what the model said."""

    name: str
    pixels: np.ndarray  # as stored or as cut (uint8, uint16 or float)
    bit_depth: int
    probs: np.ndarray  # [N]
    decisions: np.ndarray  # [N] str
    heatmaps: np.ndarray | None = None  # [N, h, w], once computed
    coarse: bool = False  # heatmaps are a module map's coarse ones: boxes from them, overlays drawn fine
    cell: np.ndarray | None = None  # the model's input, to compute heatmaps later
    review: str | None = None  # the review item's id, when queued
    pngs: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def gray(self) -> np.ndarray:
        return to_uint8(self.pixels, self.bit_depth, self.name)

    @property
    def flagged(self) -> bool:
        return bool((self.decisions != OK).any())

    def nbytes(self) -> int:
        return int(self.pixels.nbytes + (self.cell.nbytes if self.cell is not None else 0)) + 4096


@dataclass
class ModuleResult:
    name: str
    grid: str
    found: ModuleInspection
    cells: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, col) -> cell result id
    png: bytes | None = field(default=None, repr=False)

    def nbytes(self) -> int:
        found = self.found
        return int((found.map.nbytes if found.map is not None else 0) + 4096)


class ResultStore:
    """Results by random id, bounded by count and bytes; the oldest go first. Thread-safe."""

    def __init__(self, max_items: int = 20_000, max_bytes: int = 512 * 2**20):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, item: Any) -> str:
        key = secrets.token_hex(8)
        size = item.nbytes()
        with self._lock:
            self._items[key] = (item, size)
            self._bytes += size
            while len(self._items) > 1 and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
                _, (_, gone) = self._items.popitem(last=False)
                self._bytes -= gone
        return key

    def get(self, key: str, kind: type) -> Any | None:
        with self._lock:
            found = self._items.get(key)
        return found[0] if found is not None and isinstance(found[0], kind) else None

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------- JSON
def box(heatmap: np.ndarray, shape: tuple[int, int]) -> list[int] | None:
    """[x0, y0, x1, y1] (x1, y1 exclusive) around where the model looked, in the
    pixels of an image of `shape`; None when the heatmap is all zero."""
    found = heatmap_box(heatmap, shape)
    if found is None:
        return None
    return [found["x"], found["y"], found["x"] + found["width"], found["y"] + found["height"]]


def boxes(result: CellResult, labels: list[str], which: str) -> dict[str, list[int] | None]:
    """Boxes for `which` labels: "all", "flagged" (not ok) or "none"."""
    if which == "none" or result.heatmaps is None:
        return {}
    shape = result.pixels.shape[:2]
    return {label: box(result.heatmaps[j], shape) for j, label in enumerate(labels)
            if which == "all" or result.decisions[j] != OK}


def cell_record(key: str, result: CellResult, labels: list[str], which: str = "flagged") -> dict:
    """A cell as the API answers it."""
    height, width = result.pixels.shape[:2]
    base = f"{API}/results/{key}"
    return {"id": key, "name": result.name, "width": int(width), "height": int(height),
            "probs": {label: float(p) for label, p in zip(labels, result.probs, strict=True)},
            "decisions": {label: str(d) for label, d in zip(labels, result.decisions, strict=True)},
            "boxes": boxes(result, labels, which), "error": None, "image": f"{base}/image.png",
            "overlays": {label: f"{base}/overlay/{label}.png" for label in labels},
            "review": result.review}


def error_record(name: str, error: str) -> dict:
    return {"id": None, "name": name, "width": None, "height": None, "probs": {}, "decisions": {}, "boxes": {},
            "error": error, "image": None, "overlays": {}, "review": None}


def map_boxes(found: ModuleInspection) -> np.ndarray:
    """Each cell's box in the map PNG's pixels, [rows, cols, 4] (x0, y0, x1, y1):
    the rectified module drawn at MAX_WIDTH at most, under a title band."""
    geometry = found.geometry
    width, height = geometry.size
    scale = min(1.0, MAX_WIDTH / width)
    band = found.map.shape[0] - int(round(height * scale)) if found.map is not None else 0
    boxes = np.array([[[v * scale + (band if k % 2 else 0) for k, v in enumerate(geometry.cell_box(r, c))]
                       for c in range(geometry.cols)] for r in range(geometry.rows)])
    if found.map is not None:  # rounding may reach past the last pixel
        np.clip(boxes, 0, [found.map.shape[1], found.map.shape[0]] * 2, out=boxes)
    return boxes


def module_record(key: str, module: ModuleResult, store: ResultStore) -> dict:
    """A module as the API answers it: rows and columns counted from 1, as in
    `elcell inspect`'s cells.csv; corners in the photo's pixels (TL, TR, BR, BL)."""
    found = module.found
    labels = found.labels
    rows, cols = found.decisions.shape[:2]
    on_map = map_boxes(found)
    height, width = found.map.shape[:2] if found.map is not None else (0, 0)
    cells = []
    for r in range(rows):
        for c in range(cols):
            cell_key = module.cells.get((r, c))
            result = store.get(cell_key, CellResult) if cell_key else None
            cells.append({
                "row": r + 1, "col": c + 1, "id": cell_key,
                "corners": [[float(x), float(y)] for x, y in found.corners[r, c]],
                "probs": {label: float(p) for label, p in zip(labels, found.probs[r, c], strict=True)},
                "decisions": {label: str(d) for label, d in zip(labels, found.decisions[r, c], strict=True)},
                "dark_area": float(found.dark_area[r, c]),
                "map_box": [round(float(v), 1) for v in on_map[r, c]],
                "image": f"{API}/results/{cell_key}/image.png" if cell_key else None,
                "review": result.review if result else None})
    return {"id": key, "name": module.name, "grid": module.grid, "rows": rows, "cols": cols,
            "grade": found.grade, "rule": found.rule_text,
            "counts": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in found.counts.items()},
            "seconds": round(found.seconds, 4), "map": f"{API}/modules/{key}/map.png",
            "map_size": [int(width), int(height)], "labels": labels, "cells": cells}


# --------------------------------------------------------------------------- pictures
def cell_png(result: CellResult) -> bytes:
    if "image" not in result.pngs:
        result.pngs["image"] = png_bytes(Image.fromarray(result.gray, "L"))
    return result.pngs["image"]


def overlay(result: CellResult, labels: list[str], label: str) -> bytes:
    """The label's heatmap on the cell at its own resolution (heatmaps must be there)."""
    key = f"overlay:{label}"
    if key not in result.pngs:
        j = labels.index(label)
        heat = result.heatmaps[j]
        found = heatmap_box(heat, result.pixels.shape[:2])
        result.pngs[key] = overlay_png(result.gray, heat, float(result.probs[j]), label,
                                       str(result.decisions[j]), found)
    return result.pngs[key]


def module_png(module: ModuleResult) -> bytes:
    if module.png is None:
        module.png = encode_png(module.found.map)
    return module.png
