"""Overlays, boxes, `elcell explain` and the self-contained HTML report."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elcell.cli import main
from elcell.explain import (
    Gallery,
    GalleryItem,
    build_galleries,
    heatmap_box,
    heatmap_peak,
    overlay_image,
    overlay_png,
    unique_names,
    upsample_heatmap,
    write_report,
)
from elcell.images import load_cell


def seed_rows(seed_csv: Path) -> list[tuple[Path, list[int]]]:
    rows = []
    for line in seed_csv.read_text().splitlines()[1:]:
        path, *labels = line.split(";")
        rows.append((seed_csv.parent / path, [int(v) for v in labels]))
    return rows


# --------------------------------------------------------------------------- heatmaps


def test_upsampling_is_torchs_bilinear():
    import torch
    import torch.nn.functional as F

    heat = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    ours = upsample_heatmap(heat, (17, 40))
    theirs = F.interpolate(torch.from_numpy(heat)[None, None], size=(17, 40), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
    assert ours.shape == (17, 40)
    assert np.abs(ours - theirs).max() < 1e-5


def test_box_surrounds_the_hot_cell_in_image_pixels():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[1, 2] = 2.0  # feature cell covering rows 50..100, columns 50..75 of a 200x100 image
    box = heatmap_box(heat, (200, 100))
    assert box["peak"] == pytest.approx(2.0)
    assert box["peak_x"] == 62 and box["peak_y"] in (74, 75)  # the cell's centre
    assert 40 <= box["x"] < 62 < box["x"] + box["width"] <= 90
    assert 50 <= box["y"] < 75 < box["y"] + box["height"] <= 110
    assert heatmap_box(np.zeros((4, 4)), 64) is None


def test_box_takes_the_region_with_the_most_heat():
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[0, 0] = 1.0  # the single hottest cell
    heat[5:8, 4:8] = 0.8  # a larger region holding more heat in all
    box = heatmap_box(heat, 64, threshold=0.5)
    assert box["x"] >= 28 and box["y"] >= 36  # the large region, not the corner
    assert box["peak_x"] <= 2 and box["peak_y"] <= 2  # the corner's hot plateau, at its centre
    assert heatmap_box(heat, 64, threshold=0.9)["x"] == 0  # only the corner is that hot


def test_peak_of_a_border_plateau_is_its_centre():
    heat = upsample_heatmap(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), 96)
    # The right-hand cell is a plateau from x=80 to the edge: its centre, not its first pixel.
    assert heatmap_peak(heat) == (48, 88)


# --------------------------------------------------------------------------- overlays


def test_overlay_tints_hot_areas_and_leaves_cold_ones_gray():
    cell = np.full((64, 64), 100, dtype=np.uint8)
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[1, 1] = 3.0
    image = overlay_image(cell, heat, prob=0.87, label="crack")
    assert image.mode == "RGB" and image.size == (256, 256)  # enlarged for readable text
    pixels = np.asarray(image).astype(int)
    assert tuple(pixels[128 + 64, 128 + 64]) != (100, 100, 100)  # the hot corner is coloured
    assert pixels[192, 192, 0] > 100  # jet's hot end is red
    assert tuple(pixels[100, 40]) == (100, 100, 100)  # a cold area shows the cell as it is
    png = overlay_png(cell, heat, 0.87, "crack")
    assert Image.open(io.BytesIO(png)).size == (256, 256)


def test_overlay_of_an_all_zero_heatmap_is_the_gray_cell():
    cell = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    image = np.asarray(overlay_image(cell, np.zeros((10, 10)), prob=0.01, label="inactive"))
    assert image.shape == (300, 300, 3)  # large cells keep their size
    middle = image[100:200, 100:200]
    assert (middle[..., 0] == cell[100:200, 100:200]).all() and (middle[..., 1] == middle[..., 2]).all()


def test_unique_names_only_disambiguate_clashes(tmp_path):
    names = unique_names([tmp_path / "a" / "cell 1.png", tmp_path / "b" / "cell 1.png",
                          tmp_path / "cell2.tif"])
    assert names[2] == "cell2"
    assert names[0] != names[1] and all(n.startswith("cell_1_") for n in names[:2])


# --------------------------------------------------------------------------- elcell explain


def test_explain_writes_overlays_heatmaps_and_boxes(tiny_onnx, seed_csv, tmp_path, capsys):
    images = [path for path, _ in seed_rows(seed_csv)[:3]]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "explained"
    status = main(["explain", str(tiny_onnx), *map(str, images), str(bad), "--out", str(out),
                   "--label", "crack"])
    assert status == 1  # finished, but says that one image failed
    assert "broken.png" in capsys.readouterr().err
    assert not list(out.glob("broken*"))
    assert not list(out.glob("*inactive*"))  # only the label asked for
    for image in images:
        record = json.loads((out / f"{image.stem}.json").read_text())
        assert record["image"] == str(image)
        assert record["image_size"] == {"height": 300, "width": 300}  # ELPV cells; boxes are in these
        entry = record["labels"]["crack"]
        assert set(record["labels"]) == {"crack"}
        assert 0 <= entry["probability"] <= 1 and entry["decision"] in ("defect", "review", "ok")
        heatmap = np.load(out / entry["heatmap"])
        assert heatmap.shape == tuple(record["heatmap_shape"]) == (2, 2)  # 64 px model: 2x2
        assert np.isfinite(heatmap).all()
        box = entry["box"]
        if heatmap.max() > 0:
            assert 0 <= box["x"] < box["x"] + box["width"] <= 300
            assert 0 <= box["y"] < box["y"] + box["height"] <= 300
            assert box["peak"] == pytest.approx(float(heatmap.max()), rel=1e-5)
        else:
            assert box is None
        overlay = Image.open(out / entry["overlay"])
        assert overlay.size == (256, 256) and overlay.mode == "RGB"


def test_explain_runs_without_torch_and_explains_every_label(tiny_onnx, seed_csv, tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    for path, _ in seed_rows(seed_csv)[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    code = ("import sys; from elcell.cli import main; "
            f"status = main(['explain', {str(tiny_onnx)!r}, {str(folder)!r}, '--out', {str(out)!r}]); "
            "assert 'torch' not in sys.modules, 'explain imported torch'; sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("*.json"))) == 2
    assert len(list(out.glob("*_crack.png"))) == len(list(out.glob("*_inactive.npy"))) == 2


def test_explain_rejects_an_unknown_label(tiny_onnx, seed_csv, tmp_path, capsys):
    image = seed_rows(seed_csv)[0][0]
    status = main(["explain", str(tiny_onnx), str(image), "--out", str(tmp_path / "o"),
                   "--label", "finger"])
    assert status == 2
    assert "--label finger: the model's labels are crack, inactive" in capsys.readouterr().err


# --------------------------------------------------------------------------- report


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
    metrics = {"cells": 64, "mean F1": 0.71234567, "weighted F1": float("nan"),
               "per label": {"crack": {"precision": 0.5, "recall": 1.0, "support": 12},
                             "inactive": {"precision": 0.25, "recall": 0.5, "support": 4}},
               "thresholds": {"crack": 0.5, "inactive": 0.4}}
    out = write_report(tmp_path / "report" / "report.html", metrics,
                       figures=[("PR curve, crack", curve), ("matplotlib", figure)],
                       galleries=galleries, title="Test <report>")
    parser = parse_report(out)
    alts = [image["alt"] for image in parser.images]
    named = [item.name for gallery in galleries for item in gallery.items]
    assert alts == ["PR curve, crack", "matplotlib", *named]
    text = out.read_text()
    assert "Test &lt;report&gt;" in text and "0.7123" in text and "precision" in text
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


def test_report_on_real_cells_from_the_onnx_model(tiny_onnx, seed_csv, tmp_path):
    from elcell.infer import open_model

    model = open_model(tiny_onnx)
    rows = seed_rows(seed_csv)[:24]
    cells = np.stack([load_cell(path, model.info.image_size) for path, _ in rows])
    probs, heatmaps = model.run(cells, heatmaps=True)
    truth = np.array([labels for _, labels in rows])
    names = [path.name for path, _ in rows]
    thresholds = [float(np.median(probs[:, j])) for j in range(probs.shape[1])]  # some of each kind
    galleries = build_galleries(model.info.labels, names, probs, truth, thresholds,
                                cells.__getitem__, heatmaps.__getitem__, per_gallery=4)
    assert len(galleries) == 6 and sum(len(g.items) for g in galleries) > 6
    out = write_report(tmp_path / "report.html", {"cells": len(rows)}, galleries=galleries)
    parser = parse_report(out)
    shown = [item.name for gallery in galleries for item in gallery.items]
    assert [image["alt"] for image in parser.images] == shown
    assert set(shown) <= set(names)


# --------------------------------------------------------------------------- wired into predict/evaluate


def test_predict_heatmaps_writes_overlays_only_for_cells_not_ok(tiny_onnx, seed_csv, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(tiny_onnx), str(seed_csv), str(broken), "--out", str(out),
                 "--heatmaps", str(tmp_path / "maps"), "--no-progress",
                 "--threshold", "crack=0", "--threshold", "inactive=1", "--review-threshold", "inactive=1"])
    assert code == 1  # the broken image is reported, the rest goes on
    cells = [line.split(";")[0] for line in seed_csv.read_text().splitlines()[1:]]
    overlays = sorted(p.name for p in (tmp_path / "maps").iterdir())
    # every readable cell is `defect` for crack (threshold 0) and `ok` for inactive (threshold 1)
    assert overlays == sorted(f"{Path(c).stem}_crack.png" for c in cells)
    with Image.open(tmp_path / "maps" / overlays[0]) as overlay:
        assert overlay.mode == "RGB" and overlay.size[0] >= 256
    assert f"{len(cells)} heatmap overlays" in capsys.readouterr().err


def test_evaluate_report_shows_metrics_curves_and_the_models_mistakes(tiny_onnx, seed_csv, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out),
                 "--report", "--no-progress"]) == 0
    report = parse_report(out / "report.html")
    text = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['weighted_f1']:.4f}"[:5] in text  # the metrics are in the page
    alts = [image["alt"] for image in report.images]
    assert sum("curve" in alt for alt in alts) == 2  # PR and ROC
    cells = {str(seed_csv.parent / line.split(";")[0]) for line in seed_csv.read_text().splitlines()[1:]}
    shown = [alt for alt in alts if alt.endswith(".png") and "/" in alt]
    assert shown and set(shown) <= cells  # every gallery image is a real evaluated cell
    for label in ("crack", "inactive"):
        for kind in ("true positives", "false positives", "false negatives"):
            assert f"{label}: {kind}" in text
    # evaluated again into the same folder without --report: no page left contradicting metrics.json
    (out / "metrics.json").unlink()
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
