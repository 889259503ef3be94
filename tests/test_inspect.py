"""`elcell inspect` and `elcell segment` on module photos assembled from real
ELPV cells and on the real module photos, with the tiny trained model."""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_geometry import POLY_X_AT_Y860
from test_report import parse_report

from elcell.cells.images import Decoding, to_cell
from elcell.cli import main
from elcell.infer.runtime import open_model
from elcell.pvmodules.grading import load_rules
from elcell.pvmodules.judge import inspect_module
from elcell.pvmodules.synthetic import assemble_module

DATA = Path(__file__).parent / "data" / "modules"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


@pytest.fixture(scope="module")
def originals(elpv, tmp_path_factory) -> list[Path]:
    """60 real ELPV cells, a third of them defective, copied to files as a user has them."""
    rng = np.random.default_rng(3)
    defective = np.flatnonzero(elpv.targets[:, 0] >= 0.5)
    intact = np.flatnonzero(elpv.targets[:, 0] < 0.5)
    index = rng.permutation(np.concatenate([rng.choice(defective, 20, replace=False),
                                            rng.choice(intact, 40, replace=False)]))
    folder = tmp_path_factory.mktemp("originals")
    paths = []
    for k, i in enumerate(index):
        paths.append(folder / f"cell{k:02d}.png")
        shutil.copy(elpv.paths[i], paths[-1])
    return paths


def assembled(originals: list[Path], folder: Path, name: str, bit_depth: int = 8, seed: int = 0,
              **camera) -> tuple[Path, object]:
    cells = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in originals]
    image, truth = assemble_module(cells, 6, 10, bit_depth=bit_depth, seed=seed, **camera)
    path = folder / f"{name}.png"
    cv2.imwrite(str(path), image)
    return path, truth


