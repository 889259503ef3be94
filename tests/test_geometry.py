"""Module location, rectification and cell cutting on real pixels: modules assembled
from real ELPV cells (where each cell is, is known) and two real module photos
(gap positions measured by hand)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from elcell.errors import DataError, ImageError
from elcell.pvmodules.cellgrid import GridMismatchError
from elcell.pvmodules.geometry import (
    ImageTooSmallError,
    ModuleCutOffError,
    NoModuleError,
    cut_cells,
    find_module,
    locate_module,
    parse_grid,
    rectify,
)
from elcell.pvmodules.synthetic import assemble_module

MODULES = Path(__file__).parent / "data" / "modules"

# Gap positions in the original photos, measured by hand: the half-way crossings
# of intensity profiles 31 px wide across each gap, centre of the dark run,
# checked on zoomed crops. Outer values are the edges of the outer cells.
# poly: x of each vertical border at y = 860 (inside cell row 3), and y of each
# horizontal border at x = 1430 (inside column 5; its busbars are 34 px from the gaps).
POLY_X_AT_Y860 = [91.9, 329.0, 570.5, 813.5, 1058.5, 1304.0, 1550.5, 1797.0, 2043.0, 2288.5, 2531.0]
POLY_Y_AT_X1430 = [73.2, 317.5, 565.5, 812.0, 1057.0, 1299.5, 1536.9]
# mono minimodule: its four cells are not quite in line, so each border is
# measured across both cells it bounds; the gaps are about 150 px wide.
MONO_X_AT_Y = {520: [107.3, 1015.0, 1924.9], 1450: [110.5, 1018.0, 1931.8]}
MONO_Y_AT_X = {560: [117.0, 1007.5, 1905.6], 1500: [99.6, 997.5, 1904.2]}


def gray(name: str) -> np.ndarray:
    return cv2.imread(str(MODULES / name), cv2.IMREAD_GRAYSCALE)


@pytest.fixture(scope="module")
def poly():
    return gray("poly-6x10-A1.jpg")


@pytest.fixture(scope="module")
def mono():
    return gray("mono-2x2-MMEL1.jpg")


@pytest.fixture(scope="module")
def cells(elpv):
    """80 real ELPV cells, mono and poly, a third of them defective (cracks, dark areas)."""
    rng = np.random.default_rng(7)
    defective = np.flatnonzero(elpv.targets[:, 0] >= 0.5)
    intact = np.flatnonzero(elpv.targets[:, 0] < 0.5)
    index = rng.permutation(np.concatenate([rng.choice(defective, 27, replace=False),
                                            rng.choice(intact, 53, replace=False)]))
    return [cv2.imread(str(elpv.paths[i]), cv2.IMREAD_GRAYSCALE) for i in index]


def border_x_at(geometry, x: float, y: float) -> float:
    """x in the original image where the rectified vertical line at `x` crosses height y."""
    ends = cv2.perspectiveTransform(np.array([[[x, 0.0], [x, geometry.size[1]]]]),
                                    np.linalg.inv(geometry.homography))[0]
    return float(np.interp(y, ends[:, 1], ends[:, 0]))


def border_y_at(geometry, y: float, x: float) -> float:
    ends = cv2.perspectiveTransform(np.array([[[0.0, y], [geometry.size[0], y]]]),
                                    np.linalg.inv(geometry.homography))[0]
    return float(np.interp(x, ends[:, 0], ends[:, 1]))


def centre_errors(geometry, truth) -> np.ndarray:
    """[rows, cols] distance of each found cell centre from the truth, in cell widths."""
    rows, cols = truth.centres.shape[:2]
    width = np.linalg.norm(truth.corners[:, :, 1] - truth.corners[:, :, 0], axis=-1)
    found = np.array([[geometry.cell_corners(r, c).mean(axis=0) for c in range(cols)] for r in range(rows)])
    return np.linalg.norm(found - truth.centres, axis=-1) / width


SYNTHETIC = {
    "6x10 plain": dict(rows=6, cols=10),
    "6x10 turned 10 deg, perspective, uneven light, noise": dict(
        rows=6, cols=10, rotation_deg=10.0, perspective=0.04, illumination=0.4, noise=0.04, seed=3),
    "6x10 turned -8 deg, 16-bit": dict(
        rows=6, cols=10, rotation_deg=-8.0, perspective=0.03, illumination=0.3, noise=0.03,
        bit_depth=16, seed=4),
    "10x6 portrait, 12-bit": dict(
        rows=10, cols=6, rotation_deg=4.0, perspective=0.04, illumination=0.5, noise=0.02,
        bit_depth=12, gap=0.03, seed=5),
    "6x24 half cells, split gap": dict(
        rows=6, cols=24, split_gap=True, rotation_deg=-6.0, perspective=0.03, illumination=0.4,
        noise=0.03, cell_size=140, seed=6),
    # an evenly spaced grid would be off by a third of a cell next to this split
    "6x24 half cells, split gap 0.3 cells wide": dict(
        rows=6, cols=24, split_gap=0.3, rotation_deg=2.0, perspective=0.02, illumination=0.2,
        noise=0.02, cell_size=140, seed=9),
}


@pytest.mark.parametrize("case", SYNTHETIC, ids=list(SYNTHETIC))
def test_every_cell_of_an_assembled_module_is_found(cells, case):
    options = {"cell_size": 110, **SYNTHETIC[case]}
    rows, cols = options.pop("rows"), options.pop("cols")
    image, truth = assemble_module(cells, rows, cols, **options)
    geometry = locate_module(image, rows, cols)
    assert (geometry.rows, geometry.cols) == (rows, cols)
    errors = centre_errors(geometry, truth)
    assert errors.max() < 0.05, f"worst cell centre off by {errors.max():.1%} of a cell width"
    # the outline is the cells' outline, to a few pixels
    assert np.abs(geometry.corners - truth.module).max() < 0.05 * options["cell_size"]


def test_the_grid_of_the_real_poly_module_is_where_its_gaps_are(poly):
    geometry = locate_module(poly, 6, 10)
    cell_width = (POLY_X_AT_Y860[-1] - POLY_X_AT_Y860[0]) / 10
    found_x = [border_x_at(geometry, x, 860) for x in geometry.xs]
    found_y = [border_y_at(geometry, y, 1430) for y in geometry.ys]
    assert np.abs(np.subtract(found_x, POLY_X_AT_Y860)).max() < 0.02 * cell_width
    assert np.abs(np.subtract(found_y, POLY_Y_AT_X1430)).max() < 0.02 * cell_width
    # slight perspective: the rectified module is as large as in the photo, not shrunk
    assert geometry.size[0] > 0.98 * (POLY_X_AT_Y860[-1] - POLY_X_AT_Y860[0])


@pytest.mark.parametrize("angle", [-9.0, 6.0])
def test_the_real_poly_module_turned_and_tilted_is_found(poly, angle):
    """The real photo turned and seen at a slant; the measured gaps go along with it."""
    h, w = poly.shape
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    turned = cv2.transform(corners[None], cv2.getRotationMatrix2D((w / 2, h / 2), angle, 0.8))[0]
    slant = cv2.getPerspectiveTransform(corners, turned + np.float32([[40, 30], [-50, 10], [20, -40], [-30, 0]]))
    image = cv2.warpPerspective(poly, slant, (w, h), borderValue=int(np.percentile(poly, 1)))
    geometry = locate_module(image, 6, 10)
    to_flat = geometry.homography @ slant
    xs = cv2.perspectiveTransform(np.array([[[x, 860.0] for x in POLY_X_AT_Y860]]), to_flat)[0][:, 0]
    ys = cv2.perspectiveTransform(np.array([[[1430.0, y] for y in POLY_Y_AT_X1430]]), to_flat)[0][:, 1]
    cell_width = geometry.size[0] / 10
    assert np.abs(xs - geometry.xs).max() < 0.02 * cell_width
    assert np.abs(ys - geometry.ys).max() < 0.02 * cell_width


def test_the_grid_of_the_real_mono_minimodule_is_where_its_gaps_are(mono):
    geometry = locate_module(mono, 2, 2)
    cell_width = (MONO_X_AT_Y[520][-1] - MONO_X_AT_Y[520][0]) / 2
    for y, truth in MONO_X_AT_Y.items():
        found = [border_x_at(geometry, x, y) for x in geometry.xs]
        assert np.abs(np.subtract(found, truth)).max() < 0.02 * cell_width, (y, found)
    for x, truth in MONO_Y_AT_X.items():
        found = [border_y_at(geometry, y, x) for y in geometry.ys]
        assert np.abs(np.subtract(found, truth)).max() < 0.02 * cell_width, (x, found)
    # the 150 px gaps belong to no cell: each cell is cut between them
    flat = rectify(mono, geometry)
    for row in cut_cells(flat, geometry):
        for cell in row:
            assert 0.8 * cell_width < cell.shape[1] < 0.95 * cell_width
            edge = np.concatenate([cell[:, :5].ravel(), cell[:, -5:].ravel()])
            assert np.median(edge) > 0.6 * np.median(cell)  # no dark gap inside the cut


def count_warps(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image cv2.warpPerspective is asked to make, from here on."""
    sizes, real = [], cv2.warpPerspective

    def counted(image, matrix, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real(image, matrix, size, *args, **kwargs)

    monkeypatch.setattr(cv2, "warpPerspective", counted)
    return sizes


def test_a_module_photo_is_warped_once_for_its_grid_and_its_cells(mono, monkeypatch):
    from elcell.pvmodules.segment import segment_module

    geometry, flat = find_module(mono, 2, 2)
    assert np.array_equal(flat, rectify(mono, geometry))  # the very image the cells are cut from
    sizes = count_warps(monkeypatch)
    cut = segment_module(mono, 2, 2)
    assert sizes == [geometry.size]  # one warp of the photo, not one to find the grid and one to cut
    assert all(np.array_equal(a, b) for ra, rb in zip(cut, cut_cells(flat, geometry), strict=True)
               for a, b in zip(ra, rb, strict=True))


def test_16_bit_in_gives_16_bit_cells_out(cells):
    image, truth = assemble_module(cells, 6, 10, cell_size=80, bit_depth=16, rotation_deg=3.0,
                                   perspective=0.02, seed=8)
    assert image.dtype == np.uint16 and image.max() > 4096
    geometry = locate_module(image, 6, 10)
    flat = rectify(image, geometry)
    assert flat.dtype == np.uint16 and flat.shape == (geometry.size[1], geometry.size[0])
    cut = cut_cells(flat, geometry)
    assert len(cut) == 6 and all(len(row) == 10 for row in cut)
    for r, row in enumerate(cut):
        for c, cell in enumerate(row):
            x0, y0, x1, y1 = geometry.cell_box(r, c)
            assert cell.dtype == np.uint16 and cell.shape == (y1 - y0, x1 - x0)
            assert 0.9 * 80 < cell.shape[0] < 1.1 * 80 and 0.9 * 80 < cell.shape[1] < 1.1 * 80
            assert cell.max() > 255  # the 16-bit range is kept, not squeezed into 0..255
    # the same module in 8 bits is found in the same place
    eight = locate_module((image // 257).astype(np.uint8), 6, 10)
    assert np.abs(eight.corners - geometry.corners).max() < 1.0


BAD = {
    "black": (lambda poly, mono: np.zeros((1200, 1800), np.uint8), 6, 10,
              NoModuleError, "no module found: the image is blank"),
    "black 16-bit": (lambda poly, mono: np.full((1200, 1800), 300, np.uint16), 6, 10,
                     NoModuleError, "no module found: the image is blank"),
    "noise": (lambda poly, mono: np.random.default_rng(0).integers(0, 256, (1200, 1800), dtype=np.uint8),
              6, 10, NoModuleError, "no solid four-sided area"),
    "cut off at the left": (lambda poly, mono: poly[:, 600:], 6, 10, ModuleCutOffError, "cut off at the image edge"),
    "cut off at the bottom": (lambda poly, mono: mono[:1500], 2, 2, ModuleCutOffError, "cut off at the image edge"),
    "6x10 of the 2x2 minimodule": (lambda poly, mono: mono, 6, 10, GridMismatchError,
                                   "of the 9 column borders of a 6x10 grid"),
    "2x4 of the 2x2 minimodule": (lambda poly, mono: mono, 2, 4, GridMismatchError,
                                  "runs through the middle of cells of a 2x4 grid"),
    "5x10 of the 6x10 module (busbars are no gaps)": (lambda poly, mono: poly, 5, 10, GridMismatchError,
                                                       "horizontal gap runs through the middle of cells"),
    # a lone row or column: the other axis' cells give the scale its gaps would show at
    "1x10 of the 6x10 module": (lambda poly, mono: poly, 1, 10, GridMismatchError,
                                "horizontal gap runs through the middle of cells of a 1x10 grid"),
    "6x1 of the 6x10 module": (lambda poly, mono: poly, 6, 1, GridMismatchError,
                               "vertical gap runs through the middle of cells of a 6x1 grid"),
    "1x2 of the 2x2 minimodule": (lambda poly, mono: mono, 1, 2, GridMismatchError, "horizontal gap runs"),
    "1x1 of the 6x10 module": (lambda poly, mono: poly, 1, 1, GridMismatchError, "a 1x1 grid is a single cell"),
    "tiny": (lambda poly, mono: np.zeros((20, 30), np.uint8), 6, 10, ImageTooSmallError,
             "30x20 pixels: too small to hold a 6x10 grid"),
    "shrunk module": (lambda poly, mono: cv2.resize(poly, (130, 82), interpolation=cv2.INTER_AREA), 6, 10,
                      ImageTooSmallError, "too small"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_refused_in_one_sentence(poly, mono, case):
    make, rows, cols, kind, words = BAD[case]
    with pytest.raises(kind) as caught:
        locate_module(make(poly, mono), rows, cols)
    assert isinstance(caught.value, ImageError)
    message = str(caught.value)
    assert words in message and "\n" not in message and message.count(". ") == 0


def test_not_an_image_of_gray_levels_is_refused():
    with pytest.raises(ImageError, match="2-D gray uint8 or uint16"):
        locate_module(np.zeros((500, 500, 3), np.uint8), 2, 2)
    with pytest.raises(ImageError, match="2-D gray uint8 or uint16"):
        locate_module(np.zeros((500, 500), np.float32), 2, 2)


def test_parse_grid():
    assert parse_grid("6x10") == (6, 10)
    assert parse_grid(" 6X24 ") == (6, 24)
    for bad in ("6by10", "6x", "x10", "0x10", "6x10x2", ""):
        with pytest.raises(DataError, match=f"--grid {bad}: use ROWSxCOLS, e.g. 6x10"):
            parse_grid(bad)


def test_assembly_is_deterministic_and_its_truth_fits_the_picture(cells):
    options = dict(cell_size=60, gap=0.1, rotation_deg=5, perspective=0.03, illumination=0.3, noise=0.02)
    image, truth = assemble_module(cells, 2, 3, seed=11, **options)
    again, _ = assemble_module(cells, 2, 3, seed=11, **options)
    other, _ = assemble_module(cells, 2, 3, seed=12, **options)
    assert np.array_equal(image, again) and not np.array_equal(image, other)
    assert truth.corners.shape == (2, 3, 4, 2) and truth.centres.shape == (2, 3, 2)
    # inside the truth's cell quads the picture is bright, between them (the gaps) dark
    on_cells = np.zeros(image.shape, np.uint8)
    cv2.fillPoly(on_cells, [np.round(q).astype(np.int32) for q in truth.corners.reshape(-1, 4, 2)], 255)
    in_module = np.zeros(image.shape, np.uint8)
    cv2.fillPoly(in_module, [np.round(truth.module).astype(np.int32)], 255)
    gaps = cv2.erode(in_module, np.ones((3, 3), np.uint8)) & ~cv2.dilate(on_cells, np.ones((3, 3), np.uint8))
    assert gaps.sum() > 0 and image[on_cells > 0].mean() > 2 * image[gaps > 0].mean()
    centres_inside = [cv2.pointPolygonTest(q.astype(np.float32), tuple(map(float, c)), False) > 0
                      for q, c in zip(truth.corners.reshape(-1, 4, 2), truth.centres.reshape(-1, 2))]
    assert all(centres_inside)
