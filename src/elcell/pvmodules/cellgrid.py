"""Where a rectified module's cell borders are: the dark gaps between its cells.

Cell borders come from the dark gaps: profiles of strips
of the rectified module, each divided by its upper envelope (uneven light
cancels), combined by their median (a defect in a few cells does not count).
Walking in from both edges, a border is the best dip about a cell beyond the
last (a wide half-cell split shifts the borders after it, not the search).
Busbars lie parallel to gaps but an eighth of a cell or more from them, and a
far dip must be much deeper than a near one to be taken. The grid is refused
when borders lack a dip, or when a dip inside cells is as strong (depth x
width) as the gaps: busbars are thinner or paler than gaps, shading is broader.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from elcell.errors import ImageError

_GAP_DEPTH = 0.25  # a gap is at least this much darker than the cells beside it
_WINDOW = 0.2  # first search: this fraction of a cell around one pitch past the last border
_NARROW = 0.12  # second search, around the middle of the neighbouring borders
_INSIDE_RATIO = 0.65  # a dip inside cells this strong, relative to the weakest gap, is a gap


class GridMismatchError(ImageError):
    """The requested grid does not match the gaps between the module's cells."""


@dataclass
class _Borders:
    """Cell borders along one axis of the rectified module, and the evidence for them."""

    at: np.ndarray  # [n + 1] the outer edges and the gap centres between them
    widths: np.ndarray  # [n + 1] widths of the gaps (0 at the edges)
    strengths: np.ndarray  # [n + 1] depth x width of each gap (0 at the edges)
    missing: list[int]  # inner borders without a gap-deep dip (interpolated)
    depth: np.ndarray  # [length] depth of dips up to 0.4 cells wide and in 3/4 of the strips
    pitch: float  # the mean cell size along this axis

    def weakest(self) -> tuple[float, float]:
        """(strength of the weakest, width of the widest) gap found at an inner border; 0s if none."""
        found = [i for i in range(1, len(self.at) - 1) if i not in self.missing]
        return (float(self.strengths[found].min()), float(self.widths[found].max())) if found else (0.0, 0.0)


