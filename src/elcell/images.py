"""Decoding EL cell images into the one form the model sees: uint8 gray, square.

Torch-free on purpose: the training cache and ONNX inference both call
`load_cell`, so a cell is decoded identically on the GPU box and on the
inspection PC.
"""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from elcell.errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# How a cell larger than the model's size is shrunk. A bilinear shrink of 300 px
# to 128 px averages a crack one pixel wide with its bright surroundings and
# keeps about a third of its depth; `min` first widens dark lines with a minimum
# filter about as wide as the shrink factor, so they keep most of it
# (docs/accuracy.md, E48). Bright areas do not change.
SHRINKS = ("bilinear", "min")
# How many bits of a 16-bit image hold the camera's values: 16 (0..65535), or
# fewer for 10- to 14-bit cameras that store 0..4095 (12) or 0..16383 (14).
# Read as 0..65535, 12-bit data would keep 17 grey levels.
BIT_DEPTHS = range(8, 17)


def _to_gray_uint8(image: Image.Image, path: Path, bit_depth: int) -> np.ndarray:
    mode = image.mode
    if mode in ("L", "P", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB").convert("L"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit cameras: scale by the camera's depth (65535 for 16 bits), not by
        # 255, which would saturate almost every pixel.
        pixels = np.asarray(image, dtype=np.float64)
        top, full = int(pixels.max()), 2**bit_depth - 1
        if pixels.min() < 0 or top > 65535:
            raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
        if top > full:
            raise ImageError(f"{path}: 16-bit image with values up to {top}, above 0..{full}, the "
                             f"{bit_depth}-bit range it is read in (train --bit-depth, stored in the model)")
        if bit_depth == 16 and top < 2**14:  # with a --bit-depth given, a dark cell is just dark
            _warn_low_range(path, top)
        return np.round(pixels * (255.0 / full)).astype(np.uint8)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ImageError(f"{path}: float images must hold values in [0, 1]")
        return np.round(pixels * 255.0).astype(np.uint8)
    raise ImageError(f"{path}: unsupported image mode {mode!r}")


_warned_low_range = False
_warn_lock = threading.Lock()  # inference decodes in threads


def _warn_low_range(path: Path, top: int) -> None:
    """Once per process (so once per decoding worker): a 16-bit image read as
    0..65535 that uses less than a quarter of it keeps only a few grey levels:
    most likely a camera with fewer bits."""
    global _warned_low_range
    with _warn_lock:
        if _warned_low_range:
            return
        _warned_low_range = True
    levels = round(top * 255 / 65535) + 1
    print(f"elcell: warning: {path}: 16-bit image whose largest value is {top}: read as 0..65535 it "
          f"keeps {levels} grey levels; for a camera with fewer bits, train with --bit-depth (at least "
          f"{max(8, top.bit_length())} for this image; README: Train on your own cells).", file=sys.stderr)


def min_filter_size(source: int, size: int) -> int:
    """The odd minimum-filter width nearest the shrink factor source / size:
    1 (no filter) below a factor of 2, 3 from 2 to 4 (300 -> 128 px), 5 from 4 to 6..."""
    return max(1, 2 * math.floor((source / size - 1) / 2 + 0.5) + 1)


def min_filter(gray: np.ndarray, width: int) -> np.ndarray:
    """The minimum over a `width` x `width` square around each pixel, edges
    replicated: PIL's MinFilter, about 50x faster. Separable: the minimum
    along each row, then along each column."""
    height, wide = gray.shape
    padded = np.pad(gray, width // 2, mode="edge")
    rows = padded[:, :wide].copy()
    for shift in range(1, width):
        np.minimum(rows, padded[:, shift : shift + wide], out=rows)
    out = rows[:height].copy()
    for shift in range(1, width):
        np.minimum(out, rows[shift : shift + height], out=out)
    return out


def load_cell(path: str | Path, size: int, shrink: str = "bilinear", bit_depth: int = 16) -> np.ndarray:
    """Read one cell image as a `size` x `size` uint8 gray array.

    8-bit or 16-bit gray and RGB are accepted, a 16-bit image's values read as
    `bit_depth`-bit ones (BIT_DEPTHS); any other size is resized (cells cut
    from module images are close to square, so no padding), a larger cell
    shrunk as `shrink` says (SHRINKS).
    Raises ImageError with the file name for anything unreadable.
    """
    if shrink not in SHRINKS:
        raise ValueError(f"shrink {shrink!r}: choose from {list(SHRINKS)}")
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit depth {bit_depth}: choose from {BIT_DEPTHS.start} to {BIT_DEPTHS.stop - 1}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            gray = _to_gray_uint8(image, path, bit_depth)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: image too large ({err})") from None
    if gray.ndim != 2 or min(gray.shape) < 8:
        raise ImageError(f"{path}: image is {gray.shape}, expected a 2-D cell of at least 8x8 pixels")
    if gray.shape == (size, size):
        return gray
    width = min_filter_size(min(gray.shape), size) if shrink == "min" else 1
    if width > 1:
        gray = min_filter(gray, width)
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(
                sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            )
        else:
            found.append(item)
    return found
