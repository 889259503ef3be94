"""Module photos of the kinds a line meets, end to end through `elcell inspect`:
16-bit TIFFs (EL cameras write them), a half-cut 6x24 layout, and a photo
larger than any screen. Made from the real photos and cells the tests hold:
the real poly module (gaps measured by hand in test_geometry) and real ELPV
cells assembled into a module whose truth is known."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_geometry import POLY_X_AT_Y860

from elcell.cells.images import read_reduced
from elcell.cli import main
from elcell.infer.runtime import open_model
from elcell.pvmodules.inspect import decode_size
from elcell.pvmodules.modulemap import MAX_WIDTH
from elcell.pvmodules.synthetic import assemble_module

POLY = Path(__file__).parent / "data" / "modules" / "poly-6x10-A1.jpg"
CORNERS = ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


def inspect(model: Path, photo: Path, grid: str, out: Path, *extra: str) -> tuple[list[dict], dict]:
    assert main(["inspect", str(model), str(photo), "--grid", grid, "--out", str(out), *extra]) == 0
    modules = read_csv(out / "modules.csv")
    assert len(modules) == 1 and not modules[0]["error"] and modules[0]["grade"]
    return read_csv(out / "cells.csv"), modules[0]


def corners(row: dict[str, str]) -> np.ndarray:
    return np.array([float(row[k]) for k in CORNERS]).reshape(4, 2)


def assert_row4_on_measured_gaps(cells: list[dict[str, str]], scale: float) -> None:
    """Row 4 spans y = 860 of the original photo, where test_geometry gives each gap's x
    (measured by hand): each cell's left and right edges lie on them, within 5 % of a cell."""
    gaps = np.array(POLY_X_AT_Y860) * scale
    pitch = (gaps[-1] - gaps[0]) / 10
    for cell in (c for c in cells if c["row"] == "4"):
        col, quad = int(cell["col"]), corners(cell)
        assert abs(quad[[0, 3], 0].mean() - gaps[col - 1]) < 0.05 * pitch
        assert abs(quad[[1, 2], 0].mean() - gaps[col]) < 0.05 * pitch


def probs(cells: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(c["prob_crack"]), float(c["prob_inactive"])] for c in cells])


@pytest.fixture(scope="module")
def poly_8bit(tiny_onnx, tmp_path_factory) -> list[dict[str, str]]:
    """The real poly photo's pixels as an 8-bit PNG (read whole, as a JPEG may not be),
    inspected: the reference the other kinds are held to."""
    folder = tmp_path_factory.mktemp("poly8")
    cv2.imwrite(str(folder / "poly.png"), cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE))
    cells, _ = inspect(tiny_onnx, folder / "poly.png", "6x10", folder / "out", "--no-map")
    return cells


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_16_bit_tiff_is_cut_and_judged_as_its_8_bit_photo(tiny_onnx, poly_8bit, tmp_path, compression):
    """The poly photo as an EL camera's 16-bit TIFF (its gray values x 257, so that read
    back at the model's 16 bits they are the JPEG's): same grid, same probabilities."""
    gray = cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE)
    tiff = tmp_path / "poly-16bit.tif"
    Image.fromarray(gray.astype(np.uint16) * 257).save(tiff, compression=compression)
    with Image.open(tiff) as check:
        assert check.mode.startswith("I;16")  # really 16 bits on disk
    cells, module = inspect(tiny_onnx, tiff, "6x10", tmp_path / "out", "--report")
    assert len(cells) == 60
    assert_row4_on_measured_gaps(cells, 1.0)
    # 16-bit warps round differently from 8-bit ones, by a fraction of a grey level
    assert np.abs(probs(cells) - probs(poly_8bit)).max() < 0.02
    with Image.open(tmp_path / "out" / "maps" / "poly-16bit.png") as picture:
        shown = np.asarray(picture.convert("L"))
    assert shown.std() > 20  # stretched for display, not a black map of 16-bit values read as 8


