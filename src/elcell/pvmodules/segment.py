"""`elcell segment`: cut module photos into cell images for labelling, so a
line's own modules become training data. Torch-free.

Each cell is written at the photo's resolution and depth (a 16-bit photo gives
16-bit PNGs) as <module>_r<row>_c<col>.png, rows and columns counted from 1 at
the top left. labels.csv beside them is in the training format with one
column per label: empty for a person to fill in, or with --model the model's
decisions (defect 1, ok 0, review left empty: a person decides).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from elcell.cells.images import read_pixels
from elcell.cells.inputs import collect_inputs, report_unreadable, unreadable
from elcell.errors import DataError, ImageError
from elcell.infer.runtime import DEFECT, OK, Model, open_model, score_cells
from elcell.io import atomic_path, atomic_write_text, output_mode, unique_names
from elcell.pvmodules.geometry import cut_cells, find_module, parse_grid
from elcell.pvmodules.inspect import as_gray

ANSWER = {DEFECT: "1", OK: "0"}  # review stays empty


def save_cell(cell: np.ndarray, path: Path) -> None:
    """A cell as PNG at its own depth: uint8 as 8-bit gray, uint16 as 16-bit."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(cell)).save(tmp, format="PNG")


def segment_module(pixels: np.ndarray, rows: int, cols: int) -> list[list[np.ndarray]]:
    image = as_gray(pixels)
    geometry, flat = find_module(image, rows, cols)
    return cut_cells(flat, geometry)


def label_columns(cells: list[np.ndarray], labels: list[str], model: Model | None) -> list[list[str]]:
    if model is None:
        return [[""] * len(labels) for _ in cells]
    decisions = score_cells(model, cells).decisions
    return [[ANSWER.get(d, "") for d in row] for row in decisions]


def main(args) -> int:
    """`elcell segment` (options: elcell.cli)."""
    rows, cols = parse_grid(args.grid)
    model = open_model(args.model) if args.model else None
    labels = model.info.labels if model else [name.strip() for name in args.labels.split(",") if name.strip()]
    if not labels:
        raise DataError(f"--labels {args.labels!r}: name at least one label, e.g. crack,inactive")
    out = Path(args.out)
    output_mode(out / "labels.csv", overwrite=args.overwrite)
    paths = collect_inputs(args.inputs)
    lines, failed = [";".join(["path", *labels])], []
    for path, name in zip(paths, unique_names(paths), strict=True):
        try:
            cells = [cell for row in segment_module(read_pixels(path, min_size=32), rows, cols) for cell in row]
        except (ImageError, MemoryError) as err:
            failed.append(unreadable(path, err))
            report_unreadable(failed[-1], "skipped")
            continue
        files = [f"{name}_r{i // cols + 1:02d}_c{i % cols + 1:02d}.png" for i in range(len(cells))]
        for cell, file in zip(cells, files, strict=True):
            save_cell(cell, out / file)
        answers = label_columns(cells, labels, model)
        lines += [";".join([file, *answer]) for file, answer in zip(files, answers, strict=True)]
        print(f"elcell: {name}: {len(cells)} cells", file=sys.stderr)
    atomic_write_text(out / "labels.csv", "\n".join(lines) + "\n")
    print(f"elcell: wrote {len(lines) - 1} cells and {out / 'labels.csv'}", file=sys.stderr)
    return 1 if failed else 0
