"""`elcell segment`: cut module photos into cell images for labelling, so a
line's own modules become training data. Torch-free.

Each cell is written at the photo's resolution and depth (a 16-bit photo gives
16-bit PNGs) as <module>_r<row>_c<col>.png, rows and columns counted from 1 at
the top left. labels.csv beside them is in the training format with one
column per label: empty for a person to fill in, or with --model the model's
decisions (defect 1, ok 0, review left empty: a person decides), its rows
then in the order a person should label them (`elcell.infer.review_order`;
by default `teach`, the order that makes a fine-tuning learn most: likely
defects and cells near 0.5 in turn, a share of random ok cells), with a
`reason` column saying why each is where it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from elcell.cells.images import read_pixels
from elcell.cells.inputs import collect_inputs, report_unreadable, unreadable
from elcell.errors import DataError, ImageError
from elcell.infer.review_order import review_order
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


def label_columns(cells: list[np.ndarray], labels: list[str], model: Model | None) -> tuple[list[list[str]], np.ndarray]:
    """The label fields of each cell's row, and the model's probabilities ([N, L]; empty without one)."""
    if model is None:
        return [[""] * len(labels) for _ in cells], np.zeros((len(cells), 0))
    scores = score_cells(model, cells)
    return [[ANSWER.get(d, "") for d in row] for row in scores.decisions], scores.probs


def in_review_order(rows: list[list[str]], probs: np.ndarray, model: Model, share: float, seed: int,
                    order: str = "teach") -> list[list[str]]:
    """Rows sorted for labelling, each with its reason last."""
    ok = np.array([all(v == ANSWER[OK] for v in row[1:]) for row in rows], dtype=bool)
    chosen = review_order(probs, model.info.thresholds, ok, model.info.labels, share, seed, order)
    return [[*rows[choice.index], choice.reason] for choice in chosen]


def main(args) -> int:
    """`elcell segment` (options: elcell.cli)."""
    rows, cols = parse_grid(args.grid)
    model = open_model(args.model) if args.model else None
    labels = model.info.labels if model else [name.strip() for name in args.labels.split(",") if name.strip()]
    if not labels:
        raise DataError(f"--labels {args.labels!r}: name at least one label, e.g. crack,inactive")
    out = Path(args.out)
    output_mode(out / "labels.csv", overwrite=args.overwrite)
    paths = collect_inputs(args.inputs, outputs=[out])
    found: list[list[str]] = []  # path and label fields, one per cell
    probs: list[np.ndarray] = []
    failed = []
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
        answers, scored = label_columns(cells, labels, model)
        found += [[file, *answer] for file, answer in zip(files, answers, strict=True)]
        probs.append(scored)
        print(f"elcell: {name}: {len(cells)} cells", file=sys.stderr)
    header = ["path", *labels]
    if model is not None and found:
        found = in_review_order(found, np.concatenate(probs), model, args.review_random, args.seed,
                                args.review_order)
        header.append("reason")
    if not found:  # a header alone would only make the corrected rerun ask for --overwrite
        print("elcell: no module image could be cut: labels.csv not written", file=sys.stderr)
        return 1
    lines = [";".join(header)] + [";".join(row) for row in found]
    atomic_write_text(out / "labels.csv", "\n".join(lines) + "\n")
    print(f"elcell: wrote {len(found)} cells and {out / 'labels.csv'}"
          + (f", in the {args.review_order} order" if model is not None else ""), file=sys.stderr)
    return 1 if failed else 0
