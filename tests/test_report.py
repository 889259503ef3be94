"""The self-contained HTML report: embedded images, galleries of hits and mistakes."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from helpers import seed_rows
from PIL import Image

from elcell.cells.images import Decoding, load_cell
from elcell.infer.heatmaps import overlay_png
from elcell.infer.report import Gallery, GalleryItem, Table, build_galleries, write_report


class ReportParser(HTMLParser):
    """Collects <img> sources and alt texts, and checks that tags nest."""

    VOID = {"img", "meta", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> does not close <{self.stack[-1:]}>"
        self.stack.pop()


def parse_report(path: Path) -> ReportParser:
    text = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    assert not parser.stack, f"unclosed tags {parser.stack}"
    assert not parser.tags & {"script", "link", "iframe"}  # self-contained and inert
    for image in parser.images:
        assert image["src"].startswith("data:image/png;base64,"), image["src"][:40]
        Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))).load()
    return parser


def test_report_embeds_every_image_it_names(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    curve = tmp_path / "pr_crack.png"
    Image.new("RGB", (40, 30), "white").save(curve)
    rng = np.random.default_rng(0)
    cell = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    galleries = [
        Gallery("crack: false positives", [
            GalleryItem(f"cells/cell{i:04d}.png", overlay_png(cell, rng.random((2, 2)), 0.9, "crack"),
                        "p=0.9") for i in range(3)]),
        Gallery("crack: false negatives", []),
        Gallery("inactive: <true> positives & more", [
            GalleryItem("odd <name> & 'quotes'.png", Image.fromarray(cell), "")]),
    ]
    tables = [Table("Summary", [], [("cells", [64]), ("mean F1", [0.71234567]), ("weighted F1", [float("nan")]),
                                    ("data", ["<img src=x onerror=alert(1)>.csv"])]),
              Table("Per label", ["precision", "recall", "support"],
                    [("crack", [0.5, 1.0, 12]), ("inactive", [0.25, 0.5, 4])])]
    out = write_report(tmp_path / "report" / "report.html", tables,
                       figures=[("PR curve, crack", curve), ("matplotlib", figure)],
                       galleries=galleries, title="Test <report>")
    parser = parse_report(out)
    alts = [image["alt"] for image in parser.images]
    named = [item.name for gallery in galleries for item in gallery.items]
    assert alts == ["PR curve, crack", "matplotlib", *named]
    text = out.read_text()
    assert "Test &lt;report&gt;" in text and "0.7123" in text and "precision" in text
    # what the report did not write (file names, a CSV's name) is text, never markup
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;.csv" in text
    assert "odd <name>" not in text and "odd &lt;name&gt; &amp; &#x27;quotes&#x27;.png" in text
    assert text.count("<h3>") >= 5 and ">none<" in text  # every gallery shown, the empty one too


def test_galleries_pick_the_most_confident_mistakes():
    probs = np.array([[0.9], [0.2], [0.8], [0.6], [0.1], [0.4], [0.95]])
    truth = np.array([[1], [1], [0], [0], [1], [0], [1]])
    asked: list[int] = []

    def cell(i):
        asked.append(i)
        return np.full((32, 32), 10 * i, dtype=np.uint8)

    galleries = build_galleries(["crack"], [f"c{i}" for i in range(7)], probs, truth, [0.5], cell,
                                lambda i: np.ones((1, 2, 2)), per_gallery=2)
    by_title = {g.title.split(" (")[0]: [item.name for item in g.items] for g in galleries}
    assert by_title == {"crack: true positives": ["c6", "c0"],
                        "crack: false positives": ["c2", "c3"],
                        "crack: false negatives": ["c4", "c1"]}
    assert sorted(asked) == [0, 1, 2, 3, 4, 6]  # cell 5 (true negative) never decoded
    assert "(2 cells, threshold 0.50)" in galleries[1].title


def test_galleries_never_show_a_cell_whose_label_is_unknown():
    probs = np.array([[0.9], [0.8], [0.7], [0.2], [0.1]])
    truth = np.array([[1], [0], [0], [1], [0]])  # 0 where unknown, as LabelTable.positives
    known = np.array([[True], [False], [True], [True], [False]])
    galleries = build_galleries(["crack"], [f"c{i}" for i in range(5)], probs, truth, [0.5],
                                lambda i: np.zeros((8, 8), dtype=np.uint8), lambda i: np.ones((1, 2, 2)),
                                known=known)
    by_title = {g.title.split(" (")[0]: [item.name for item in g.items] for g in galleries}
    # c1 would be the most confident false positive, were its unknown label taken for a 0
    assert by_title == {"crack: true positives": ["c0"], "crack: false positives": ["c2"],
                        "crack: false negatives": ["c3"]}


def test_report_on_real_cells_from_the_onnx_model(tiny_onnx, seed_csv, tmp_path):
    from elcell.infer.runtime import open_model

    model = open_model(tiny_onnx)
    rows = seed_rows(seed_csv)[:24]
    cells = np.stack([load_cell(path, Decoding(model.info.decoding.size)) for path, _ in rows])
    probs, heatmaps = model.run(cells, heatmaps=True)
    truth = np.array([labels for _, labels in rows])
    names = [path.name for path, _ in rows]
    thresholds = [float(np.median(probs[:, j])) for j in range(probs.shape[1])]  # some of each kind
    galleries = build_galleries(model.info.labels, names, probs, truth, thresholds,
                                cells.__getitem__, heatmaps.__getitem__, per_gallery=4)
    assert len(galleries) == 6 and sum(len(g.items) for g in galleries) > 6
    out = write_report(tmp_path / "report.html", [Table("Summary", [], [("cells", [len(rows)])])],
                       galleries=galleries)
    parser = parse_report(out)
    shown = [item.name for gallery in galleries for item in gallery.items]
    assert [image["alt"] for image in parser.images] == shown
    assert set(shown) <= set(names)
