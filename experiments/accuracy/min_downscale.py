"""`elcell` with cells shrunk through a minimum filter: does keeping thin cracks dark help? (E47, E48)

Shrinking a 300 px cell to 128 px with a bilinear filter averages a crack one
pixel wide with its bright surroundings, so it keeps less than half its
contrast. Here every cell, in training and in the final ONNX scoring, is first
passed through a minimum filter about as wide as the shrink factor (3 x 3 for
300 -> 128 px): dark lines widen to survive the shrink, bright areas do not
change. Only square cells larger than the training size are filtered (ELPV's
all are). A prototype: it patches elcell's decoding instead of adding an
option, and always uses its own cache folder (the cache key does not know the
decoding), so it never mixes with normally decoded cells.

    python experiments/accuracy/min_downscale.py train --config experiments/accuracy/E03-rot90.yaml \\
        --out runs/accuracy/E47-min-downscale
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import elcell.data
import elcell.images
import elcell.infer
from elcell.cli import main

plain_load_cell = elcell.images.load_cell


def min_filter_size(source: int, size: int) -> int:
    """The odd filter width nearest the shrink factor (1: no filter when not shrinking)."""
    return max(1, 2 * round((source / size - 1) / 2) + 1)


def load_cell_min_downscale(path: str | Path, size: int) -> np.ndarray:
    """`elcell.images.load_cell`, with a minimum filter before the shrink to `size`."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # let elcell's decoder raise its ImageError naming the file
        return plain_load_cell(path, size)
    if width != height or width <= size:  # only the square cells that shrink change
        return plain_load_cell(path, size)
    full = plain_load_cell(path, width)  # decoded and checked as elcell does, not resized
    widened = Image.fromarray(full).filter(ImageFilter.MinFilter(min_filter_size(width, size)))
    return np.asarray(widened.resize((size, size), Image.BILINEAR))


def patch() -> None:
    """Route the training cache and the ONNX scoring through the min-filter decoding.

    The cache is decoded in worker processes, which see the patch only when
    forked; under spawn they would fill the cache with plainly decoded cells."""
    if "fork" not in multiprocessing.get_all_start_methods():
        sys.exit("min_downscale.py needs processes started by fork (Linux)")
    multiprocessing.set_start_method("fork", force=True)
    elcell.images.load_cell = elcell.data.load_cell = elcell.infer.load_cell = load_cell_min_downscale
    os.environ["ELCELL_CACHE"] = str(Path.home() / ".cache" / "elcell-min-downscale")


if __name__ == "__main__":
    if any(arg.startswith("--cache-dir") for arg in sys.argv[1:]):
        sys.exit("min_downscale.py keeps its own cache folder: drop --cache-dir")
    patch()
    sys.exit(main(sys.argv[1:]))