def test_a_16_bit_tiff_of_a_12_bit_camera_needs_and_takes_its_bit_depth(tiny_onnx, tmp_path, capsys, monkeypatch):
    """A 12-bit camera's TIFF (0..4095): a model reading 16 bits warns that it keeps
    few grey levels, rather than silently judging near-black cells."""
    import elcell.cells.images

    monkeypatch.setattr(elcell.cells.images, "_warned_low_range", False)  # said once per process: maybe already
    gray = cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE)
    tiff = tmp_path / "poly-12bit.tif"
    cv2.imwrite(str(tiff), (gray.astype(np.uint16) * 16))
    cells, _ = inspect(tiny_onnx, tiff, "6x10", tmp_path / "out", "--no-map")
    assert len(cells) == 60
    assert_row4_on_measured_gaps(cells, 1.0)  # the geometry is relative to the photo's own levels
    err = capsys.readouterr().err
    assert "--bit-depth" in err and "poly-12bit cell 1,1: 16-bit image" in err  # the photo's cell, named


@pytest.mark.slow  # 144 half-cells judged and drawn; the fast tier's half-cells: test_inspect
def test_a_half_cut_module_of_real_cells_is_found_cell_by_cell(tiny_onnx, elpv, tmp_path):
    """144 half-cells (6x24, the wide split in the middle) cut from 72 real ELPV cells,
    turned, in perspective, unevenly lit, stored as a 16-bit PNG."""
    cells = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in elpv.paths[100:172]]
    image, truth = assemble_module(cells, 6, 24, split_gap=True, rotation_deg=2.5, perspective=0.02,
                                   illumination=0.2, noise=0.02, bit_depth=16, cell_size=200, seed=11)
    photo = tmp_path / "half-cut.png"
    cv2.imwrite(str(photo), image)
    found, module = inspect(tiny_onnx, photo, "6x24", tmp_path / "out")
    assert len(found) == 144 and module["grid"] == "6x24"
    width = np.linalg.norm(truth.corners[0, 0, 1] - truth.corners[0, 0, 0])
    for row in found:
        r, c = int(row["row"]) - 1, int(row["col"]) - 1
        assert np.linalg.norm(corners(row).mean(axis=0) - truth.centres[r, c]) < 0.05 * width
    with Image.open(tmp_path / "out" / "maps" / "half-cut.png") as picture:
        assert picture.width <= MAX_WIDTH


@pytest.mark.slow  # a 40-megapixel photo: decoded, found, warped and cut at full size
def test_a_photo_larger_than_the_screen_is_cut_where_its_gaps_are(tiny_onnx, poly_8bit, tmp_path):
    """The real poly photo upscaled to 8000 px wide (a 40 MP EL camera): the grid scales
    with it, the cells are judged as at the photo's own size, the map fits a screen."""
    gray = cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE)
    scale = 8000 / gray.shape[1]
    big = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    photo = tmp_path / "poly-8000.jpg"
    cv2.imwrite(str(photo), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    # decoded 8x smaller in the JPEG's DCT: still 1.5x the tiny model's 64 px per cell
    pixels, reduced = read_reduced(photo, decode_size(open_model(tiny_onnx), 6, 10))
    assert reduced == 8 and pixels.shape == (629, 1000)
    cells, _ = inspect(tiny_onnx, photo, "6x10", tmp_path / "out")
    assert len(cells) == 60
    assert_row4_on_measured_gaps(cells, scale)  # corners in the photo's own pixels
    # the cells are shrunk from ~780 instead of ~245 px to the model's input: the same cells, within a few %
    assert np.abs(probs(cells) - probs(poly_8bit)).mean() < 0.03
    with Image.open(tmp_path / "out" / "maps" / "poly-8000.png") as picture:
        assert picture.width <= MAX_WIDTH


def test_a_jpeg_is_decoded_smaller_only_as_far_as_asked(tmp_path):
    """JPEG's DCT gives 1/2, 1/4, 1/8 of the photo for a fraction of the decoding: the
    largest reduction that keeps the size asked for; a PNG is read whole."""
    gray = cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE)  # 2599 x 1633
    for at_least, scale in [((1000, 600), 2), ((600, 400), 4), ((2000, 600), 1)]:
        pixels, reduced = read_reduced(POLY, at_least)
        assert reduced == scale and pixels.shape[1] >= at_least[0]
        # the same photo, only smaller: within a few grey levels of an area-averaged copy
        area = cv2.resize(gray, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(pixels.astype(int) - area).mean() < 8
    cv2.imwrite(str(tmp_path / "poly.png"), gray)
    pixels, reduced = read_reduced(tmp_path / "poly.png", (600, 400))
    assert reduced == 1 and pixels.shape == gray.shape
