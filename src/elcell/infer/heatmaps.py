"""Heatmaps as pictures and boxes: upsampling, the hottest point, a box around
the hot region, and overlays of a heatmap on its cell. Torch-free: everything
works from the ONNX outputs, so it runs on the inspection PC.

An overlay shows *where* the model found evidence for a label on the cell at
its own resolution; its colours are relative to that cell's peak (the legend
says so), its probability is written above it.
"""

from __future__ import annotations

import functools
import io
import math

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

# One colour scale for every heatmap elcell draws (overlays here, module maps in
# elcell.pvmodules.modulemap), so a colour means the same share of a cell's peak in both.
COLORMAP = cv2.COLORMAP_JET
MIN_DISPLAY = 256  # a smaller cell is enlarged (by a whole factor) so that text on it reads
BOX_THRESHOLD = 0.5
VISIBLE = 0.25  # heat below this share of the cell's peak is not drawn: the cell shows through


def heatmap_note(settings: dict | None) -> str:
    """What the numbers of a model's heatmap are (explain's JSON)."""
    if not settings:  # models exported before heatmap settings were stored
        return ("Grad-CAM of the label's logit on the last feature map (ReLU applied, not normalised); one "
                "value per feature-map cell, row-major, image top-left first")
    name = {"layercam": "LayerCAM", "gradcam": "Grad-CAM"}[settings["method"]]
    return (f"{name} of the label's logit on the feature map of stride {settings['stride']}, averaged over "
            f"{settings['views']} symmetric views of the cell (ReLU applied, not normalised); one value per "
            "feature-map cell, row-major, image top-left first")


# --------------------------------------------------------------------------- heatmaps


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))


def upsample_heatmap(heatmap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one [h, w] heatmap to `size` (int or (height, width)).

    Pixel centres are aligned and borders clamped, as torch's
    interpolate(mode="bilinear", align_corners=False) and cv2.resize's
    INTER_LINEAR: a heatmap cell covers the patch of image it was computed from.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected one [h, w] heatmap, got shape {heat.shape}")
    height, width = _size2(size)
    return cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)


