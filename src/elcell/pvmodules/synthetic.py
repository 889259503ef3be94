"""Synthetic EL module photos built from real cell images, with the truth of where each cell is.

    image, truth = assemble_module(cells, 6, 10, rotation_deg=4, perspective=0.04,
                                   illumination=0.3, noise=0.03, seed=1)
    truth.corners[r, c]   # float [4, 2] TL, TR, BR, BL of cell (r, c) in `image` pixels
    truth.centres[r, c]   # float [2] its centre (x, y)

The cells are laid out row by row in a grid with dark gaps, inside a dark
border (backsheet and frame) on a darker background; the module is then turned,
warped by a random perspective (a hand-held or tripod camera), lit unevenly (a
smooth brightness ramp), given sensor noise, and stored as 8- or 16-bit gray.
Tests and benchmarks use it to check module location on real cell pixels, and a
user can use it to check a station's settings against a known answer. The same
arguments and seed always give the same image.

Pixel coordinates follow OpenCV: pixel (x, y) has its centre at (x, y), so a
cell filling flat pixels x0..x1-1 spans x0 - 0.5 to x1 - 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from elcell.errors import DataError

_GAP_LEVEL = 0.3  # gaps between cells, as a fraction of the cells' median brightness
_BACKSHEET_LEVEL = 0.25  # the band of backsheet between the outer cells and the frame
_FRAME_LEVEL = 0.12  # the aluminium frame
_BACKGROUND_LEVEL = 0.05  # the room around the module


@dataclass
class ModuleTruth:
    """Where the cells of an assembled module are, in the output image's pixels.

    corners: float [rows, cols, 4, 2] TL, TR, BR, BL (x, y) of each cell.
    centres: float [rows, cols, 2] each cell's centre (the image of the flat
    cell's centre, not the mean of its corners). module: float [4, 2] the
    corners of the cells' outline. homography: 3x3 flat layout -> output image.
    """

    corners: np.ndarray
    centres: np.ndarray
    module: np.ndarray
    homography: np.ndarray


def assemble_module(
    cells: Sequence[np.ndarray],
    rows: int,
    cols: int,
    *,
    gap: float = 0.02,
    frame: float = 0.15,
    rotation_deg: float = 0.0,
    perspective: float = 0.0,
    illumination: float = 0.0,
    noise: float = 0.0,
    bit_depth: int = 8,
    split_gap: bool | float = False,
    cell_size: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, ModuleTruth]:
    """A module photo from real cells, and where each cell ended up.

    cells: 2-D gray uint8 or uint16 images, used row by row and repeated if
    fewer than the grid needs. gap, frame: the width of the gaps between cells
    and of the border around them, as fractions of a cell's height.
    rotation_deg: turns the module counter-clockwise on screen. perspective: each
    module corner moves by up to this fraction of the module's width and height,
    at random. illumination: brightness falls by up to this fraction along a
    random direction. noise: Gaussian noise with this standard deviation, as a
    fraction of the cells' median brightness. bit_depth: 8 gives uint8, 9..16
    give uint16 holding 0..2**bit_depth - 1. split_gap: a half-cell layout with
    a wider gap between columns cols/2 and cols/2 + 1 (True: four gaps wide; a
    number: its width as a fraction of a cell's height); square cells are then
    cut into left and right halves. cell_size: cells are resized to this height
    in pixels (default: the first cell's height).
    """
    if rows < 1 or cols < 1 or not cells or not 8 <= bit_depth <= 16:
        raise DataError("assemble_module needs rows and cols >= 1, at least one cell, and bit_depth 8..16")
    rng = np.random.default_rng(seed)
    split = 4 * gap if split_gap is True else float(split_gap or 0.0)
    tiles = _tiles(cells, rows * cols, halve=split > 0, height=cell_size)
    level = float(np.median([np.median(t) for t in tiles[:16]]))
    flat, boxes, outline = _layout(tiles, level, rows, cols, gap, frame, split)
    warp, size = _camera(flat.shape, rotation_deg, perspective, rng)
    image = cv2.warpPerspective(flat, warp, size, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=_BACKGROUND_LEVEL)
    image *= _ramp(size, illumination, rng)
    if noise > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    image = _store(image, level, bit_depth)
    return image, _truth(boxes, outline, warp, rows, cols)


def _as_float(cell: np.ndarray) -> np.ndarray:
    """A cell as float32 in [0, 1] of its dtype's range."""
    cell = np.asarray(cell)
    if cell.ndim != 2 or cell.dtype not in (np.uint8, np.uint16):
        raise DataError(f"cells must be 2-D gray uint8 or uint16, not {cell.dtype} of shape {cell.shape}")
    return cell.astype(np.float32) / float(np.iinfo(cell.dtype).max)


def _tiles(cells: Sequence[np.ndarray], count: int, halve: bool, height: int | None) -> list[np.ndarray]:
    """`count` float cell images of one size; square cells cut in half for a half-cell layout."""
    tiles: list[np.ndarray] = []
    index = 0
    while len(tiles) < count:
        cell = _as_float(cells[index % len(cells)])
        index += 1
        h, w = cell.shape
        if halve and w > 0.75 * h:
            tiles += [cell[:, : w // 2], cell[:, w // 2:]]
        else:
            tiles.append(cell)
    tiles = tiles[:count]
    h = height or tiles[0].shape[0]
    w = max(1, round(h * tiles[0].shape[1] / tiles[0].shape[0]))
    return [cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA) if t.shape != (h, w) else t for t in tiles]


def _layout(tiles: list[np.ndarray], level: float, rows: int, cols: int, gap: float, frame: float,
            split: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat module (float32, cells' median brightness 1), each cell's box [rows, cols, 4]
    (x0, y0, x1, y1) and the cells' outline [4, 2], in flat pixel coordinates.

    `level` is the cells' median brightness, the unit of the gap, frame and background levels.
    """
    h, w = tiles[0].shape
    gap_px = max(1, round(gap * h)) if gap > 0 else 0
    split_px = round(split * h) if split > 0 else gap_px
    border = max(2, round(frame * h))
    xs = np.array([c * (w + gap_px) + (split_px - gap_px) * (c >= (cols + 1) // 2 and split > 0)
                   for c in range(cols)]) + border
    ys = np.arange(rows) * (h + gap_px) + border
    width, height = xs[-1] + w + border, ys[-1] + h + border
    flat = np.full((height, width), _FRAME_LEVEL * level, np.float32)
    inner = border // 2
    flat[inner:height - inner, inner:width - inner] = _BACKSHEET_LEVEL * level
    flat[border:height - border, border:width - border] = _GAP_LEVEL * level
    boxes = np.zeros((rows, cols, 4))
    for r in range(rows):
        for c in range(cols):
            flat[ys[r]:ys[r] + h, xs[c]:xs[c] + w] = tiles[r * cols + c]
            boxes[r, c] = xs[c] - 0.5, ys[r] - 0.5, xs[c] + w - 0.5, ys[r] + h - 0.5
    outline = np.array([[border, border], [width - border, border],
                        [width - border, height - border], [border, height - border]], float) - 0.5
    flat /= level  # cells' median brightness is 1 from here on
    return flat, boxes, outline


def _camera(shape: tuple[int, int], rotation_deg: float, perspective: float,
            rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Homography flat -> photo (turn, random corner shifts, a margin) and the photo's (width, height)."""
    height, width = shape
    src = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64) - 0.5
    centre = src.mean(axis=0)
    turn = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]])
    dst = (src - centre) @ rot.T
    dst += rng.uniform(-perspective, perspective, (4, 2)) * [width, height]
    margin = 0.06 * max(width, height)
    dst -= dst.min(axis=0) - margin
    size = tuple(int(np.ceil(v + margin)) for v in dst.max(axis=0))
    warp = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))
    return warp.astype(np.float64), (size[0], size[1])


