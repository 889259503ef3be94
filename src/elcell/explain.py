"""What the model looked at: heatmap overlays, rough boxes, and the HTML report.

Torch-free: everything here works from the ONNX outputs (`probs` and the
Grad-CAM `heatmap` of the last ResNet stage), so it runs on the inspection PC.

* `overlay_image` / `overlay_png`: the cell in gray with the label's heatmap
  on top and its probability in the corner.
* `heatmap_box`: a rough box around the hottest region, in image pixels.
* `explain_cell`: overlays (and raw .npy heatmaps) for one cell; the unit that
  `elcell explain` and `elcell predict --heatmaps` share.
* `write_explanations`: `elcell explain` over many images.
* `build_galleries` / `write_report`: one self-contained HTML file (every image
  embedded) with metrics, curves and what the model gets right and wrong.

Heatmap colours are relative: each overlay is scaled to its own peak, so it
shows *where* the model looked, not how strongly compared with another cell.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from elcell.errors import DataError, ImageError
from elcell.io import atomic_path, atomic_write_json, atomic_write_text

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
    from scipy import ndimage  # scikit-learn's dependency, so always there with elcell

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

    from matplotlib import colormaps  # the registry only: no pyplot, no figure per image

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


# --------------------------------------------------------------------------- explain


def safe_name(text: str) -> str:
    """A file-name-safe version of a label or image stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def unique_names(paths: Sequence[str | Path]) -> list[str]:
    """One output name per image: its stem, made unique with a short hash of the
    path when two images (in different folders) share a stem."""
    stems = [safe_name(Path(p).stem) for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else
            f"{stem}_{hashlib.sha1(str(Path(p).resolve()).encode()).hexdigest()[:8]}"
            for stem, p in zip(stems, paths, strict=True)]


def explain_cell(out_dir: str | Path, name: str, cell: np.ndarray, heatmaps: np.ndarray,
                 probs: np.ndarray, labels: Sequence[str], which: Iterable[int] | None = None,
                 decisions: Sequence[str] | None = None, image_size: tuple[int, int] | None = None,
                 raw: bool = True, threshold: float = BOX_THRESHOLD) -> dict:
    """Write `{name}_{label}.png` overlays (and `{name}_{label}.npy` raw heatmaps
    when `raw`) for one cell and return a JSON-ready record of them.

    cell: uint8 [H, W] as the model saw it; heatmaps: [N, h, w] and probs: [N]
    from the model, for all its `labels`; `which`: label indices to explain
    (default all); decisions: the cell's `defect`/`review`/`ok` per label, if
    known; image_size: (height, width) of the original image, so boxes are in
    its pixels (default the cell's).
    """
    out_dir = Path(out_dir)
    image_size = image_size or cell.shape
    record: dict[str, Any] = {}
    for index in range(len(labels)) if which is None else which:
        label = labels[index]
        stem = f"{name}_{safe_name(label)}"
        entry: dict[str, Any] = {"probability": round(float(probs[index]), 6)}
        if decisions is not None:
            entry["decision"] = str(decisions[index])
        entry["box"] = heatmap_box(heatmaps[index], image_size, threshold)
        with atomic_path(out_dir / f"{stem}.png") as tmp:
            tmp.write_bytes(overlay_png(cell, heatmaps[index], probs[index], label))
        entry["overlay"] = f"{stem}.png"
        if raw:
            with atomic_path(out_dir / f"{stem}.npy") as tmp, open(tmp, "wb") as handle:
                np.save(handle, np.asarray(heatmaps[index], dtype=np.float32))
            entry["heatmap"] = f"{stem}.npy"
        record[label] = entry
    return record


@dataclass
class ExplainResult:
    """What `write_explanations` did: one record per explained image, and the
    images it skipped with the reason."""

    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def label_indices(model_labels: Sequence[str], wanted: Sequence[str] | None) -> list[int]:
    """Indices of the `wanted` labels in the model; DataError naming the model's
    labels for one it does not have."""
    if not wanted:
        return list(range(len(model_labels)))
    unknown = [w for w in wanted if w not in model_labels]
    if unknown:
        raise DataError(f"--label {unknown[0]}: the model's labels are {', '.join(model_labels)}")
    return [model_labels.index(w) for w in dict.fromkeys(wanted)]


