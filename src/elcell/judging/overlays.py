"""The cells two models disagree on, drawn: for each cell and label decided
differently, A's heatmap and decision beside B's, into OUT/overlays/, and
OUT/disagreements.html listing them. Torch-free (ONNX Runtime).

A figure says B is better; the pictures say where and why: a promoted model
should be right on the cells where it differs, and look at the defect, not at
a busbar. The cells are ordered by how far the two models' probabilities lie
apart, so the first page shows the largest changes.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from elcell.cells.images import read_gray, to_cell
from elcell.infer.heatmaps import heatmap_box, overlay_image, png_bytes
from elcell.infer.report import write_page
from elcell.infer.runtime import Model, open_model
from elcell.io import atomic_path, safe_name, unique_names
from elcell.judging.intervals import Scored

OVERLAY_FOLDER = "overlays"
INDEX = "disagreements.html"


def _heatmaps(model: Model, original: np.ndarray) -> np.ndarray:
    """[L, h, w]: the model's heatmaps for one cell, decoded as the model decodes."""
    _, maps = model.run(to_cell(original, model.decoding)[None], heatmaps=True)
    return maps[0]


def side_by_side(original: np.ndarray, panels: list[tuple[np.ndarray, float, str, str]]) -> Image.Image:
    """One image: each (heatmap, probability, title, decision) over the cell, left to right."""
    images = [overlay_image(original, heat, prob, title, decision, heatmap_box(heat, original.shape))
              for heat, prob, title, decision in panels]
    gap = 8
    sheet = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1),
                              max(i.height for i in images)), (255, 255, 255))
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width + gap
    return sheet


def order_by_change(a: Scored, b: Scored, rows: list[int]) -> list[int]:
    """`rows`, the largest change of probability (over labels) first."""
    change = np.nanmax(np.abs(b.probs - a.probs), axis=1)
    return sorted(rows, key=lambda i: -float(change[i]))


def write_overlays(out: Path, models: tuple[str, str], a: Scored, b: Scored, rows: list[int],
                   limit: int) -> list[dict]:
    """Draw the first `limit` of `rows` (by order_by_change) into OUT/overlays/
    and list them in OUT/disagreements.html; returns one record per drawing.
    A cell that cannot be read again is listed without a drawing."""
    model_a, model_b = open_model(models[0]), open_model(models[1])
    folder = out / OVERLAY_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    chosen = order_by_change(a, b, rows)[:limit]
    names = unique_names([a.paths[i] for i in chosen])
    records = []
    for i, name in zip(chosen, names):
        try:
            original = read_gray(a.paths[i], model_a.decoding.bit_depth)
            maps = (_heatmaps(model_a, original), _heatmaps(model_b, original))
        except Exception as err:  # ImageError, or a file changed since it was scored
            records.append({"row": i, "label": "", "image": None, "error": str(err)})
            continue
        for j in np.flatnonzero(a.decisions[i] != b.decisions[i]):
            label = a.labels[j]
            panels = [(maps[k][m.info.labels.index(label)], s.probs[i, j], f"{side} {label}", s.decisions[i, j])
                      for k, (side, m, s) in enumerate((("A", model_a, a), ("B", model_b, b)))]
            file = f"{name}_{safe_name(label)}.png"
            with atomic_path(folder / file) as tmp:
                tmp.write_bytes(png_bytes(side_by_side(original, panels)))
            records.append({"row": i, "label": label, "image": f"{OVERLAY_FOLDER}/{file}", "error": None})
    write_index(out / INDEX, models, a, b, records, len(rows))
    return records


def write_index(path: Path, models: tuple[str, str], a: Scored, b: Scored, records: list[dict],
                total: int) -> None:
    """The drawings as one page; every name from the data is escaped, every link quoted."""
    esc = html.escape
    head = "<tr><th>cell</th><th>label</th><th>truth</th><th>A</th><th>B</th><th>A | B</th></tr>"
    lines = []
    for record in records:
        i, label = record["row"], record["label"]
        j = a.labels.index(label) if label else None
        truth = "" if j is None or np.isnan(a.truth[i, j]) else f"{a.truth[i, j]:g}"
        cells = [f"{a.probs[i, j]:.3f} {a.decisions[i, j]}", f"{b.probs[i, j]:.3f} {b.decisions[i, j]}"] \
            if j is not None else ["", ""]
        picture = (f'<img src="{quote(record["image"])}" alt="{esc(a.paths[i], quote=True)}" width="520">'
                   if record["image"] else esc(record["error"]))
        lines.append(f"<tr><td>{esc(a.paths[i])}</td><td>{esc(label)}</td><td>{esc(truth)}</td>"
                     f"<td>{esc(cells[0])}</td><td>{esc(cells[1])}</td><td>{picture}</td></tr>")
    shown = len({r["row"] for r in records})
    note = (f"{total} cells decided differently; the {shown} with the largest change of probability drawn, "
            "each label decided differently as A's heatmap beside B's.")
    write_page(path, "elcell compare: where A and B disagree", f"A = {models[0]} · B = {models[1]}",
               [f'<p class="note">{esc(note)}</p>', f'<div class="scroll"><table>{head}{"".join(lines)}</table></div>'])