def find_borders(flat: np.ndarray, count: int, across: int, axis: int) -> _Borders:
    """Borders of `count` cells along `axis` (1: x, 0: y) of the rectified module, from
    the mean profiles of strips across it (one a cell, at least 4). Each is found
    walking in from the edges, then again near the middle of its neighbours."""
    pitch = flat.shape[axis] / count
    # a lone cell along this axis gives no scale for gaps: the other axis' cells do (were the
    # grid wrong, its gaps would be blurred away and bridged at the whole module's length)
    scale = pitch if count > 1 else flat.shape[1 - axis] / max(1, across)
    cuts = np.linspace(0, flat.shape[1 - axis], max(4, across) + 1).round().astype(int)
    strips = [flat[s0:s1] if axis == 1 else flat[:, s0:s1] for s0, s1 in zip(cuts[:-1], cuts[1:])]
    profiles = np.stack([cv2.reduce(p, 1 - axis, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel() for p in strips])
    profiles = cv2.GaussianBlur(profiles, (0, 0), sigmaX=max(0.5, 0.004 * scale), sigmaY=1e-3)  # [strips, L]
    depth = _gap_depth(profiles, pitch)  # an envelope a cell long bridges even a wide split
    at, widths, strengths = np.arange(count + 1) * pitch, np.zeros(count + 1), np.zeros(count + 1)
    found = {0, count}

    def search(i: int, guess: float, window: float) -> None:
        dip = _best_dip(depth, guess, window * pitch, pitch)
        # borders keep their order, at least half a cell apart: a gap is not taken twice
        low = max(at[k] + 0.5 * pitch * (i - k) for k in found if k < i)
        high = min(at[k] - 0.5 * pitch * (k - i) for k in found if k > i)
        if dip is not None and low < dip[0] < high:
            at[i], widths[i], strengths[i] = dip
            found.add(i)

    half = count // 2  # walk 1, 2, ... from the left edge, n-1, n-2, ... from the right one
    for i, side in [(i, -1) for i in range(1, half + 1)] + [(i, 1) for i in range(count - 1, half, -1)]:
        at[i] = at[i + side] - side * pitch
        search(i, at[i], _WINDOW)
    for i in sorted(found - {0, count}):
        found.discard(i)
        search(i, (at[i - 1] + at[i + 1]) / 2, _NARROW)
        found.add(i)
    missing = sorted(set(range(count + 1)) - found)
    if missing:
        known = sorted(found)
        at[missing] = np.interp(missing, known, at[known])
        widths[missing] = np.median(widths[known[1:-1]]) if len(known) > 2 else 0.0
    # for the inside check: a gap is dark in (nearly) every strip, shading narrower than half a cell
    return _Borders(at, widths, strengths, missing, _gap_depth(profiles, 0.4 * scale, 25), pitch)


def _gap_depth(profiles: np.ndarray, length: float, quantile: float = 50) -> np.ndarray:
    """[length] a quantile over strips (the median: dark in half of them) of 1 - profile /
    its upper envelope: 0 as bright as the cells nearby, 1 black. The envelope, a
    closing `length` long, bridges dips narrower than that but follows uneven light."""
    kernel = np.ones((1, 2 * int(length / 2) + 1), np.uint8)
    envelope = cv2.erode(cv2.dilate(profiles, kernel), kernel)
    lit = envelope > 0.1 * np.median(envelope)  # a black strip says nothing
    depth = np.where(lit, 1.0 - profiles / np.maximum(envelope, 1e-6), 0.0)
    return np.percentile(np.clip(depth, 0.0, 1.0), quantile, axis=0)


def _best_dip(depth: np.ndarray, guess: float, window: float,
              pitch: float) -> tuple[float, float, float] | None:
    """(centre, width, strength) of the best gap-deep dip within `window` of `guess`, or None.
    Near dips are favoured: a busbar an eighth of a cell away must be deeper to win."""
    lo, hi = max(1, int(guess - window)), min(len(depth) - 1, int(guess + window) + 1)
    if hi <= lo:
        return None
    score = depth[lo:hi] * (1.0 - 0.5 * ((np.arange(lo, hi) - guess) / window) ** 2)
    peak = lo + int(np.argmax(score))
    return _dip(depth, peak, int(0.6 * pitch)) if depth[peak] >= _GAP_DEPTH else None


def _dip(depth: np.ndarray, peak: int, limit: int) -> tuple[float, float, float]:
    """(middle, width, depth x width) of the run around `peak` deeper than half its depth;
    the middle, not the deepest sample, as a wide gap has a flat, noisy bottom."""
    below = depth < depth[peak] / 2
    lo, hi = max(0, peak - limit), min(len(depth), peak + limit + 1)
    left = peak - int(np.argmax(below[lo:peak + 1][::-1])) if below[lo:peak + 1].any() else lo - 1
    right = peak + int(np.argmax(below[peak:hi])) if below[peak:hi].any() else hi
    width = float(max(1, right - left - 1))
    return (left + right) / 2, width, width * float(depth[peak])


def _inside_strength(b: _Borders, gap_width: float) -> float:
    """Strength of the strongest dip away from every border; dips more than twice as wide
    as the widest gap are shading (an inactive area, a darker cell), not a gap."""
    d = b.depth
    peaks = np.flatnonzero((d[1:-1] >= d[:-2]) & (d[1:-1] > d[2:]) & (d[1:-1] >= _GAP_DEPTH)) + 1
    clear = b.widths / 2 + 0.08 * b.pitch
    peaks = peaks[np.all(np.abs(peaks[:, None] - b.at[None, :]) > clear[None, :], axis=1)]
    dips = [_dip(d, p, int(0.6 * b.pitch)) for p in peaks]
    return max((s for _, w, s in dips if w <= 2 * gap_width + 2), default=0.0)


def check_fit(xs: _Borders, ys: _Borders, rows: int, cols: int, cell_px: float) -> None:
    """Raise GridMismatchError unless the borders are gaps and no gap runs through cells.
    A few borders may lack one (dark cells); an axis without inner borders is judged
    against the other axis' gaps."""
    grid = f"{rows}x{cols} grid"
    hint = f" (cells of {cell_px:.0f} pixels: the gaps may be too thin to see)" if cell_px < 48 else ""
    for b, inner, what in ((xs, cols - 1, "column"), (ys, rows - 1, "row")):
        if len(b.missing) > inner // 8:
            raise GridMismatchError(f"no dark gap between cells near {len(b.missing)} of the {inner} "
                                    f"{what} borders of a {grid}{hint}: is the grid right?")
    for b, other, line in ((xs, ys, "vertical"), (ys, xs, "horizontal")):
        strength, width = b.weakest() if b.weakest()[0] else other.weakest()
        if strength and _inside_strength(b, width) > _INSIDE_RATIO * strength:
            raise GridMismatchError(f"a dark {line} gap runs through the middle of cells of a {grid}, "
                                    "as strong as the gaps between them: is the grid right?")
