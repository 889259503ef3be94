"""The runtime: an ONNX model scoring decoded cells, test-time augmentation, decisions."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from helpers import read_rows
from PIL import Image

from elcell.cells.images import Decoding, load_cell
from elcell.cli import main
from elcell.infer.predict import csv_header
from elcell.infer.runtime import open_model


def test_tta_averages_flips(tiny_onnx, model, cell_folder, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress", "--tta"]) == 0
    header, rows = read_rows(out)
    assert header == csv_header(["crack", "inactive"], tta=True)
    assert "prob_crack_no_tta" in header
    images = np.stack([load_cell(row["path"], Decoding(model.info.decoding.size)) for row in rows])
    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([model.run(f) for f in flips], axis=0)
    got = np.array([[float(row["prob_crack"]), float(row["prob_inactive"])] for row in rows])
    plain = np.array([[float(row["prob_crack_no_tta"]), float(row["prob_inactive_no_tta"])] for row in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(plain, model.run(images), atol=2e-6)


def test_sixteen_bit_cells_scaled_by_their_depth(tiny_onnx, elpv, tmp_path):
    """A 16-bit cell holding the 8-bit values x 257 is the same picture: same probabilities."""
    folder = tmp_path / "depth"
    folder.mkdir()
    for source in elpv.paths[:4]:
        pixels = np.asarray(Image.open(source).convert("L"), dtype=np.uint16)
        shutil.copy(source, folder / f"{source.stem}_8bit.png")
        Image.fromarray(pixels * 257).save(folder / f"{source.stem}_16bit.png")
        assert Image.open(folder / f"{source.stem}_16bit.png").mode.startswith("I;16")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(folder), "--out", str(out), "--no-progress"]) == 0
    _, rows = read_rows(out)
    probs = {Path(row["path"]).stem: (row["prob_crack"], row["prob_inactive"]) for row in rows}
    for source in elpv.paths[:4]:
        assert probs[f"{source.stem}_16bit"] == probs[f"{source.stem}_8bit"]


def test_tta_of_a_rotation_trained_model_averages_all_eight_symmetries(tiny_onnx, cell_folder, tmp_path):

    from elcell.infer.modelinfo import read_info, write_info

    assert read_info(tiny_onnx).extra["rotate90"] is False  # trained without rotations
    rotated = tmp_path / "rotate90.onnx"
    write_info(tiny_onnx, rotated, replace(read_info(tiny_onnx), extra={"rotate90": True}))
    model = open_model(rotated)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(rotated), str(cell_folder), "--out", str(out), "--no-progress", "--tta"]) == 0
    _, rows = read_rows(out)
    images = np.stack([load_cell(row["path"], Decoding(model.info.decoding.size)) for row in rows])
    views = [np.rot90(flipped, k, axes=(1, 2)) for flipped in (images, images[:, :, ::-1]) for k in range(4)]
    expected = np.mean([model.run(v) for v in views], axis=0)
    got = np.array([[float(row["prob_crack"]), float(row["prob_inactive"])] for row in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_heatmaps_in_a_few_calls_equal_one_call(model, seed_csv, monkeypatch):
    """Heatmaps are computed HEATMAP_CELLS cells a call (memory); the split changes nothing."""
    import elcell.infer.runtime as runtime
    from elcell.cells.labels import read_labels_csv

    size = model.decoding.size
    cells = np.stack([load_cell(path, model.decoding) for path in read_labels_csv(seed_csv).paths[:20]])
    assert cells.shape == (20, size, size)
    monkeypatch.setattr(runtime, "HEATMAP_CELLS", 1000)
    whole_probs, whole_maps = model.run(cells, heatmaps=True)
    monkeypatch.setattr(runtime, "HEATMAP_CELLS", 6)  # 6 + 6 + 6 + 2
    probs, maps = model.run(cells, heatmaps=True)
    assert probs.shape == whole_probs.shape and maps.shape == whole_maps.shape == (20, 2, *whole_maps.shape[2:])
    np.testing.assert_allclose(probs, whole_probs, atol=1e-6)
    np.testing.assert_allclose(maps, whole_maps, atol=1e-5 * float(np.abs(whole_maps).max()))


def test_a_model_that_averages_its_views_in_the_graph_is_run_once(tiny_onnx, model, seed_csv, tmp_path):
    """Models exported before the runtime averaged views say `views` without
    `graph_views`: their graph did every view, so the runtime runs it as it is."""
    from elcell.cells.labels import read_labels_csv
    from elcell.infer.modelinfo import read_info, write_info

    info = read_info(tiny_onnx)
    settings = {k: v for k, v in info.extra["heatmap"].items() if k != "graph_views"}
    older = tmp_path / "older.onnx"
    write_info(tiny_onnx, older, replace(info, extra={**info.extra, "heatmap": settings}))
    old = open_model(older)
    assert (old.graph_views, old.heatmap_views) == (settings["views"], settings["views"]) and settings["views"] > 1
    cells = np.stack([load_cell(path, model.decoding) for path in read_labels_csv(seed_csv).paths[:6]])
    graph_only = model.run(cells, heatmaps=True, views=1)[1]  # this graph maps one view
    for views in (None, 1, 8):
        np.testing.assert_allclose(old.run(cells, heatmaps=True, views=views)[1], graph_only, atol=1e-6)
    assert not np.allclose(model.run(cells, heatmaps=True)[1], graph_only, atol=1e-4)