def colorize(relative: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] of values in [0, 1] (a heatmap relative to its peak) on COLORMAP."""
    levels = np.round(np.clip(relative, 0, 1) * 255).astype(np.uint8)
    coloured = cv2.applyColorMap(levels.reshape(levels.shape[0], -1), COLORMAP)  # BGR
    return coloured[..., ::-1].reshape(*relative.shape, 3)


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
    (x, y: top-left corner; peak_x, peak_y: the hottest point inside the box's
    region, so the point always lies in the box; peak: the heatmap's largest raw
    value, its strength), or None when the heatmap is all zero (nothing speaks
    for the label anywhere).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"box threshold must be in (0, 1], got {threshold}")
    raw_peak = float(np.max(heatmap)) if np.size(heatmap) else 0.0
    if not math.isfinite(raw_peak) or raw_peak <= 0:
        return None
    heat = upsample_heatmap(heatmap, size)
    regions, count = ndimage.label(heat >= threshold * float(heat.max()))
    mass = ndimage.sum_labels(heat, regions, index=np.arange(1, count + 1))
    boxed = regions == int(np.argmax(mass)) + 1
    ys, xs = np.nonzero(boxed)
    peak_y, peak_x = heatmap_peak(np.where(boxed, heat, -np.inf))
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


def _display(cell: np.ndarray) -> Image.Image:
    """The cell at its own resolution, enlarged by a whole factor (each pixel a
    sharp square) only when it is too small to read."""
    if cell.dtype != np.uint8:
        cell = np.clip(cell, 0, 255).astype(np.uint8)
    gray = Image.fromarray(cell, "L")
    factor = max(1, math.ceil(MIN_DISPLAY / min(cell.shape)))
    return gray.resize((cell.shape[1] * factor, cell.shape[0] * factor), Image.NEAREST) if factor > 1 else gray


@functools.lru_cache(maxsize=16)  # one per cell width: a third of an overlay's drawing time
def _legend(width: int, size: int) -> Image.Image:
    """A colour bar, transparent (no evidence) up to this cell's strongest
    evidence, with "none" and "most" beside it and a caption under it. Laid
    out from the font's own measures, so no text touches the bar whatever the
    cell's width. Shared between calls: only pasted from, never drawn on."""
    font = _font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption = "evidence, relative to this cell's peak"
    if measure.textlength(caption, font=font) > width - 8:
        caption = "relative to this cell's peak"
    gap = max(3, size // 3)
    ends = [measure.textbbox((0, 0), word, font=font) for word in ("none", "most")]
    left, right = ends[0][2] - ends[0][0] + 2 * gap, width - (ends[1][2] - ends[1][0]) - 2 * gap
    bar_height = max(4, size * 2 // 3)
    text_height = max(box[3] - box[1] for box in ends)
    row = max(bar_height, text_height)
    caption_box = measure.textbbox((0, 0), caption, font=font)
    height = gap + row + gap + (caption_box[3] - caption_box[1]) + gap
    band = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    if right - left >= 8:
        ramp = np.linspace(0, 1, right - left)
        colours = colorize(ramp)
        colours[ramp < VISIBLE] = 90  # below VISIBLE the cell shows through
        band.paste(Image.fromarray(np.repeat(colours[None], bar_height, axis=0), "RGB"),
                   (left, gap + (row - bar_height) // 2))
    middle = gap + row // 2
    draw.text((left - gap, middle), "none", font=font, fill=(255, 255, 255), anchor="rm")
    draw.text((right + gap, middle), "most", font=font, fill=(255, 255, 255), anchor="lm")
    draw.text((width // 2, gap + row + gap - caption_box[1]), caption, font=font, fill=(200, 200, 200),
              anchor="ma")
    return band


def overlay_image(cell: np.ndarray, heatmap: np.ndarray, prob: float | None = None,
                  label: str = "", decision: str = "", box: dict | None = None,
                  alpha: float = 0.55) -> Image.Image:
    """The cell at its own resolution with the heatmap (bilinear upsampled to it)
    blended on top, a title band (label, probability, decision), the box around
    the hot region (`heatmap_box` in the cell's pixels; none when the decision
    is ok) and a colour legend.

    Colours run from the heatmap's weakest shown value to its peak; below
    VISIBLE x the peak the cell shows through untinted. Returns RGB.
    """
    cell = np.asarray(cell)
    if cell.ndim != 2:
        raise ValueError(f"expected a gray [H, W] cell, got shape {cell.shape}")
    gray = _display(cell)
    width, height = gray.size
    scale = width / cell.shape[1]
    heat = upsample_heatmap(heatmap, (height, width))
    peak = float(heat.max())
    relative = heat / peak if math.isfinite(peak) and peak > 0 else np.zeros_like(heat)
    colour = colorize(relative).astype(np.float32)
    weight = alpha * np.where(relative >= VISIBLE, 0.4 + 0.6 * relative, 0.0)[..., None]
    base = np.asarray(gray, dtype=np.float32)[..., None]
    tinted = Image.fromarray(np.clip(base * (1 - weight) + colour * weight + 0.5, 0, 255).astype(np.uint8), "RGB")
    if box is not None and decision != "ok":  # a box says "the defect is here": not on a cell judged ok
        ImageDraw.Draw(tinted).rectangle(
            (box["x"] * scale, box["y"] * scale, (box["x"] + box["width"]) * scale - 1,
             (box["y"] + box["height"]) * scale - 1), outline=(255, 255, 255), width=max(1, width // 150))
    band = max(18, width // 14)
    legend = _legend(width, max(9, band // 2))
    image = Image.new("RGB", (width, height + band + legend.height), (0, 0, 0))
    image.paste(tinted, (0, band))
    image.paste(legend, (0, height + band))
    title = " ".join(part for part in (label, "" if prob is None else f"{float(prob):.2f}", decision) if part)
    if title:
        ImageDraw.Draw(image).text((6, band // 2), title, font=_font(max(10, band * 2 // 3)),
                                   fill=(255, 255, 255), anchor="lm")
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG, at zlib level 1: a quarter of level 6's time for
    17 % more bytes (a 300 px cell's overlay: 10 ms against 38 ms), and overlays
    are written cell by cell on the line's clock."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def overlay_png(cell: np.ndarray, heatmap: np.ndarray, prob: float | None = None, label: str = "",
                decision: str = "", box: dict | None = None) -> bytes:
    """`overlay_image` encoded as PNG bytes (for files and the HTML report)."""
    return png_bytes(overlay_image(cell, heatmap, prob, label, decision, box))
