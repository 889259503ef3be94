"""Find a solar module in an EL photo, rectify it, find its cell grid, cut the cells.

Torch-free, on OpenCV:

    rows, cols = parse_grid("6x10")
    geometry, flat = find_module(image, rows, cols)  # ModuleGeometry, upright module in the image's dtype
    geometry = locate_module(image, rows, cols)      # the geometry alone
    flat = rectify(image, geometry)                  # warp again (another image of the same module)
    cells = cut_cells(flat, geometry)             # rows x cols lists of arrays
    geometry.cell_box(r, c)       # (x0, y0, x1, y1) of a cell in `flat`
    geometry.cell_corners(r, c)   # float [4, 2] TL, TR, BR, BL in the original image

`image` is 2-D gray uint8 or uint16; every threshold is relative to the
image's own levels, so a 16-bit camera using 0..4095 works as well as 0..65535.
Rows run top to bottom and columns left to right as the module appears in the
photo: a landscape 60-cell module is 6x10, portrait 10x6; a 144 half-cell module
is 6x24. Failures raise an ImageError subclass (NoModuleError, ModuleCutOffError,
GridMismatchError (elcell.pvmodules.cellgrid), ImageTooSmallError) with one sentence.

Method. The module is the bright active area on a dark frame and background.
On a copy about 800 px long, Otsu's threshold separates it; the convex hull of
its large bright parts is its outline, and where the hull's four longest sides
meet are its corners, so a dark corner cell or the cut corners of pseudo-square
cells do not move them. Each side is then refined at full resolution: cv2.remap
samples short profiles across it, an edge point is where a profile first rises
half-way from dark to bright, and the line through most of the points is the side.
getPerspectiveTransform maps the quad onto an upright rectangle as large as the
module is in the photo. Cell borders come from the dark gaps (elcell.pvmodules.cellgrid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

from elcell.errors import DataError, ImageError
from elcell.pvmodules.cellgrid import GridMismatchError, check_fit, find_borders

_FIND_SIDE = 800  # long side (px) of the copy the module is found on
_MIN_CELL_PX = 16  # fewer pixels a cell and its gaps cannot be seen


class NoModuleError(ImageError):
    """No bright module on a dark surround: a blank, noise or unrelated image."""


class ModuleCutOffError(ImageError):
    """The module reaches the image border, so its outline is unknown."""


class ImageTooSmallError(ImageError):
    """Too few pixels for the requested grid."""


def parse_grid(text: str) -> tuple[int, int]:
    """'6x10' -> (6, 10): rows top to bottom, columns left to right."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise DataError(f"--grid {text}: use ROWSxCOLS, e.g. 6x10")
    return int(match[1]), int(match[2])


