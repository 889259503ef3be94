"""The picture of an inspected module: the rectified module, each cell outlined in
its decision's colour, flagged cells with their heatmap blended in and their
probabilities written on them, the grade above. OpenCV draws (a 2600 px map in
tens of milliseconds). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from elcell.infer.heatmaps import VISIBLE, colorize
from elcell.infer.runtime import DEFECT, OK, REVIEW
from elcell.pvmodules.geometry import ModuleGeometry

COLOURS = {OK: (90, 170, 90), REVIEW: (0, 165, 255), DEFECT: (40, 40, 230)}  # BGR: green, orange, red
MAX_WIDTH = 2000  # wider maps are drawn smaller: still readable on a screen, quick to write


def display_gray(rectified: np.ndarray) -> np.ndarray:
    """uint8 for display: 8-bit as it is, deeper images stretched to their 99.5th percentile."""
    if rectified.dtype == np.uint8:
        return rectified
    top = float(np.percentile(rectified, 99.5)) or 1.0
    return np.clip(rectified.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)


def worst(decisions: Sequence[str]) -> str:
    return DEFECT if DEFECT in decisions else REVIEW if REVIEW in decisions else OK


def draw_map(rectified: np.ndarray, geometry: ModuleGeometry, labels: Sequence[str], probs: np.ndarray,
             decisions: np.ndarray, heatmaps: dict[tuple[int, int], np.ndarray], title: str) -> np.ndarray:
    """The map as an RGB uint8 array.

    probs, decisions: [rows, cols, N]; heatmaps: (row, col) -> [N, h, w] for the
    flagged cells (their most certain flagged label's map is blended in)."""
    image = cv2.cvtColor(display_gray(rectified), cv2.COLOR_GRAY2BGR)
    scale = min(1.0, MAX_WIDTH / image.shape[1])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    thick = max(2, int(round(image.shape[1] / 500)))
    for (r, c), maps in heatmaps.items():
        x0, y0, x1, y1 = (int(round(v * scale)) for v in geometry.cell_box(r, c))
        flagged = [j for j in range(len(labels)) if decisions[r, c, j] != OK]
        j = max(flagged, key=lambda k: (decisions[r, c, k] == DEFECT, probs[r, c, k]))
        _blend(image[y0:y1, x0:x1], maps[j])
    for r in range(geometry.rows):
        for c in range(geometry.cols):
            x0, y0, x1, y1 = (int(round(v * scale)) for v in geometry.cell_box(r, c))
            decision = worst(list(decisions[r, c]))
            cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), COLOURS[decision], thick if decision != OK else 1)
            if decision != OK:
                _write_probs(image, (x0, y0), x1 - x0, labels, probs[r, c], decisions[r, c])
    return cv2.cvtColor(_with_title(image, title), cv2.COLOR_BGR2RGB)


def _blend(cell: np.ndarray, heatmap: np.ndarray) -> None:
    """Blend a heatmap (bilinear to the cell's size, relative to its peak) into a BGR cell view."""
    height, width = cell.shape[:2]
    heat = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    peak = float(heat.max())
    if not np.isfinite(peak) or peak <= 0:
        return
    relative = heat / peak
    colour = colorize(relative)[..., ::-1].astype(np.float32)  # the overlays' scale, as BGR
    weight = (0.55 * np.where(relative >= VISIBLE, 0.4 + 0.6 * relative, 0.0))[..., None]
    cell[:] = np.clip(cell * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)


def _write_probs(image: np.ndarray, corner: tuple[int, int], width: int, labels: Sequence[str],
                 probs: np.ndarray, decisions: np.ndarray) -> None:
    """The cell's flagged labels and probabilities, white on black, in its top-left corner."""
    size = max(0.35, width / 260)
    y = corner[1]
    for label, p, decision in zip(labels, probs, decisions, strict=True):
        if decision == OK:
            continue
        text = f"{label} {p:.2f}"
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, size, 1)
        cv2.rectangle(image, (corner[0] + 2, y + 2), (corner[0] + w + 6, y + h + base + 6), (0, 0, 0), -1)
        cv2.putText(image, text, (corner[0] + 4, y + h + 4), cv2.FONT_HERSHEY_SIMPLEX, size,
                    COLOURS[decision] if decision == REVIEW else (255, 255, 255), 1, cv2.LINE_AA)
        y += h + base + 6


def _with_title(image: np.ndarray, title: str) -> np.ndarray:
    title = title.replace("·", "|")  # OpenCV's fonts are ASCII
    size = max(0.5, image.shape[1] / 1400)
    (w, h), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, size, 2)
    size *= min(1.0, (image.shape[1] - 16) / w)  # the whole title fits the width
    (_, h), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, size, 2)
    band = np.zeros((h + base + 16, image.shape[1], 3), dtype=np.uint8)
    cv2.putText(band, title, (8, h + 8), cv2.FONT_HERSHEY_SIMPLEX, size, (255, 255, 255), 2, cv2.LINE_AA)
    return np.vstack([band, image])


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes, compressed lightly: a module map is written per module on the line."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode the map as PNG")
    return data.tobytes()
