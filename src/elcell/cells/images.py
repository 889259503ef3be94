"""Decoding EL cell images into the one form the model sees: uint8 gray, square.

Torch-free on purpose: the training cache and ONNX inference both call
`load_cell` (a file) or `to_uint8` + `to_cell` (an array cut from a module
photo or uploaded), with the model's `Decoding`, so a cell is decoded
identically on the GPU box, on the inspection PC and in the service.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
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


def _pixels(image: Image.Image, path: Path) -> np.ndarray:
    """The image's gray values as stored: uint8 (8-bit gray, RGB converted to
    gray), uint16 (16-bit), or float32 in [0, 1] (float images, which PIL holds
    as float32: a float64 copy would double a large image for no precision)."""
    mode = image.mode
    if mode in ("L", "P", "1", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB").convert("L"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image)
        if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) > 65535):
            raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
        return pixels.astype(np.uint16, copy=False)  # 16-bit modes already are: no second copy
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ImageError(f"{path}: float images must hold values in [0, 1]")
        return pixels
    raise ImageError(f"{path}: unsupported image mode {mode!r}")


def to_uint8(pixels: np.ndarray, bit_depth: int = 16, where: str | Path = "image") -> np.ndarray:
    """Gray values as stored (uint8, uint16 or floats in [0, 1]) -> uint8.

    16-bit cameras are scaled by the camera's depth (65535 for 16 bits, 4095 for
    `bit_depth` 12), not by 255, which would saturate almost every pixel. Cells
    cut from a 16-bit module photo go through here too, so they decode as files do."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "f":
        return np.round(pixels * 255.0).astype(np.uint8)
    top, full = int(pixels.max()), 2**bit_depth - 1
    if top > full:
        raise ImageError(f"{where}: 16-bit image with values up to {top}, above 0..{full}, the "
                         f"{bit_depth}-bit range it is read in (train --bit-depth, stored in the model)")
    if bit_depth == 16 and top < 2**14:  # with a --bit-depth given, a dark cell is just dark
        _warn_low_range(where, top)
    return _scale_table(full)[pixels]


@functools.lru_cache(maxsize=len(BIT_DEPTHS))
def _scale_table(full: int) -> np.ndarray:
    """uint8 of every value 0..full, rounded as round(v * 255 / full): indexing it maps
    a 16-bit image to 8 bits with no temporary larger than the uint8 result (a
    float64 copy of a 4900 x 4900 image would take 190 MB)."""
    table = np.round(np.arange(full + 1, dtype=np.float64) * (255.0 / full)).astype(np.uint8)
    table.flags.writeable = False
    return table


_warned_low_range = False
_hand_back = False  # a Ray worker: warnings wait for take_worker_warning instead of printing
_unsent_warning = ""  # met here since the last take_worker_warning
_warn_lock = threading.Lock()  # inference decodes in threads


def _warn_low_range(path: str | Path, top: int) -> None:
    """Once per run: a 16-bit image read as 0..65535 that uses less than a quarter
    of it keeps only a few grey levels: most likely a camera with fewer bits."""
    global _unsent_warning
    levels = round(top * 255 / 65535) + 1
    message = (f"{path}: 16-bit image whose largest value is {top}: read as 0..65535 it keeps {levels} grey "
               f"levels; for a camera with fewer bits, train with --bit-depth (at least "
               f"{max(8, top.bit_length())} for this image; README: Train on your own cells).")
    if _hand_back:
        with _warn_lock:
            _unsent_warning = message
    else:
        _say_once(message)


def _say_once(message: str) -> None:
    global _warned_low_range
    with _warn_lock:
        if _warned_low_range:
            return
        _warned_low_range = True
    print(f"elcell: warning: {message}", file=sys.stderr)


def hand_back_warnings() -> None:
    """Called in a Ray worker: its stderr reaches Ray's logs, or every worker's copy
    reaches the user, so warnings wait to be returned to the driver, which says
    them once (take_worker_warning, echo_worker_warning)."""
    global _hand_back
    _hand_back = True


def take_worker_warning() -> str:
    """The warning met in this worker since the last call ('' if none)."""
    global _unsent_warning
    with _warn_lock:
        message, _unsent_warning = _unsent_warning, ""
    return message


def echo_worker_warning(message: str) -> None:
    """The driver: a worker's warning said once per run, as the local path says it."""
    if message:
        _say_once(message)


def min_filter_size(source: int, size: int) -> int:
    """The odd minimum-filter width nearest the shrink factor source / size:
    1 (no filter) below a factor of 2, 3 from 2 to 4 (300 -> 128 px), 5 from 4 to 6..."""
    return max(1, 2 * math.floor((source / size - 1) / 2 + 0.5) + 1)