@dataclass
class ModuleGeometry:
    """Where a module and its cells are.

    corners: float [4, 2] (x, y) TL, TR, BR, BL of the module's active area in
    the original image. homography: 3x3, original -> rectified pixels. size:
    (width, height) of the rectified image. xs [cols + 1], ys [rows + 1]: cell
    borders in rectified pixels, the outer edges and between them the centres of
    the gaps, as found in the image. gaps_x, gaps_y: the width of the dark gap at
    each border (0 at the edges); a cell spans from gap to gap, so a wide gap (a
    half-cell module's split, a minimodule's spacing) belongs to neither cell.
    """

    corners: np.ndarray
    homography: np.ndarray
    size: tuple[int, int]
    xs: np.ndarray
    ys: np.ndarray
    gaps_x: np.ndarray | None = None
    gaps_y: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.ys) - 1

    @property
    def cols(self) -> int:
        return len(self.xs) - 1

    def _edges(self, r: int, c: int) -> tuple[float, float, float, float]:
        gx = np.zeros(len(self.xs)) if self.gaps_x is None else self.gaps_x
        gy = np.zeros(len(self.ys)) if self.gaps_y is None else self.gaps_y
        return (self.xs[c] + gx[c] / 2, self.ys[r] + gy[r] / 2,
                self.xs[c + 1] - gx[c + 1] / 2, self.ys[r + 1] - gy[r + 1] / 2)

    def cell_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell (r, c) in the rectified image, x1 and y1 exclusive."""
        x0, y0, x1, y1 = (int(round(v)) for v in self._edges(r, c))
        return x0, y0, x1, y1

    def cell_corners(self, r: int, c: int) -> np.ndarray:
        """float [4, 2] TL, TR, BR, BL of cell (r, c) in original-image pixels, to draw on the photo."""
        x0, y0, x1, y1 = self._edges(r, c)
        quad = np.array([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], dtype=np.float64)
        return cv2.perspectiveTransform(quad, np.linalg.inv(self.homography))[0]


def locate_module(image: np.ndarray, rows: int, cols: int) -> ModuleGeometry:
    """The module's outline, its homography to an upright rectangle, and its cell borders.
    Raises NoModuleError, ModuleCutOffError, GridMismatchError or ImageTooSmallError."""
    return find_module(image, rows, cols)[0]


def find_module(image: np.ndarray, rows: int, cols: int) -> tuple[ModuleGeometry, np.ndarray]:
    """`locate_module` and the rectified module it found the cell borders on, which
    is `rectify(image, geometry)`: callers that cut cells use it rather than warp
    a large photo a second time."""
    if rows == cols == 1:  # nothing to find: no gap tells a module from a cell
        raise GridMismatchError("a 1x1 grid is a single cell: score cells with elcell predict; give the module's "
                                "rows x columns, such as 6x10")
    image = _check_image(image, rows, cols)
    scale = min(1.0, _FIND_SIDE / max(image.shape))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    mask, contrast = _bright_mask(small)
    quad = _quad_from_mask(mask) / scale
    size = min(np.ptp(quad, axis=0))
    for reach in (0.04 * size, 0.02 * size, 0.01 * size):  # each pass samples nearer the true corners
        quad = _refine_edges(image, quad, contrast, reach=max(4.0 + 1.0 / scale, reach))
    h, w = image.shape
    if quad.min() < 1 or quad[:, 0].max() > w - 2 or quad[:, 1].max() > h - 2:
        raise ModuleCutOffError("the module is cut off at the image edge: a corner lies on or beyond the border")
    width = int(round(max(np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3]))))
    height = int(round(max(np.linalg.norm(quad[3] - quad[0]), np.linalg.norm(quad[2] - quad[1]))))
    if width < cols * _MIN_CELL_PX or height < rows * _MIN_CELL_PX:
        raise ImageTooSmallError(f"the module is only {width}x{height} pixels: too small for a {rows}x{cols} "
                                 f"grid (cells need at least {_MIN_CELL_PX} pixels a side)")
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    homography = cv2.getPerspectiveTransform(quad.astype(np.float32), target)
    geometry = ModuleGeometry(quad, homography, (width, height), np.empty(0), np.empty(0))
    flat = rectify(image, geometry)
    xs, ys = find_borders(flat, cols, rows, axis=1), find_borders(flat, rows, cols, axis=0)
    check_fit(xs, ys, rows, cols, min(width / cols, height / rows))
    geometry.xs, geometry.ys, geometry.gaps_x, geometry.gaps_y = xs.at, ys.at, xs.widths, ys.widths
    return geometry, flat


def rectify(image: np.ndarray, geometry: ModuleGeometry) -> np.ndarray:
    """The module warped upright, geometry.size, in the image's dtype (16-bit stays 16-bit)."""
    return cv2.warpPerspective(np.ascontiguousarray(image), geometry.homography, geometry.size,
                               flags=cv2.INTER_LINEAR)


def cut_cells(rectified: np.ndarray, geometry: ModuleGeometry) -> list[list[np.ndarray]]:
    """rows x cols cell images, each between its own gaps: views into `rectified`, its dtype."""
    if rectified.shape[:2] != (geometry.size[1], geometry.size[0]):
        raise ImageError(f"the rectified image is {rectified.shape[1]}x{rectified.shape[0]}, "
                         f"not the {geometry.size[0]}x{geometry.size[1]} of its geometry")
    boxes = [[geometry.cell_box(r, c) for c in range(geometry.cols)] for r in range(geometry.rows)]
    return [[rectified[y0:y1, x0:x1] for x0, y0, x1, y1 in row] for row in boxes]


