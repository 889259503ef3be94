"""Self-contained HTML pages: metrics tables, figures and galleries of cells with
their heatmap overlays, every image embedded as a data: URI, no scripts or
links, so a page can be mailed or archived as it is. Torch-free.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from elcell.errors import DataError
from elcell.infer.heatmaps import heatmap_box, overlay_png, png_bytes
from elcell.io import atomic_write_text


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
                    per_gallery: int = 8, known: np.ndarray | None = None) -> list[Gallery]:
    """Per label: the most confident true positives, false positives and false
    negatives, each with its overlay for that label.

    probs, positives: [cells, labels] (positives 0/1, the truth); known: bool
    [cells, labels], False where the truth is unknown, so that cell is no
    example of anything for that label (default: all known); names: one per
    cell (e.g. its path). `cell(i)` returns cell i as uint8 [H, W] and
    `heatmap(i)` its heatmaps [labels, h, w]: only the cells shown are asked
    for, so the caller can decode lazily (or index arrays it already has).
    """
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(positives).astype(bool)
    known = np.ones_like(truth) if known is None else np.asarray(known, dtype=bool)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def item(i: int, j: int, kind: str) -> GalleryItem:
        if i not in cache:
            cache[i] = (np.asarray(cell(i)), np.asarray(heatmap(i)))
        pixels, heat = cache[i]
        return GalleryItem(name=str(names[i]),
                           image=overlay_png(pixels, heat[j], probs[i, j], labels[j],
                                             box=heatmap_box(heat[j], pixels.shape)),
                           caption=f"{kind}: p={probs[i, j]:.3f}, truth={int(truth[i, j])}")

    galleries = []
    for j, label in enumerate(labels):
        predicted = probs[:, j] >= thresholds[j]
        negative = ~truth[:, j] & known[:, j]  # an unknown label is neither (truth is 0 there)
        kinds = [
            ("true positives", "most confident first", truth[:, j] & predicted, -probs[:, j]),
            ("false positives", "most confident first: defects the model saw where the label says "
             "none", negative & predicted, -probs[:, j]),
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
    if value is None:  # a figure with nothing to measure it on
        return "-"
    if isinstance(value, bool):
        return html.escape(str(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return "nan" if not math.isfinite(value) else f"{float(value):.4g}"
    if isinstance(value, list | tuple):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


@dataclass
class Table:
    """A table for people: a title, column headings, rows of (row heading, values)."""

    title: str
    columns: Sequence[str]
    rows: Sequence[tuple[str, Sequence[Any]]]
    note: str = ""


def table_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    body = "".join(f"<tr><th>{esc(str(name))}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>"
                   for name, values in table.rows)
    title = f"<h3>{esc(table.title)}</h3>" if table.title else ""
    note = f'<p class="note">{esc(table.note)}</p>' if table.note else ""
    head_row = f"<tr><th></th>{head}</tr>" if table.columns else ""
    return f'{title}{note}<div class="scroll"><table>{head_row}{body}</table></div>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;padding:0 1em;color:#222;max-width:1100px}
.scroll{overflow-x:auto;max-width:100%}
h1{margin-bottom:.2em} .meta{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0 1em} th,td{border:1px solid #ccc;padding:.25em .6em}
td{text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4;text-align:left}
.figures,.gallery{display:flex;flex-wrap:wrap;gap:12px}
.figures img{max-width:640px;width:100%} .maps img{max-width:100%;width:1060px} .gallery img{width:256px;height:auto;display:block}
figure{margin:0} figcaption{font-size:.8em;max-width:256px;overflow-wrap:anywhere;color:#444}
.note{color:#666;font-size:.9em;margin:.2em 0 .6em} .empty{color:#999}
"""


def figures_html(figures: Sequence[tuple[str, Any]], css: str = "figures") -> str:
    """(caption, image) pairs as captioned, embedded images in a wrapping row."""
    esc = html.escape
    return (f'<div class="{css}">' + "".join(
        f'<figure><img src="{_data_uri(image)}" alt="{esc(caption, quote=True)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>" for caption, image in figures) + "</div>")


def gallery_html(gallery: Gallery) -> str:
    esc = html.escape
    parts = [f"<h3>{esc(gallery.title)}</h3>"]
    if gallery.note:
        parts.append(f'<p class="note">{esc(gallery.note)}</p>')
    if not gallery.items:
        return "".join(parts) + '<p class="empty">none</p>'
    parts.append('<div class="gallery">')
    for entry in gallery.items:
        parts.append(
            f'<figure title="{esc(entry.name, quote=True)}"><img src="{_data_uri(entry.image)}" '
            f'alt="{esc(entry.name, quote=True)}"><figcaption>{esc(Path(entry.name).name)}<br>'
            f"{esc(entry.caption)}</figcaption></figure>")
    return "".join(parts) + "</div>"


def write_page(out_html: str | Path, title: str, subtitle: str, body: Sequence[str]) -> Path:
    """A self-contained HTML page: the title, when and what wrote it, and `body`
    (HTML parts), written atomically."""
    esc = html.escape
    stamp = time.strftime("%Y-%m-%d %H:%M")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f'<p class="meta">{esc(subtitle + " · " if subtitle else "")}written {stamp} by elcell</p>',
             *body, "</body></html>\n"]
    atomic_write_text(out_html, "\n".join(parts))
    return Path(out_html)


def write_report(out_html: str | Path, tables: Sequence[Table],
                 figures: Sequence[tuple[str, bytes | Path | Image.Image | Any]] = (),
                 galleries: Sequence[Gallery] = (), title: str = "elcell evaluation",
                 subtitle: str = "", gallery_note: str = "") -> Path:
    """One self-contained HTML file: tables, figures (curves) and galleries,
    every image embedded as a data: URI, no scripts or links, so it can be
    mailed or archived as it is. Written atomically; returns the path.

    figures: (title, PNG bytes / PNG file / PIL image / matplotlib Figure) pairs.
    Gallery captions show each image's file name; the full path is its tooltip.
    """
    body = ["<h2>Metrics</h2>", *(table_html(table) for table in tables)]
    if figures:
        body += ["<h2>Curves</h2>", figures_html(figures)]
    if galleries:
        body.append("<h2>What the model gets right and wrong</h2>")
        if gallery_note:
            body.append(f'<p class="note">{html.escape(gallery_note)}</p>')
    body += [gallery_html(gallery) for gallery in galleries]
    return write_page(out_html, title, subtitle, body)
