"""Heatmaps as pictures and boxes: upsampling, the hottest point, a box around
the hot region, and overlays of a heatmap on its cell. Torch-free: everything
works from the ONNX outputs, so it runs on the inspection PC.

Heatmap colours are relative: each overlay is scaled to its own peak, so it
shows *where* the model looked, not how strongly compared with another cell.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib import colormaps  # the registry only: no pyplot, no figure per image
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

COLORMAP = "jet"
MIN_DISPLAY = 256  # overlays are drawn at least this many pixels wide: readable text
BOX_THRESHOLD = 0.5
HEATMAP_NOTE = ("Grad-CAM of the label's logit on the last ResNet stage (ReLU applied, not "
                "normalised); one value per feature-map cell, row-major, image top-left first")


# --------------------------------------------------------------------------- heatmaps


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))


def upsample_heatmap(heatmap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one [h, w] heatmap to `size` (int or (height, width)).

    Pixel centres are aligned and borders clamped, as torch's
    interpolate(mode="bilinear", align_corners=False): a heatmap cell covers
    the patch of image it was computed from.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected one [h, w] heatmap, got shape {heat.shape}")
    height, width = _size2(size)
    return _resize_axis(_resize_axis(heat, height, 0), width, 1)


def _resize_axis(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    m = a.shape[axis]
    pos = np.clip((np.arange(n, dtype=np.float64) + 0.5) * (m / n) - 0.5, 0, m - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, m - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1, 1]
    shape[axis] = n
    frac = frac.reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - frac) + np.take(a, hi, axis=axis) * frac


def heatmap_peak(heat: np.ndarray) -> tuple[int, int]:
    """(y, x) of the hottest point of an upsampled heatmap.

    Bilinear upsampling with clamped borders turns a hot border cell into a
    flat plateau reaching the image edge; argmax would name the plateau's
    first pixel (the edge), so the centre of the pixels at the peak is used.
    """
    peak = float(heat.max())
    ys, xs = np.nonzero(heat >= peak - 1e-6 * abs(peak))
    return int(round(float(ys.mean()))), int(round(float(xs.mean())))


def heatmap_box(heatmap: np.ndarray, size: int | tuple[int, int],
                threshold: float = BOX_THRESHOLD) -> dict | None:
    """A rough box around where the model looked, in pixels of an image of `size`.

    The heatmap is upsampled to `size` (int or (height, width)), thresholded at
    `threshold` x its peak, and the connected region holding the most heat is
    boxed. Returns {"x", "y", "width", "height", "peak_x", "peak_y", "peak"}
    (x, y: top-left corner; peak: the heatmap's largest raw value), or None when
    the heatmap is all zero (nothing speaks for the label anywhere).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"box threshold must be in (0, 1], got {threshold}")
    raw_peak = float(np.max(heatmap)) if np.size(heatmap) else 0.0
    if not math.isfinite(raw_peak) or raw_peak <= 0:
        return None
    heat = upsample_heatmap(heatmap, size)
    regions, count = ndimage.label(heat >= threshold * float(heat.max()))
    mass = ndimage.sum_labels(heat, regions, index=np.arange(1, count + 1))
    ys, xs = np.nonzero(regions == int(np.argmax(mass)) + 1)
    peak_y, peak_x = heatmap_peak(heat)
    return {"x": int(xs.min()), "y": int(ys.min()),
            "width": int(xs.max() - xs.min() + 1), "height": int(ys.max() - ys.min() + 1),
            "peak_x": int(peak_x), "peak_y": int(peak_y), "peak": raw_peak}


# --------------------------------------------------------------------------- overlays


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int,
                anchor: str) -> None:
    font = _font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=font, anchor=anchor)
    pad = max(2, size // 5)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=(0, 0, 0, 170))
    draw.text(xy, text, font=font, fill=(255, 255, 255, 255), anchor=anchor)


def overlay_image(cell: np.ndarray, heatmap: np.ndarray, prob: float | None = None,
                  label: str = "", alpha: float = 0.5, min_display: int = MIN_DISPLAY) -> Image.Image:
    """The cell in gray with the heatmap (bilinear upsampled) blended on top.

    Colours are relative to this heatmap's peak, and cold areas stay
    transparent so the cell shows through. `label` and `prob` go in the top-left
    corner, the colour note and raw peak in the bottom-left. Small cells are
    enlarged to `min_display` pixels so the text stays readable. Returns RGB.
    """
    cell = np.asarray(cell)
    if cell.ndim != 2:
        raise ValueError(f"expected a gray [H, W] cell, got shape {cell.shape}")
    if cell.dtype != np.uint8:
        cell = np.clip(cell, 0, 255).astype(np.uint8)
    height, width = cell.shape
    scale = max(1.0, min_display / min(height, width))
    height, width = round(height * scale), round(width * scale)
    gray = Image.fromarray(cell, "L")
    if (height, width) != cell.shape:
        gray = gray.resize((width, height), Image.BILINEAR)
    base = np.asarray(gray, dtype=np.float32)[..., None]

    heat = upsample_heatmap(heatmap, (height, width))
    peak = float(heat.max())
    relative = heat / peak if math.isfinite(peak) and peak > 0 else np.zeros_like(heat)
    colour = colormaps[COLORMAP](relative)[..., :3].astype(np.float32) * 255
    weight = alpha * relative[..., None]
    rgb = base * (1 - weight) + colour * weight
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image, "RGBA")
    text_size = max(10, width // 16)
    pad = max(3, width // 60)
    title = label if prob is None else f"{label} {float(prob):.2f}".strip()
    if title:
        _label_text(draw, (pad + 2, pad + 2), title, text_size, "la")
    raw_peak = float(np.max(heatmap))  # as heatmap_box reports it
    note = f"colours relative, peak {raw_peak:.3g}" if math.isfinite(raw_peak) else "heatmap not finite"
    _label_text(draw, (pad + 2, height - pad - 2), note, max(8, text_size * 2 // 3), "ld")
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def overlay_png(cell: np.ndarray, heatmap: np.ndarray, prob: float | None = None, label: str = "",
                **kwargs: Any) -> bytes:
    """`overlay_image` encoded as PNG bytes (for files and the HTML report)."""
    return png_bytes(overlay_image(cell, heatmap, prob, label, **kwargs))
