"""`elcell` with cells shrunk through a minimum filter: does keeping thin cracks dark help? (E47)

Shrinking a 300 px cell to 128 px with a bilinear filter averages a crack one
pixel wide with its bright surroundings, so it keeps less than half its
contrast. Here every cell, in training and in the final ONNX scoring, is first
passed through a minimum filter about as wide as the shrink factor (3 x 3 for
300 -> 128 px): dark lines widen to survive the shrink, bright areas do not
change. A prototype: it patches elcell's decoding instead of adding an option,
and uses its own cache folder so it never mixes with normally decoded cells.

    python experiments/accuracy/min_downscale.py train --config experiments/accuracy/E03-rot90.yaml \\
        --out runs/accuracy/E47-min-downscale
"""

from __future__ import annotations

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
    with Image.open(path) as image:
        width, height = image.size
    if width != height or width <= size:  # only the square cells that shrink change
        return plain_load_cell(path, size)
    full = plain_load_cell(path, width)  # decoded and checked as elcell does, not resized
    shrunk = Image.fromarray(full).filter(ImageFilter.MinFilter(min_filter_size(width, size)))
    return np.asarray(shrunk.resize((size, size), Image.BILINEAR))


def patch() -> None:
    """Route the training cache and the ONNX scoring through the min-filter decoding."""
    elcell.images.load_cell = elcell.data.load_cell = elcell.infer.load_cell = load_cell_min_downscale
    os.environ.setdefault("ELCELL_CACHE", str(Path.home() / ".cache" / "elcell-min-downscale"))


if __name__ == "__main__":
    patch()
    sys.exit(main(sys.argv[1:]))