def min_filter(gray: np.ndarray, width: int) -> np.ndarray:
    """The minimum over a `width` x `width` square around each pixel, edges
    replicated: PIL's MinFilter to the byte, as OpenCV's erosion (about 50x faster)."""
    kernel = np.ones((width, width), dtype=np.uint8)
    return cv2.erode(gray, kernel, borderType=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class Decoding:
    """How a cell becomes the array a model sees: `size` x `size` uint8 gray.

    Training stores it in the model (size, shrink, bit depth), so every consumer
    (predict, evaluate, explain, int8 calibration, module inspection, the
    service) decodes a cell exactly as training did."""

    size: int
    shrink: str = "bilinear"  # SHRINKS: how a larger cell is shrunk
    bit_depth: int = 16  # BIT_DEPTHS: how many bits of a 16-bit image hold the camera's values

    def __post_init__(self) -> None:
        if self.shrink not in SHRINKS:
            raise ValueError(f"shrink {self.shrink!r}: choose from {list(SHRINKS)}")
        if self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit depth {self.bit_depth}: choose from {BIT_DEPTHS.start} to {BIT_DEPTHS.stop - 1}")


def _source_name(source: str | Path | BinaryIO) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return str(getattr(source, "name", None) or "image")  # an open file, or bytes in memory


MAX_PIXELS = 120_000_000  # a 12 000 x 10 000 module photo; larger is refused before decoding
# The formats IMAGE_SUFFIXES name, and no others: Pillow decodes an ICO's or ICNS's embedded
# image, of any size, before its header can be checked.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # JPEG opens a camera's MPO too
# Sizes are checked from the header before decoding (MAX_PIXELS, the station's limits), in words
# that name the file and the limit. Pillow's own check stays behind them, moved to MAX_PIXELS so
# that it does not warn about photos elcell accepts (from 89 million pixels by default).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # ours refuse those first


def open_image(source: str | Path | BinaryIO, where: str | Path = "image") -> Image.Image:
    """Image.open for the formats elcell reads; Pillow's size refusal (past twice
    MAX_PIXELS, a size our header checks cannot see first) in elcell's words."""
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"{where}: image of more than {2 * MAX_PIXELS // 1_000_000} million pixels, more than "
                         f"the {MAX_PIXELS // 1_000_000} million elcell reads") from None


def read_pixels(source: str | Path | BinaryIO, name: str | None = None, min_size: int = 8,
                at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file (a path or an open binary file) as its gray values as
    stored (`_pixels`: uint8, uint16 or floats in [0, 1]), at its own size.

    at_least (width, height): a JPEG may be decoded smaller, by 2, 4 or 8 in its
    DCT (Pillow's draft mode: several times faster), as long as it stays at
    least this large; other formats are read at their own size.
    8-bit or 16-bit gray and RGB are accepted. Raises ImageError naming the file
    (`name`, else the path) for anything unreadable, or larger than MAX_PIXELS
    (checked from the header, before the pixels are decoded)."""
    where = Path(name if name is not None else _source_name(source))
    try:
        with open_image(source, where) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{where}: image is {image.width}x{image.height} pixels, more than the "
                                 f"{MAX_PIXELS // 1_000_000} million elcell reads")
            if at_least is not None and image.format == "JPEG":
                image.draft(image.mode, at_least)
            image.load()
            gray = _pixels(image, where)
    except FileNotFoundError:
        raise ImageError(f"{where}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"{where}: not a readable image ({err})") from None
    if gray.ndim != 2 or min(gray.shape) < min_size:
        raise ImageError(f"{where}: image is {gray.shape}, expected a 2-D image of at least "
                         f"{min_size}x{min_size} pixels")
    return gray


def read_reduced(source: str | Path | BinaryIO, at_least: tuple[int, int] | None, min_size: int = 8,
                 name: str | None = None) -> tuple[np.ndarray, float]:
    """`read_pixels(source, at_least=...)`, and how many of the file's pixels one of
    the returned ones spans (1, or 2, 4, 8 for a JPEG decoded smaller)."""
    where = Path(name if name is not None else _source_name(source))
    pixels = read_pixels(source, name=name, min_size=min_size, at_least=at_least)
    if not isinstance(source, str | Path):
        source.seek(0)  # the header again, from the same bytes
    try:
        with open_image(source, where) as image:
            return pixels, float(round(image.width / pixels.shape[1]))  # odd sizes round up: 2599 -> 1300
    except OSError as err:  # read a moment ago: only a file replaced meanwhile gets here
        raise ImageError(f"{where}: not a readable image ({err})") from None


def read_gray(source: str | Path | BinaryIO, bit_depth: int = 16, name: str | None = None) -> np.ndarray:
    """`read_pixels`, then `to_uint8`: the file's cell as uint8 gray at its own size,
    a 16-bit image's values read as `bit_depth`-bit ones (BIT_DEPTHS)."""
    where = name if name is not None else _source_name(source)
    return to_uint8(read_pixels(source, name), bit_depth, where)


def to_cell(gray: np.ndarray, decoding: Decoding) -> np.ndarray:
    """A uint8 gray cell of any size as the model's `size` x `size` input.

    A cell of another size is resized (cells cut from module images are close
    to square, so no padding), a larger one shrunk as `decoding.shrink` says."""
    size = decoding.size
    if gray.shape == (size, size):
        return gray
    width = min_filter_size(min(gray.shape), size) if decoding.shrink == "min" else 1
    if width > 1:
        gray = min_filter(gray, width)
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))


def load_cell(path: str | Path | BinaryIO, decoding: Decoding, name: str | None = None) -> np.ndarray:
    """Read one cell image file as the model's input (`read_gray`, then `to_cell`)."""
    return to_cell(read_gray(path, decoding.bit_depth, name), decoding)


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
