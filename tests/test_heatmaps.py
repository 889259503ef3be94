"""Heatmaps as pictures: upsampling, the peak, boxes and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from elcell.infer.heatmaps import (
    _legend,
    colorize,
    heatmap_box,
    heatmap_peak,
    overlay_image,
    overlay_png,
    upsample_heatmap,
)


def test_upsampling_is_torchs_bilinear():
    import torch
    import torch.nn.functional as F

    heat = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    ours = upsample_heatmap(heat, (17, 40))
    theirs = F.interpolate(torch.from_numpy(heat)[None, None], size=(17, 40), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
    assert ours.shape == (17, 40)
    assert np.abs(ours - theirs).max() < 1e-5


def numpy_bilinear(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """The hand-written upsampling cv2.resize replaced: half-pixel centres, clamped borders."""
    def along(a: np.ndarray, n: int, axis: int) -> np.ndarray:
        m = a.shape[axis]
        pos = np.clip((np.arange(n, dtype=np.float64) + 0.5) * (m / n) - 0.5, 0, m - 1)
        lo = np.floor(pos).astype(np.intp)
        frac = np.expand_dims((pos - lo).astype(np.float32), 1 - axis)
        return np.take(a, lo, axis=axis) * (1 - frac) + np.take(a, np.minimum(lo + 1, m - 1), axis=axis) * frac
    return along(along(heat, height, 0), width, 1)


@pytest.mark.parametrize(("shape", "size"), [((3, 5), (17, 40)), ((4, 4), (300, 300)), ((19, 19), (256, 240)),
                                              ((8, 8), (64, 64)), ((2, 2), (5, 3)), ((10, 7), (4, 6))])
def test_upsampling_is_the_hand_written_bilinear_it_replaced(shape, size):
    heat = np.random.default_rng(sum(size)).random(shape).astype(np.float32)
    ours = upsample_heatmap(heat, size)
    assert ours.shape == size and ours.dtype == np.float32
    assert np.abs(ours - numpy_bilinear(heat, *size)).max() < 1e-6


def test_overlays_and_module_maps_share_one_colour_scale():
    from elcell.pvmodules.modulemap import _blend

    heat = np.ones((2, 2), dtype=np.float32)  # every pixel at the peak: the scale's hot end
    black = np.zeros((32, 32), dtype=np.uint8)
    overlay = cell_area(overlay_image(black, heat), 256)[128, 128]
    module_cell = np.zeros((32, 32, 3), dtype=np.uint8)
    _blend(module_cell, heat)  # BGR, drawn by OpenCV
    assert tuple(module_cell[16, 16, ::-1]) == tuple(overlay)
    assert tuple(colorize(np.array([1.0]))[0]) == (128, 0, 0)  # jet's hot end: dark red
    assert colorize(np.zeros((3, 4))).shape == (3, 4, 3)


def test_box_surrounds_the_hot_cell_in_image_pixels():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[1, 2] = 2.0  # feature cell covering rows 50..100, columns 50..75 of a 200x100 image
    box = heatmap_box(heat, (200, 100))
    assert box["peak"] == pytest.approx(2.0)
    assert box["peak_x"] == 62 and box["peak_y"] in (74, 75)  # the cell's centre
    assert 40 <= box["x"] < 62 < box["x"] + box["width"] <= 90
    assert 50 <= box["y"] < 75 < box["y"] + box["height"] <= 110
    assert heatmap_box(np.zeros((4, 4)), 64) is None


def test_box_takes_the_region_with_the_most_heat():
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[0, 0] = 1.0  # the single hottest cell
    heat[5:8, 4:8] = 0.8  # a larger region holding more heat in all
    box = heatmap_box(heat, 64, threshold=0.5)
    assert box["x"] >= 28 and box["y"] >= 36  # the large region, not the corner
    # the point named is the box's hottest, never outside it; the strength is the map's own peak
    assert box["x"] <= box["peak_x"] < box["x"] + box["width"] and box["y"] <= box["peak_y"] < box["y"] + box["height"]
    assert box["peak"] == pytest.approx(1.0)
    assert heatmap_box(heat, 64, threshold=0.9)["x"] == 0  # only the corner is that hot


def test_peak_of_a_border_plateau_is_its_centre():
    heat = upsample_heatmap(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), 96)
    # The right-hand cell is a plateau from x=80 to the edge: its centre, not its first pixel.
    assert heatmap_peak(heat) == (48, 88)


def cell_area(image: Image.Image, width: int) -> np.ndarray:
    """The cell part of an overlay: between the title band above and the legend below."""
    pixels = np.asarray(image).astype(int)
    band = max(18, pixels.shape[1] // 14)  # the title band's height
    return pixels[band:band + width]


def test_overlay_tints_hot_areas_and_leaves_cold_ones_gray():
    cell = np.full((64, 64), 100, dtype=np.uint8)
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[1, 1] = 3.0
    image = overlay_image(cell, heat, prob=0.87, label="crack")
    # a small cell is enlarged by a whole factor, each pixel a sharp square, with bands for text
    assert image.mode == "RGB" and image.size[0] == 256 and image.size[1] > 256
    pixels = cell_area(image, 256)
    assert tuple(pixels[128 + 64, 128 + 64]) != (100, 100, 100)  # the hot corner is coloured
    assert pixels[192, 192, 0] > 100  # jet's hot end is red
    assert tuple(pixels[100, 40]) == (100, 100, 100)  # a cold area shows the cell as it is
    png = overlay_png(cell, heat, 0.87, "crack")
    assert Image.open(io.BytesIO(png)).size == image.size


def test_overlay_is_drawn_on_the_cell_at_its_own_resolution_with_the_box():
    cell = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    heat = np.zeros((19, 19), dtype=np.float32)
    heat[3, 12] = 1.0  # one hot feature cell, far from the centre
    box = heatmap_box(heat, cell.shape)
    pixels = cell_area(overlay_image(cell, heat, 0.9, "crack", "defect", box), 300)
    cold = pixels[200:, :100]
    assert (cold[..., 0] == cell[200:, :100]).all()  # not resampled: the cell's own pixels, sharp
    assert (pixels[box["y"] + box["height"] // 2, box["x"] - 3:box["x"] + 3] == 255).all(axis=-1).any()  # box edge
    assert pixels[box["peak_y"], box["peak_x"], 0] != cell[box["peak_y"], box["peak_x"]]  # tinted at the peak


def test_an_ok_cell_gets_no_box_and_the_legend_text_clears_its_bar():
    cell = np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)
    heat = np.zeros((19, 19), dtype=np.float32)
    heat[3, 12] = 1.0
    box = heatmap_box(heat, cell.shape)
    with_box = cell_area(overlay_image(cell, heat, 0.9, "crack", "defect", box), 300)
    ok = cell_area(overlay_image(cell, heat, 0.1, "crack", "ok", box), 300)
    edge = (box["y"] + box["height"] // 2, box["x"])
    assert (with_box[edge] == 255).all() and not (ok[edge] == 255).all()
    for width in (64, 300, 1200):
        legend = np.asarray(_legend(width, max(9, max(18, width // 14) // 2))).astype(int)
        colour = legend.max(axis=-1) - legend.min(axis=-1) > 60  # the bar: saturated colours
        bar_rows, bar_cols = np.nonzero(colour)
        text = (legend.min(axis=-1) > 120) & ~colour  # white or light gray letters
        text_rows, text_cols = np.nonzero(text)
        beside = text_rows <= bar_rows.max()
        assert not ((text_cols[beside] >= bar_cols.min()) & (text_cols[beside] <= bar_cols.max())).any()
        below = text_rows[~beside]
        assert below.size and below.min() > bar_rows.max()  # the caption under the bar, not on it


def test_overlay_of_an_all_zero_heatmap_is_the_gray_cell():
    cell = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    image = overlay_image(cell, np.zeros((10, 10)), prob=0.01, label="inactive")
    assert image.size[0] == 300  # large cells keep their size
    middle = cell_area(image, 300)[100:200, 100:200]
    assert (middle[..., 0] == cell[100:200, 100:200]).all() and (middle[..., 1] == middle[..., 2]).all()
