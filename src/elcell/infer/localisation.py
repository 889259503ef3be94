"""Does a heatmap point at the defect? Three measures, on heatmaps of any
model and method (tests, benchmarks/heatmap_localisation.py, docs/heatmaps.md).

* Pointing game: clean cells with cracks and dark areas drawn on them (the
  training code's generator), the drawn pixels as truth. A hit when the
  heatmap's hottest feature cell, widened by one feature cell, touches the
  drawing; against the share of feature cells that would count as a hit for a
  peak anywhere (what a random peak scores).
* Consistency: rotate or flip a cell; the peak must move with it (to within
  one feature cell).
* Corner bias: the share of peaks on the map's border, against the border's
  share of the map.

A map that is zero everywhere has no peak: a miss, never the top-left corner.
Arrays only; no model code here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the eight symmetries of a square as functions of a [..., H, W] array
SYMMETRIES = {
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "flip_lr": lambda a: a[..., ::-1],
    "flip_ud": lambda a: a[..., ::-1, :],
    "transpose": lambda a: np.swapaxes(a, -1, -2),
    "anti_transpose": lambda a: np.rot90(np.swapaxes(a, -1, -2), 2, axes=(-2, -1)),
}


def peaks(maps: np.ndarray) -> np.ndarray:
    """(row, col) of each map's largest value [N, 2]; (-1, -1) for a map with no
    positive value (nothing speaks for the label)."""
    flat = maps.reshape(len(maps), -1)
    rows, cols = np.divmod(flat.argmax(axis=1), maps.shape[-1])
    found = flat.max(axis=1) > 0
    return np.where(found[:, None], np.stack([rows, cols], axis=1), -1)


def mask_on_grid(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Which feature cells a pixel mask [N, H, W] touches: [N, h, w] bool (the
    image divided evenly among the feature cells)."""
    n, height, width = masks.shape
    rows = np.minimum(np.arange(height) * grid[0] // height, grid[0] - 1)
    cols = np.minimum(np.arange(width) * grid[1] // width, grid[1] - 1)
    out = np.zeros((n, *grid), dtype=bool)
    ys, xs = np.nonzero(masks.any(axis=0))
    for y, x in zip(ys, xs, strict=True):  # few pixels: cracks are thin
        out[:, rows[y], cols[x]] |= masks[:, y, x]
    return out


def widen(grid_mask: np.ndarray) -> np.ndarray:
    """A [N, h, w] mask grown by one feature cell in every direction."""
    padded = np.pad(grid_mask, ((0, 0), (1, 1), (1, 1)))
    h, w = grid_mask.shape[1:]
    return np.any([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


@dataclass
class PointingGame:
    hits: float  # share of cells whose peak touches the widened drawing
    chance: float  # share a random peak would score (mean widened-drawing area)
    no_peak: float  # share of maps that are zero everywhere


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> PointingGame:
    """maps [N, h, w] of cells whose drawn defects are `masks` [N, H, W]."""
    target = widen(mask_on_grid(masks, maps.shape[1:]))
    found = peaks(maps)
    ok = found[:, 0] >= 0
    hit = np.zeros(len(maps), dtype=bool)
    hit[ok] = target[np.flatnonzero(ok), found[ok, 0], found[ok, 1]]
    return PointingGame(float(hit.mean()), float(target.mean()), float((~ok).mean()))


def consistency(maps: np.ndarray, turned: dict[str, np.ndarray]) -> dict[str, float]:
    """Per symmetry, the share of cells whose peak in the map of the turned cell
    lies within one feature cell of the turned peak of the plain map. `turned`
    maps each SYMMETRIES name to the maps of the turned cells [N, h, w]."""
    plain = peaks(maps)
    result = {}
    for name, other in turned.items():
        expected = np.zeros((len(maps), *maps.shape[1:]), dtype=bool)
        valid = plain[:, 0] >= 0
        expected[np.flatnonzero(valid), plain[valid, 0], plain[valid, 1]] = True
        where = peaks(SYMMETRIES[name](expected).astype(np.float32))
        got = peaks(other)
        close = (got[:, 0] >= 0) & valid & (np.abs(got - where).max(axis=1) <= 1)
        result[name] = float(close.mean())
    return result


def border_share(maps: np.ndarray) -> tuple[float, float]:
    """The share of peaks on the map's outermost ring of feature cells, and the
    ring's share of the map (what peaks anywhere at random would give)."""
    found = peaks(maps)
    found = found[found[:, 0] >= 0]
    h, w = maps.shape[1:]
    on_border = (found[:, 0] == 0) | (found[:, 1] == 0) | (found[:, 0] == h - 1) | (found[:, 1] == w - 1)
    return float(on_border.mean()) if len(found) else 0.0, 1 - max(h - 2, 0) * max(w - 2, 0) / (h * w)