def _ramp(size: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """float32 [h, w] brightness factors: 1 on one side, 1 - strength on the other, linear in between."""
    width, height = size
    if strength <= 0:
        return np.ones((1, 1), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :] * np.float32(np.cos(angle))
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None] * np.float32(np.sin(angle))
    along = (x + y) / np.float32(0.5 * (abs(np.cos(angle)) + abs(np.sin(angle))))  # -1..1
    return np.float32(1.0) - np.float32(strength) * (along + np.float32(1.0)) / np.float32(2.0)


def _store(image: np.ndarray, level: float, bit_depth: int) -> np.ndarray:
    """Brightness 1 (the cells' median) back to the cells' own level, as uint8 or uint16 of bit_depth."""
    top = 2**bit_depth - 1
    scaled = image * np.float32(level * top)
    return np.clip(np.rint(scaled), 0, top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _truth(boxes: np.ndarray, outline: np.ndarray, warp: np.ndarray, rows: int, cols: int) -> ModuleTruth:
    x0, y0, x1, y1 = (boxes[..., k] for k in range(4))
    flat = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1),
                     np.stack([x1, y1], -1), np.stack([x0, y1], -1)], axis=2)  # [rows, cols, 4, 2]
    centres = np.stack([(x0 + x1) / 2, (y0 + y1) / 2], -1)
    corners = cv2.perspectiveTransform(flat.reshape(1, -1, 2), warp).reshape(rows, cols, 4, 2)
    centres = cv2.perspectiveTransform(centres.reshape(1, -1, 2), warp).reshape(rows, cols, 2)
    module = cv2.perspectiveTransform(outline.reshape(1, -1, 2), warp).reshape(4, 2)
    return ModuleTruth(corners, centres, module, warp)