def write_explanations(model, paths: Sequence[str | Path], out_dir: str | Path,
                       labels: Sequence[str] | None = None, batch_size: int = 16,
                       threshold: float = BOX_THRESHOLD,
                       on_skip: Callable[[str, str], None] | None = None) -> ExplainResult:
    """`elcell explain`: for every image and label an overlay PNG and the raw
    heatmap (.npy), and per image `{name}.json` with probabilities, decisions
    and boxes (in the original image's pixels).

    `model` is an open `elcell.infer.Model`. Unreadable images are skipped,
    reported through `on_skip(path, message)` (the message names the file) and
    listed in the result.
    """
    from elcell.images import load_cell
    from elcell.infer import decide

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    info = model.info
    which = label_indices(info.labels, labels)
    names = unique_names(paths)
    result = ExplainResult()
    for start in range(0, len(paths), batch_size):
        cells, kept = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                pixels = load_cell(paths[i], info.image_size, info.shrink, info.bit_depth)
                with Image.open(paths[i]) as opened:  # header only: the original size
                    size = (opened.height, opened.width)
            except Exception as err:  # ImageError, or whatever else a broken file provokes
                message = str(err) or type(err).__name__
                if not isinstance(err, ImageError):
                    message = f"{paths[i]}: {message}"
                result.skipped.append((str(paths[i]), message))
                if on_skip:
                    on_skip(str(paths[i]), message)
                continue
            cells.append(pixels)
            kept.append((i, size))
        if not cells:
            continue
        probs, heatmaps = model.run(np.stack(cells), heatmaps=True)
        decisions = decide(probs, info)
        for cell, prob, heat, decision, (i, size) in zip(cells, probs, heatmaps, decisions, kept,
                                                         strict=True):
            explained = explain_cell(out_dir, names[i], cell, heat, prob, info.labels, which,
                                     decision, size, raw=True, threshold=threshold)
            record = {
                "image": str(paths[i]),
                "image_size": {"height": size[0], "width": size[1]},
                "model": str(model.path),
                "box_threshold": threshold,
                "heatmap_shape": list(heat.shape[1:]),
                "heatmap_note": HEATMAP_NOTE,
                "labels": explained,
            }
            atomic_write_json(out_dir / f"{names[i]}.json", record)
            result.records.append(record)
    return result


# --------------------------------------------------------------------------- report


@dataclass
class GalleryItem:
    """One picture in a report gallery: `name` (the image, shown and searchable),
    `image` (PNG bytes, a PNG file or a PIL image) and a short caption."""

    name: str
    image: bytes | Path | Image.Image
    caption: str = ""


@dataclass
class Gallery:
    title: str
    items: list[GalleryItem]
    note: str = ""


def build_galleries(labels: Sequence[str], names: Sequence[str], probs: np.ndarray,
                    positives: np.ndarray, thresholds: Sequence[float],
                    cell: Callable[[int], np.ndarray], heatmap: Callable[[int], np.ndarray],
                    per_gallery: int = 8) -> list[Gallery]:
    """Per label: the most confident true positives, false positives and false
    negatives, each with its overlay for that label.

    probs, positives: [cells, labels] (positives 0/1, the truth); names: one per
    cell (e.g. its path). `cell(i)` returns cell i as uint8 [H, W] and
    `heatmap(i)` its heatmaps [labels, h, w]: only the cells shown are asked
    for, so the caller can decode lazily (or index arrays it already has).
    """
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(positives).astype(bool)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def item(i: int, j: int, kind: str) -> GalleryItem:
        if i not in cache:
            cache[i] = (np.asarray(cell(i)), np.asarray(heatmap(i)))
        pixels, heat = cache[i]
        return GalleryItem(name=str(names[i]),
                           image=overlay_png(pixels, heat[j], probs[i, j], labels[j]),
                           caption=f"{kind}: p={probs[i, j]:.3f}, truth={int(truth[i, j])}")

    galleries = []
    for j, label in enumerate(labels):
        predicted = probs[:, j] >= thresholds[j]
        kinds = [
            ("true positives", "most confident first", truth[:, j] & predicted, -probs[:, j]),
            ("false positives", "most confident first: defects the model saw where the label says "
             "none", ~truth[:, j] & predicted, -probs[:, j]),
            ("false negatives", "lowest probability first: defects the model missed",
             truth[:, j] & ~predicted, probs[:, j]),
        ]
        for kind, note, chosen, key in kinds:
            rows = np.flatnonzero(chosen)
            rows = rows[np.argsort(key[rows], kind="stable")][:per_gallery]
            galleries.append(Gallery(
                title=f"{label}: {kind} ({int(chosen.sum())} cells, threshold {thresholds[j]:.2f})",
                items=[item(int(i), j, kind.rstrip("s")) for i in rows], note=note))
    return galleries