# 16-bit: test_geometry finds 16-bit modules and test_runtime decodes 16-bit cells in the fast
# tier; the whole command on a 16-bit photo runs in the slow tier
@pytest.mark.parametrize("bit_depth", [8, pytest.param(16, marks=pytest.mark.slow)])
def test_every_cell_is_found_and_judged_as_predict_judges_the_original(tiny_onnx, model, originals, tmp_path,
                                                                       bit_depth):
    module, truth = assembled(originals, tmp_path, "module", bit_depth, seed=bit_depth, rotation_deg=7,
                              perspective=0.03, illumination=0.25, noise=0.02)
    out = tmp_path / "inspected"
    assert main(["inspect", str(tiny_onnx), str(module), "--grid", "6x10", "--out", str(out)]) == 0
    cells = read_csv(out / "cells.csv")
    assert len(cells) == 60 and {(int(c["row"]), int(c["col"])) for c in cells} == \
        {(r, c) for r in range(1, 7) for c in range(1, 11)}
    width = np.linalg.norm(truth.corners[0, 0, 1] - truth.corners[0, 0, 0])
    for row in cells:
        r, c = int(row["row"]) - 1, int(row["col"]) - 1
        corners = np.array([float(row[k]) for k in ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3")]).reshape(4, 2)
        assert np.linalg.norm(corners.mean(axis=0) - truth.centres[r, c]) < 0.05 * width
    assert main(["predict", str(tiny_onnx), *map(str, originals), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    predicted = read_csv(tmp_path / "p.csv")
    for label, threshold in zip(model.info.labels, model.info.thresholds):
        # the photo's tilt, light and noise move a probability a little; a decision
        # far from its threshold must not move at all
        cut = np.array([float(row[f"prob_{label}"]) for row in cells])
        original = np.array([float(predicted[(int(row["row"]) - 1) * 10 + int(row["col"]) - 1][f"prob_{label}"])
                             for row in cells])
        assert np.corrcoef(cut, original)[0, 1] >= 0.95 and np.abs(cut - original).mean() <= 0.05, label
        clear = np.abs(original - threshold) >= 0.15
        assert clear.sum() >= 10 and np.array_equal((cut >= threshold)[clear], (original >= threshold)[clear]), label
    module_row = read_csv(out / "modules.csv")[0]
    assert module_row["grid"] == "6x10" and module_row["grade"] and module_row["rule"].startswith("rule ")
    assert int(module_row["defect_crack"]) == sum(row["decision_crack"] == "defect" for row in cells)
    with Image.open(out / "maps" / "module.png") as picture:
        assert picture.format == "PNG" and picture.width >= 1000
    page = (out / "report.html").read_text()
    sources = [part.split('"')[0] for part in page.split('src="')[1:]]
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)  # self-contained


def test_the_real_poly_module_is_cut_where_its_gaps_are(tiny_onnx, tmp_path):
    out = tmp_path / "poly"
    assert main(["inspect", str(tiny_onnx), str(DATA / "poly-6x10-A1.jpg"), "--grid", "6x10", "--out",
                 str(out), "--no-map"]) == 0
    cells = read_csv(out / "cells.csv")
    # row 4 spans y = 860, where test_geometry states the gaps' x (measured by hand): each cell's
    # left and right edges there lie on those gaps, give or take half a gap
    pitch = (POLY_X_AT_Y860[-1] - POLY_X_AT_Y860[0]) / 10
    for cell in (c for c in cells if c["row"] == "4"):
        col = int(cell["col"])
        left = (float(cell["x0"]) + float(cell["x3"])) / 2
        right = (float(cell["x1"]) + float(cell["x2"])) / 2
        assert abs(left - POLY_X_AT_Y860[col - 1]) < 0.05 * pitch and abs(right - POLY_X_AT_Y860[col]) < 0.05 * pitch
    assert all(0 <= float(c["dark_area"]) <= 1 for c in cells)
    assert not (out / "maps").exists()  # --no-map


def test_the_map_takes_one_view_unless_told_more(tiny_onnx):
    from elcell.cli import build_parser
    from elcell.infer.runtime import score_cells

    model = open_model(tiny_onnx)
    image = cv2.imread(str(DATA / "poly-6x10-A1.jpg"), cv2.IMREAD_GRAYSCALE)
    found = {views: inspect_module(model, image, 6, 10, load_rules(), map_views=views, thresholds=[0.5, 0.5],
                                   map_detail="fine") for views in (1, None)}
    places = found[1].flagged()
    assert places and list(found[1].heatmaps) == places == list(found[None].heatmaps)
    cells = [found[1].cells[r][c] for r, c in places]
    for views, expected in ((1, 1), (None, model.heatmap_views)):  # None: the model's own
        maps = score_cells(model, cells, heatmaps=True, map_views=expected, map_detail="fine").heatmaps
        np.testing.assert_allclose(np.stack([found[views].heatmaps[p] for p in places]), maps, atol=1e-6)
    assert not np.allclose(found[1].heatmaps[places[0]], found[None].heatmaps[places[0]], atol=1e-4)
    parse = build_parser().parse_args
    assert parse(["inspect", "m.onnx", "x.jpg", "--grid", "6x10", "--out", "o"]).map_views == 1
    assert parse(["inspect", "m.onnx", "x.jpg", "--grid", "6x10", "--out", "o"]).map_detail == "coarse"
    assert parse(["serve", "m.onnx", "--map-detail", "fine"]).map_detail == "fine"
    assert parse(["serve", "m.onnx", "--map-views", "8"]).map_views == 8
    with pytest.raises(SystemExit):
        parse(["inspect", "m.onnx", "x.jpg", "--grid", "6x10", "--out", "o", "--map-views", "3"])


def test_bad_photos_are_named_and_the_others_go_on(tiny_onnx, originals, tmp_path, capsys, monkeypatch):
    good, _ = assembled(originals, tmp_path, "good")
    black = tmp_path / "black.png"
    Image.new("L", (800, 500)).save(black)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 800), dtype=np.uint8)).save(noise)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:5000])
    cut_off = tmp_path / "cut_off.png"
    picture = cv2.imread(str(good), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(cut_off), picture[:, picture.shape[1] // 3:])
    huge = tmp_path / "huge.png"
    Image.new("L", (4000, 3000)).save(huge)
    import elcell.cells.images

    monkeypatch.setattr(elcell.cells.images, "MAX_PIXELS", 10_000_000)
    out = tmp_path / "out"
    inputs = [black, noise, truncated, cut_off, DATA / "mono-2x2-MMEL1.jpg", huge, good]
    assert main(["inspect", str(tiny_onnx), *map(str, inputs), "--grid", "6x10", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    modules = {row["module"]: row for row in read_csv(out / "modules.csv")}
    expected = {"black": "no module found", "noise": "no module found", "truncated": "not a readable image",
                "cut_off": "cut off at the image edge", "mono-2x2-MMEL1": "no dark gap between cells",
                "huge": "more than the 10 million elcell reads"}
    for name, message in expected.items():
        assert message in modules[name]["error"], name
        assert f"{name}" in err and not modules[name]["grade"]
    assert modules["good"]["grade"] and not modules["good"]["error"]
    assert {row["module"] for row in read_csv(out / "cells.csv")} == {"good"}
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["good.png"]  # nothing half-written


def test_the_report_shows_file_names_and_errors_as_text_not_markup(tiny_onnx, tmp_path):
    """Photos named like markup, two that cannot be read (a truncated real photo; a
    file that is no image, whose error repeats its name) and a real one that can:
    report.html shows their names and errors escaped, and holds no markup of theirs."""
    photos = tmp_path / "photos"
    photos.mkdir()
    truncated = photos / "<img src=x onerror=alert(1)>.jpg"
    truncated.write_bytes((DATA / "mono-2x2-MMEL1.jpg").read_bytes()[:5000])
    not_an_image = photos / "<svg onload=alert(2)>.png"
    not_an_image.write_bytes(b"<script>alert(3)</script>")
    readable = photos / "<b onmouseover=alert(4)>poly.jpg"
    shutil.copy(DATA / "poly-6x10-A1.jpg", readable)
    out = tmp_path / "out"
    assert main(["inspect", str(tiny_onnx), str(photos), "--grid", "6x10", "--out", str(out)]) == 1
    modules = {row["path"]: row for row in read_csv(out / "modules.csv")}
    assert "not a readable image" in modules[str(truncated)]["error"]
    assert str(not_an_image) in modules[str(not_an_image)]["error"]  # the error text names the file
    assert modules[str(readable)]["grade"]
    page = (out / "report.html").read_text(encoding="utf-8")
    for markup in ("<img src=x", "<svg onload", "<script>", "<b onmouseover"):
        assert markup not in page
    for path in (truncated, not_an_image, readable):
        assert html.escape(str(path)) in page
    assert html.escape(modules[str(not_an_image)]["error"]) in page
    parser = parse_report(out / "report.html")  # tags nest, no scripts, every image embedded
    assert not parser.tags & {"svg", "b"} and len(parser.images) >= 1


@pytest.mark.slow  # inspects 3 modules twice; predict's resume is in the fast tier
def test_an_interrupted_run_resumes_where_it_stopped(tiny_onnx, originals, tmp_path, monkeypatch, capsys):
    photos = [assembled(originals, tmp_path, f"m{i}", seed=i, rotation_deg=3 * i)[0] for i in range(3)]
    clean = tmp_path / "clean"
    assert main(["inspect", str(tiny_onnx), *map(str, photos), "--grid", "6x10", "--out", str(clean),
                 "--no-map"]) == 0
    import elcell.pvmodules.inspect

    real, calls = elcell.pvmodules.inspect.inspect_module, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(elcell.pvmodules.inspect, "inspect_module", stop_at_third)
    out = tmp_path / "out"
    args = ["inspect", str(tiny_onnx), *map(str, photos), "--grid", "6x10", "--out", str(out), "--no-map"]
    assert main(args) == 130
    assert [row["module"] for row in read_csv(out / "modules.csv")] == ["m0", "m1"]
    monkeypatch.undo()
    assert main(args) == 2  # an earlier run's folder needs --resume or --overwrite
    with open(out / "cells.csv", "a") as handle:  # cells of a module whose row never came: done again
        handle.write(open(clean / "cells.csv").read().splitlines()[-1] + "\n")
    assert main([*args, "--resume"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_csv(out / "modules.csv")) == strip(read_csv(clean / "modules.csv"))
    assert read_csv(out / "cells.csv") == read_csv(clean / "cells.csv")
    # resumed with another layout or map choice: the folder would mix them
    capsys.readouterr()
    assert main([*args, "--resume", "--grid", "10x6"]) == 2
    assert "were cut as --grid 6x10, not 10x6" in capsys.readouterr().err
    assert main([*args[:-1], "--resume"]) == 2
    assert "finished modules have no maps in maps/" in capsys.readouterr().err
    # the pictures of a module cut off before its row are not kept for a run without maps
    (out / "maps").mkdir()
    (out / "maps" / "m9.png").write_bytes(b"a map of a module that never got its row")
    assert main([*args, "--resume"]) == 0
    assert not (out / "maps" / "m9.png").exists()
    # another photo under a name the folder holds (a camera's counter restarted): skipped and said
    (tmp_path / "camera2").mkdir()
    again = tmp_path / "camera2" / photos[0].name
    again.write_bytes(photos[1].read_bytes())
    capsys.readouterr()
    assert main(["inspect", str(tiny_onnx), str(again), "--grid", "6x10", "--out", str(out), "--no-map",
                 "--resume"]) == 1
    assert f"already holds a module named 'm0', from {photos[0]}" in capsys.readouterr().err
    assert strip(read_csv(out / "modules.csv")) == strip(read_csv(clean / "modules.csv"))


def test_half_cells_are_found_and_stretched_to_the_models_square(tiny_onnx, originals, monkeypatch):
    cells = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in originals]
    image, truth = assemble_module(cells, 6, 24, split_gap=True, rotation_deg=-4, perspective=0.02, seed=5)
    model = open_model(tiny_onnx)
    warps, real_warp = [], cv2.warpPerspective
    monkeypatch.setattr(cv2, "warpPerspective", lambda *a, **k: warps.append(a[2]) or real_warp(*a, **k))
    found = inspect_module(model, image, 6, 24, load_rules(), want_map=True)
    assert found.probs.shape == (6, 24, 2) and found.map is not None
    assert warps == [found.geometry.size]  # the photo is warped once: grid, cells and map share it
    half = found.cells[0][0]
    assert half.shape[0] > 1.6 * half.shape[1]  # rectangular: twice as tall as wide
    square = to_cell(half, Decoding(64))
    assert square.shape == (64, 64)  # stretched, not padded: no band of fill on either side
    assert np.abs(square[:, :4].astype(int).mean() - square[:, -4:].astype(int).mean()) < 60
    width = np.linalg.norm(truth.corners[0, 0, 1] - truth.corners[0, 0, 0])
    centres = found.corners.mean(axis=2)
    assert np.linalg.norm(centres - truth.centres, axis=-1).max() < 0.05 * width


def test_grades_follow_the_users_rules(tiny_onnx, originals, tmp_path, capsys):
    module, _ = assembled(originals, tmp_path, "module")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - grade: X\n    when: cells == 60 and ok_cells + defect_cells + review_cells == 60\n"
                     "    because: every cell counted\n  - grade: A\n    when: true\n")
    out = tmp_path / "out"
    assert main(["inspect", str(tiny_onnx), str(module), "--grid", "6x10", "--out", str(out), "--no-map",
                 "--rules", str(rules)]) == 0
    row = read_csv(out / "modules.csv")[0]
    assert (row["grade"], row["rule"]) == ("X", "rule 1: every cell counted")
    rules.write_text("rules:\n  - grade: C\n    when: cells > 100\n")  # no rule for this module
    assert main(["inspect", str(tiny_onnx), str(module), "--grid", "6x10", "--out", str(tmp_path / "none"),
                 "--no-map", "--rules", str(rules), "--threshold", "crack=0"]) == 0  # every cell a crack
    assert "module: warning: no rule matched, no grade" in capsys.readouterr().err
    page, row = (tmp_path / "none" / "report.html").read_text(), read_csv(tmp_path / "none" / "modules.csv")[0]
    assert "module: no grade: no rule matched" in page and row["defect_cells"] == "60"
    assert "60 cells flagged or in review; no overlays (inspected without maps)" in page  # not "none flagged"
    assert "(0 overlays)" not in page
    for text, message in (("rules:\n  - grade: A\n    when: defect_cells >\n", "cannot read when"),
                          ("rules:\n  - grade: A\n    when: __import__('os')\n", "cannot read when"),
                          ("rules:\n  - grade: A\n    when: cracks >= 1\n", "unknown name 'cracks'"),
                          ("rules:\n  - grade: A\n    when: defect_crak >= 1\n", "did you mean 'defect_crack'?"),
                          ("grades: []\n", "expected 'rules:'"), ("rules:\n  - when: true\n", "needs 'grade'")):
        rules.write_text(text)
        assert main(["inspect", str(tiny_onnx), str(module), "--grid", "6x10", "--out", str(tmp_path / "x"),
                     "--rules", str(rules)]) == 2
        assert message in capsys.readouterr().err, text


@pytest.mark.slow  # trains on the cut cells
def test_segment_cuts_cells_keeping_their_depth_and_the_labels_train(tiny_onnx, originals, elpv, tmp_path):
    module, _ = assembled(originals, tmp_path, "deep", bit_depth=12)
    out = tmp_path / "cells"
    assert main(["segment", str(module), "--grid", "6x10", "--out", str(out)]) == 0
    rows = read_csv(out / "labels.csv")
    assert len(rows) == 60 and rows[0]["path"] == "deep_r01_c01.png" and rows[-1]["path"] == "deep_r06_c10.png"
    assert {row["crack"] for row in rows} == {""} and set(rows[0]) == {"path", "crack", "inactive"}
    with Image.open(out / rows[0]["path"]) as cell:
        assert cell.mode.startswith("I;16") and max(cell.size) > 200  # 16-bit, at the photo's resolution
    # a person fills the labels in (here: ELPV's own, the cells were laid out row by row) and trains
    truth = {path.name: float(target) for path, target in zip(elpv.paths, elpv.targets[:, 0], strict=True)}
    lines = ["path;crack;inactive"]
    for row, original in zip(rows, originals, strict=True):
        target = truth[_source_name(original, elpv)]
        lines.append(f"{row['path']};{int(target >= 0.5)};{int(target == 1.0)}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    assert main(["train", "--recipe", "quick", "--data", str(out / "labels.csv"), "--out", str(tmp_path / "run"),
                 "--image-size", "32", "--epochs", "1", "--bit-depth", "12", "--batch-size", "16",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cells"]["train"] > 40
    # with --model the labels are its decisions: defect 1, ok 0, review left for a person
    filled = tmp_path / "filled"
    assert main(["segment", str(module), "--grid", "6x10", "--out", str(filled), "--model", str(tiny_onnx),
                 "--labels", "ignored"]) == 0
    inspected = tmp_path / "inspected"
    assert main(["inspect", str(tiny_onnx), str(module), "--grid", "6x10", "--out", str(inspected),
                 "--no-map"]) == 0
    answer = {"defect": "1", "ok": "0", "review": ""}
    by_path = {row["path"]: row for row in read_csv(filled / "labels.csv")}  # in review order, with a reason
    assert len(by_path) == 60
    for cell in read_csv(inspected / "cells.csv"):
        row = by_path[f"deep_r{int(cell['row']):02d}_c{int(cell['col']):02d}.png"]
        assert [row["crack"], row["inactive"]] == [answer[cell["decision_crack"]], answer[cell["decision_inactive"]]]
        assert row["reason"]


def _source_name(copy: Path, elpv) -> str:
    """The ELPV file a copied cell came from (same bytes)."""
    data = copy.read_bytes()
    return next(p.name for p in elpv.paths if p.stat().st_size == len(data) and p.read_bytes() == data)


def test_the_coarse_map_comes_from_the_pass_that_scores_the_cells(tiny_onnx, tmp_path, monkeypatch):
    """The default map: each flagged cell's coarse map, read from the one call that
    scores every cell (no second pass, no backward pass); a model exported before
    coarse maps existed gives its fine map."""
    import onnx
    import onnx.utils

    from elcell.infer.runtime import score_cells

    model = open_model(tiny_onnx)
    image = cv2.imread(str(DATA / "poly-6x10-A1.jpg"), cv2.IMREAD_GRAYSCALE)
    fine = inspect_module(model, image, 6, 10, load_rules(), thresholds=[0.5, 0.5], map_detail="fine")
    calls = []
    monkeypatch.setattr(model, "_heatmaps", lambda images, coarse=False, run=model._heatmaps:
                        calls.append((len(images), coarse)) or run(images, coarse))
    found = inspect_module(model, image, 6, 10, load_rules(), thresholds=[0.5, 0.5])
    assert calls == [(60, True)]  # every cell, once
    places = found.flagged()
    assert places == fine.flagged() and list(found.heatmaps) == places
    np.testing.assert_allclose(found.probs, fine.probs, atol=1e-6)
    cells = [found.cells[r][c] for r, c in places]
    coarse = score_cells(model, cells, heatmaps=True, map_views=1, map_detail="coarse").heatmaps
    assert coarse.shape[2:] == (1, 1) and fine.heatmaps[places[0]].shape[1:] == (4, 4)  # 32 px: /32 and /8
    np.testing.assert_allclose(np.stack([found.heatmaps[p] for p in places]), coarse, rtol=1e-4, atol=1e-6)
    graph = onnx.load(str(tiny_onnx))  # as exported before coarse maps: no such output, the fine map
    older = onnx.utils.Extractor(graph).extract_model(["images"], ["probs", "heatmap"])
    older.metadata_props.extend(graph.metadata_props)
    onnx.save(older, tmp_path / "older.onnx")
    old_model = open_model(tmp_path / "older.onnx")
    assert not old_model.has_coarse
    old = inspect_module(old_model, image, 6, 10, load_rules(), thresholds=[0.5, 0.5])
    assert old.map_detail == "fine" and found.map_detail == "coarse"
    np.testing.assert_allclose(old.heatmaps[places[0]], fine.heatmaps[places[0]], rtol=1e-4, atol=1e-6)
    # more than one view asks for the fine map
    many = inspect_module(model, image, 6, 10, load_rules(), thresholds=[0.5, 0.5], map_views=None)
    assert many.map_detail == "fine" and many.heatmaps[places[0]].shape == fine.heatmaps[places[0]].shape


def test_segment_with_no_readable_photo_leaves_no_labels_csv(tmp_path, capsys):
    bad = tmp_path / "notimg.png"
    bad.write_text("not a picture")
    out = tmp_path / "cells"
    assert main(["segment", str(bad), "--grid", "6x10", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "notimg.png" in err and "labels.csv not written" in err
    assert not (out / "labels.csv").exists()  # the corrected rerun needs no --overwrite