def _check_image(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"need a 2-D gray uint8 or uint16 image, not {image.dtype} of shape {image.shape}")
    if rows < 1 or cols < 1:
        raise DataError(f"--grid {rows}x{cols}: need at least one row and one column")
    h, w = image.shape
    if w < max(32, cols * _MIN_CELL_PX) or h < max(32, rows * _MIN_CELL_PX):
        raise ImageTooSmallError(f"the image is only {w}x{h} pixels: too small to hold a {rows}x{cols} "
                                 f"grid (cells need at least {_MIN_CELL_PX} pixels a side)")
    return np.ascontiguousarray(image)


def _bright_mask(small: np.ndarray) -> tuple[np.ndarray, float]:
    """Otsu's mask of the bright area, and how much brighter it is than the rest (image
    units). Gray values are first stretched from their 0.5th to 99.5th percentile, so
    any bit depth and exposure looks alike."""
    lo, hi = (float(v) for v in np.percentile(small, (0.5, 99.5)))
    if hi - lo <= 2:  # a module filling under 0.5 % of the photo
        lo, hi = float(small.min()), float(small.max())
    if hi - lo <= 2:
        raise NoModuleError("no module found: the image is blank (nearly all pixels have one value)")
    gray = np.clip((small.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # specks
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))  # thin gaps
    dark, bright = cv2.mean(gray, mask=255 - mask)[0], cv2.mean(gray, mask=mask)[0]
    return mask, (bright - dark) * (hi - lo) / 255.0


def _quad_from_mask(mask: np.ndarray) -> np.ndarray:
    """TL, TR, BR, BL corners (finding-copy px) of the module's bright area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if count < 2 or areas.max() < 64:
        raise NoModuleError("no module found: no bright area stands out from the background")
    big = _select(labels, areas >= 0.2 * areas.max())
    hull = cv2.convexHull(np.concatenate(cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]))
    fill = cv2.countNonZero(big) / max(cv2.contourArea(hull), 1.0)
    if fill < 0.68:  # noise makes blobs all over the image, filling up to 60 % of their hull
        raise NoModuleError("no module found: the bright pixels form no solid four-sided area "
                            f"(they fill {fill:.0%} of their outline; noise or an unrelated image?)")
    # Cells (or rows of them) parted by their gaps are joined; specks are left out.
    side = 2 * int(0.01 * max(mask.shape)) + 1
    joined = cv2.morphologyEx(_select(labels, areas >= 0.01 * areas.max()), cv2.MORPH_CLOSE,
                              np.ones((side, side), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    parts = _select(labels, areas >= 0.2 * areas.max())  # a minimodule's cells may stay apart
    hull = cv2.convexHull(np.concatenate(cv2.findContours(parts, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]))
    points = hull.reshape(-1, 2)
    if points.min() <= 0 or points[:, 0].max() >= mask.shape[1] - 1 or points[:, 1].max() >= mask.shape[0] - 1:
        raise ModuleCutOffError("the module is cut off at the image edge: its bright area touches the border")
    return _four_sides(points.astype(np.float32))


def _select(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """uint8 mask (255) of the components for which `keep` ([count - 1] bool) is set."""
    return np.concatenate([[0], np.where(keep, 255, 0)]).astype(np.uint8)[labels]


def _four_sides(hull: np.ndarray) -> np.ndarray:
    """Where the simplified hull's four longest sides meet, TL, TR, BR, BL."""
    perimeter = cv2.arcLength(hull, True)
    poly = cv2.approxPolyDP(hull, 0.01 * perimeter, True).reshape(-1, 2).astype(np.float64)
    sides = np.roll(poly, -1, axis=0) - poly
    lengths = np.hypot(sides[:, 0], sides[:, 1])
    longest = np.sort(np.argsort(lengths)[-4:])
    if len(poly) < 4 or lengths[longest].sum() < 0.6 * perimeter:
        raise NoModuleError("no module found: the bright area has no four straight sides")
    corners = np.array([_intersect(poly[i], sides[i], poly[j], sides[j])
                        for i, j in zip(longest, np.roll(longest, -1))])
    centre = corners.mean(axis=0)
    corners = corners[np.argsort(np.arctan2(*(corners - centre).T[::-1]))]  # clockwise on screen
    return np.roll(corners, -int(np.argmin(corners.sum(axis=1))), axis=0)  # TL has the least x + y