def _data_uri(image: bytes | str | Path | Image.Image | Any) -> str:
    if isinstance(image, Image.Image):
        data = png_bytes(image)
    elif isinstance(image, str | Path):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read image for the report ({err.strerror})") from None
    elif hasattr(image, "savefig"):  # a matplotlib Figure
        buffer = io.BytesIO()
        image.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        data = buffer.getvalue()
    else:
        data = bytes(image)
    if data.startswith(b"\x89PNG"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    elif data.lstrip()[:5] in (b"<?xml", b"<svg ") or b"<svg" in data[:256]:
        mime = "image/svg+xml"
    else:
        raise ValueError("report images must be PNG, JPEG or SVG")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return "nan" if not math.isfinite(value) else f"{float(value):.4g}"
    if isinstance(value, list | tuple):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    """Scalars in one summary table; a mapping of mappings (e.g. per label) as a
    table with a row per key; a mapping of scalars as a two-column table."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    parts = []
    if scalars:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                       for k, v in scalars.items())
        parts.append(f"<table>{rows}</table>")
    for key, value in metrics.items():
        if not isinstance(value, Mapping):
            continue
        parts.append(f"<h3>{html.escape(str(key))}</h3>")
        if value and all(isinstance(v, Mapping) for v in value.values()):
            columns = list(dict.fromkeys(c for v in value.values() for c in v
                                         if not isinstance(v[c], Mapping)))
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            body = "".join(
                f"<tr><th>{html.escape(str(row))}</th>"
                + "".join(f"<td>{_fmt(v.get(c, ''))}</td>" for c in columns) + "</tr>"
                for row, v in value.items())
            parts.append(f"<table><tr><th></th>{head}</tr>{body}</table>")
        else:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                           for k, v in value.items())
            parts.append(f"<table>{rows}</table>")
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} .meta{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0 1em} th,td{border:1px solid #ccc;padding:.25em .6em}
td{text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4;text-align:left}
.figures,.gallery{display:flex;flex-wrap:wrap;gap:12px}
.figures img{max-width:640px;width:100%} .gallery img{width:256px;height:auto;display:block}
figure{margin:0} figcaption{font-size:.8em;max-width:256px;word-break:break-all;color:#444}
.note{color:#666;font-size:.9em;margin:.2em 0 .6em} .empty{color:#999}
"""


def write_report(out_html: str | Path, metrics: Mapping[str, Any],
                 figures: Sequence[tuple[str, bytes | Path | Image.Image | Any]] = (),
                 galleries: Sequence[Gallery] = (), title: str = "elcell evaluation",
                 subtitle: str = "") -> Path:
    """One self-contained HTML file: metrics tables, figures (curves) and
    galleries, every image embedded as a data: URI, no scripts or links, so it
    can be mailed or archived as it is. Written atomically; returns the path.

    metrics: scalars and (nested) mappings, rendered as tables; figures:
    (title, PNG bytes / PNG file / PIL image / matplotlib Figure) pairs.
    """
    out_html = Path(out_html)
    esc = html.escape
    stamp = time.strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{esc(subtitle + " · " if subtitle else "")}written {stamp} by elcell</p>',
        "<h2>Metrics</h2>", _metrics_html(metrics),
    ]
    if figures:
        parts.append('<h2>Curves</h2><div class="figures">')
        for caption, image in figures:
            parts.append(f'<figure><img src="{_data_uri(image)}" alt="{esc(caption, quote=True)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
    if galleries:
        parts.append("<h2>What the model gets right and wrong</h2>"
                     '<p class="note">Overlays: the label\'s Grad-CAM heatmap on the cell; colours '
                     "are relative to each cell's own peak (red = where the model looked most).</p>")
    for gallery in galleries:
        parts.append(f"<h3>{esc(gallery.title)}</h3>")
        if gallery.note:
            parts.append(f'<p class="note">{esc(gallery.note)}</p>')
        if not gallery.items:
            parts.append('<p class="empty">none</p>')
            continue
        parts.append('<div class="gallery">')
        for entry in gallery.items:
            parts.append(
                f'<figure><img src="{_data_uri(entry.image)}" alt="{esc(entry.name, quote=True)}" '
                f'title="{esc(entry.name, quote=True)}"><figcaption>{esc(entry.name)}<br>'
                f"{esc(entry.caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    atomic_write_text(out_html, "\n".join(parts))
    return out_html
