"""Whole modules in memory: a module photo in; its geometry, each cell's corners,
probabilities, decisions and dark area, the module's counts and grade, and
its map out. Torch-free: the batch command (elcell.pvmodules.inspect) and the service
(elcell.station.app) both call `inspect_module`.

How a cell reaches the model: cut at the photo's own resolution and depth
(elcell.pvmodules.geometry), read as the model's decoding says (its bit depth), and
resized to the model's square input. A rectangular half-cell is stretched to
the square, as any cell that is not square is (elcell.cells.images.to_cell): the
model sees the whole cell, and boxes and heatmaps map back onto it directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from elcell.cells.images import to_uint8
from elcell.infer.runtime import DEFECT, OK, REVIEW, Model, score_cells
from elcell.options import MAP_DETAIL, MAP_DETAILS, MAP_VIEWS
from elcell.pvmodules.geometry import ModuleGeometry, cut_cells, find_module
from elcell.pvmodules.grading import Rule, grade
from elcell.pvmodules.modulemap import draw_map

DARK = 0.5  # a pixel darker than this share of the module's typical cell brightness is dark


@dataclass
class ModuleInspection:
    """What inspecting one module found. probs, decisions: [rows, cols, N];
    dark_area: [rows, cols]; corners: [rows, cols, 4, 2] in the photo's pixels."""

    geometry: ModuleGeometry
    labels: list[str]
    probs: np.ndarray
    decisions: np.ndarray
    dark_area: np.ndarray
    corners: np.ndarray
    counts: dict[str, float]
    grade: str
    rule: Rule | None
    seconds: float = 0.0
    map: np.ndarray | None = None  # RGB uint8, with want_map
    cells: list[list[np.ndarray]] = field(default_factory=list, repr=False)  # as cut, the photo's dtype
    heatmaps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)  # flagged cells'
    map_detail: str = "fine"  # which maps `heatmaps` holds: "coarse" or "fine" (elcell.options.MAP_DETAIL)

    @property
    def rule_text(self) -> str:
        return self.rule.describe() if self.rule else "no rule matched"

    def flagged(self) -> list[tuple[int, int]]:
        rows, cols = self.decisions.shape[:2]
        return [(r, c) for r in range(rows) for c in range(cols) if (self.decisions[r, c] != OK).any()]


def dark_areas(cells: list[list[np.ndarray]]) -> np.ndarray:
    """Per cell, the share of its pixels darker than DARK x the module's typical cell
    brightness (the median of the cells' medians): the inactive area an EL
    engineer estimates by eye. [rows, cols]."""
    medians = np.array([[float(np.median(cell)) for cell in row] for row in cells])
    typical = float(np.median(medians))
    return np.array([[float((cell < DARK * typical).mean()) if typical > 0 else 1.0 for cell in row]
                     for row in cells])


def module_counts(labels: list[str], decisions: np.ndarray, dark: np.ndarray) -> dict[str, float]:
    """The names grading rules use (elcell.pvmodules.grading)."""
    flat = decisions.reshape(-1, len(labels))
    any_defect = (flat == DEFECT).any(axis=1)
    counts: dict[str, float] = {}
    for j, label in enumerate(labels):
        counts[f"defect_{label}"] = int((flat[:, j] == DEFECT).sum())
        counts[f"review_{label}"] = int((flat[:, j] == REVIEW).sum())
    counts.update(defect_cells=int(any_defect.sum()),
                  review_cells=int(((flat == REVIEW).any(axis=1) & ~any_defect).sum()),
                  ok_cells=int((flat == OK).all(axis=1).sum()), cells=len(flat),
                  dark_area=float(dark.mean()), max_dark_area=float(dark.max()))
    return counts


def inspect_module(model: Model, image: np.ndarray, rows: int, cols: int, rules: list[Rule],
                   name: str = "module", want_map: bool = True, thresholds: list[float] | None = None,
                   review_thresholds: list[float] | None = None, map_views: int | None = MAP_VIEWS,
                   map_detail: str = MAP_DETAIL) -> ModuleInspection:
    """Find, rectify and cut the module in `image` (2-D gray, uint8 or uint16),
    score its cells in one batch, grade it and (want_map) draw its map with the
    flagged cells' heatmaps (for the map and their overlays). `map_detail`
    "coarse": the coarse maps, from the call that scores the cells, where the
    model has them and `map_views` is 1; otherwise the fine maps, a backward pass
    for each flagged cell, averaged over `map_views` views (None: the model's own).
    Raises ImageError subclasses (elcell.pvmodules.geometry) for a photo it cannot use."""
    if map_detail not in MAP_DETAILS:
        raise ValueError(f"map_detail {map_detail!r}: one of {', '.join(MAP_DETAILS)}")
    started = time.perf_counter()
    geometry, flat = find_module(image, rows, cols)
    cells = cut_cells(flat, geometry)
    labels = model.info.labels
    coarse = want_map and map_detail == "coarse" and model.has_coarse and map_views == 1
    # converted here rather than in score_cells so that a warning about the pixels names the photo's cell
    gray = [to_uint8(cell, model.decoding.bit_depth, f"{name} cell {r + 1},{c + 1}")
            for r, row in enumerate(cells) for c, cell in enumerate(row)]
    scores = score_cells(model, gray, thresholds=thresholds,
                         review_thresholds=review_thresholds, heatmaps=coarse, map_views=1, map_detail="coarse")
    probs = scores.probs.reshape(rows, cols, len(labels))
    decisions = scores.decisions.reshape(rows, cols, len(labels))
    dark = dark_areas(cells)
    counts = module_counts(labels, decisions, dark)
    grade_, rule = grade(rules, counts)
    corners = np.array([[geometry.cell_corners(r, c) for c in range(cols)] for r in range(rows)])
    found = ModuleInspection(geometry, labels, probs, decisions, dark, corners, counts, grade_, rule, cells=cells)
    if want_map:
        flagged = found.flagged()
        if coarse:
            found.heatmaps, found.map_detail = {(r, c): scores.heatmaps[r * cols + c] for r, c in flagged}, "coarse"
        elif flagged:  # heatmaps only where they are drawn: they cost more than the probabilities
            maps = score_cells(model, [cells[r][c] for r, c in flagged], heatmaps=True, map_views=map_views).heatmaps
            found.heatmaps = dict(zip(flagged, maps, strict=True))
        found.map = draw_map(flat, geometry, labels, probs, decisions, found.heatmaps, title(name, found))
    found.seconds = time.perf_counter() - started
    return found


def title(name: str, found: ModuleInspection) -> str:
    rule = f"rule {found.rule.number}" if found.rule else "no rule"
    defects = " · ".join(f"{label} {found.counts[f'defect_{label}']}" for label in found.labels)
    return (f"{name}: grade {found.grade} ({rule}) · defect cells: {defects} · review "
            f"{found.counts['review_cells']} · dark {100 * found.counts['dark_area']:.1f} %")