def _intersect(p: np.ndarray, u: np.ndarray, q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The point where line p + s*u meets line q + t*v."""
    det = v[0] * u[1] - u[0] * v[1]
    if abs(det) < 0.05 * np.hypot(*u) * np.hypot(*v):  # sides within 3 degrees of parallel
        raise NoModuleError("no module found: the bright area has no four straight sides")
    return p + u * (v[0] * (q[1] - p[1]) - v[1] * (q[0] - p[0])) / det


def _refine_edges(image: np.ndarray, quad: np.ndarray, contrast: float, reach: float) -> np.ndarray:
    """The quad with each side moved onto the dark-to-bright edge, at full resolution: at
    48 places a side, cv2.remap samples a profile 5 px wide from `reach` px outside to
    `reach` px inside, whose edge point is where it first rises half-way."""
    n, band = 48, 5
    steps = np.arange(-reach, reach + 1.0)
    t = np.linspace(0.04, 0.96, n)
    a, b = quad, np.roll(quad, -1, axis=0)
    along = (b - a) / np.linalg.norm(b - a, axis=1, keepdims=True)
    normal = np.stack([-along[:, 1], along[:, 0]], axis=1)  # inward, as the corners run clockwise
    base = a[:, None, :] + t[None, :, None] * (b - a)[:, None, :]  # [4, n, 2]
    pts = (base[:, :, None, None, :] + (np.arange(band) - band // 2)[:, None, None] * along[:, None, None, None, :]
           + steps[:, None] * normal[:, None, None, None, :])  # [4, n, band, L, 2]
    pts = pts.reshape(-1, len(steps), 2).astype(np.float32)
    samples = cv2.remap(image, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    profiles = samples.astype(np.float32).reshape(4 * n, band, len(steps)).mean(axis=1)
    cross, ok = _crossings(profiles, contrast)
    cross, ok = cross.reshape(4, n) + steps[0], ok.reshape(4, n)
    lines = []
    for k in range(4):
        tolerance = max(1.5, 0.002 * np.linalg.norm(b[k] - a[k]))  # lens distortion bows long sides
        start, slope = _edge_line(t[ok[k]], cross[k][ok[k]], tolerance) if ok[k].sum() >= 8 else (0.0, 0.0)
        lines.append((a[k] + start * normal[k], b[k] - a[k] + slope * normal[k]))
    return np.array([_intersect(*lines[k - 1], *lines[k]) for k in range(4)])


def _crossings(profiles: np.ndarray, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel index where each profile [P, L] first rises half-way from its dark to its
    bright end, and whether it has both (not a gap met end-on, not a dark cell)."""
    quarter = max(2, profiles.shape[1] // 4)
    dark = np.median(profiles[:, :quarter], axis=1)
    bright = np.median(profiles[:, -quarter:], axis=1)
    half = (dark + bright) / 2
    first = np.argmax(profiles >= half[:, None], axis=1)
    ok = (bright - dark >= 0.4 * contrast) & (first > 0)
    rows = np.arange(len(profiles))
    before, after = profiles[rows, np.maximum(first - 1, 0)], profiles[rows, first]
    return first - 1 + np.clip((half - before) / np.maximum(after - before, 1e-6), 0, 1), ok


def _edge_line(t: np.ndarray, y: np.ndarray, tolerance: float) -> tuple[float, float]:
    """(intercept, slope) of the line through most edge offsets y (positive inward) over t.

    Lines through each pair of points are scored by how many points lie within
    `tolerance` px (RANSAC, exhaustively): gaps met end-on, cut corners and dark
    cell rims scatter points inward, while the edge is one straight line. Of the
    lines nearly as well supported as the best, the outermost is refitted, so
    the outline holds every cell when a minimodule's cells are not quite in line.
    """
    i, j = np.triu_indices(len(t), 1)
    slope = (y[j] - y[i]) / (t[j] - t[i])
    intercept = y[i] - slope * t[i]
    near = np.abs(y[None, :] - intercept[:, None] - slope[:, None] * t[None, :]) <= tolerance
    support = near.sum(axis=1)
    good = np.flatnonzero(support >= 0.8 * support.max())
    keep = near[good[np.argmin(intercept[good] + slope[good] / 2)]]
    slope, intercept = np.polyfit(t[keep], y[keep], 1)
    return float(intercept), float(slope)
