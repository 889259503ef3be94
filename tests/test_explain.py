"""`elcell explain`: overlays, raw heatmaps and boxes per image and label."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import seed_rows
from PIL import Image

from elcell.cli import main


def test_explain_writes_overlays_heatmaps_and_boxes(tiny_onnx, seed_csv, tmp_path, capsys):
    images = [path for path, _ in seed_rows(seed_csv)[:3]]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "explained"
    status = main(["explain", str(tiny_onnx), *map(str, images), str(bad), "--out", str(out),
                   "--label", "crack"])
    assert status == 1  # finished, but says that one image failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "4 images; labels ['crack']" in err and "explained 3 images x 1 label in" in err
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
        assert heatmap.shape == tuple(record["heatmap_shape"]) == (4, 4)  # 32 px model: stride 8
        assert np.isfinite(heatmap).all()
        box = entry["box"]
        if heatmap.max() > 0:
            assert 0 <= box["x"] < box["x"] + box["width"] <= 300
            assert 0 <= box["y"] < box["y"] + box["height"] <= 300
            assert box["peak"] == pytest.approx(float(heatmap.max()), rel=1e-5)
        else:
            assert box is None
        overlay = Image.open(out / entry["overlay"])
        assert overlay.size[0] == 300 and overlay.mode == "RGB"  # on the cell at its own resolution
        assert "LayerCAM" in record["heatmap_note"] and "stride 8" in record["heatmap_note"]


@pytest.mark.slow  # starts a process
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


def test_a_folder_explained_into_itself_does_not_take_its_overlays_for_cells(tiny_onnx, seed_csv, tmp_path,
                                                                              capsys):
    cells = tmp_path / "cells"
    cells.mkdir()
    for image in [path for path, _ in seed_rows(seed_csv)[:2]]:
        shutil.copy(image, cells / image.name)
    for _ in range(2):  # the second run finds the first one's overlays under cells/explained
        assert main(["explain", str(tiny_onnx), str(cells), "--out", str(cells / "explained")]) == 0
        assert "explained 2 images" in capsys.readouterr().err
    assert not list((cells / "explained").glob("*_crack_crack*"))
    # --out the searched folder itself, or one above it: its images still count
    for out in (cells, tmp_path):
        shutil.rmtree(cells / "explained")
        assert main(["explain", str(tiny_onnx), str(cells), "--out", str(out), "--label", "crack"]) == 0
        assert "explained 2 images" in capsys.readouterr().err
        for made in [*cells.glob("*_crack.png"), *cells.glob("*.json"), *cells.glob("*.npy")]:
            made.unlink()
        (cells / "explained").mkdir()


def test_an_output_path_through_a_file_is_one_line_not_a_traceback(tiny_onnx, seed_csv, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file where a folder is needed")
    image = seed_rows(seed_csv)[0][0]
    assert main(["explain", str(tiny_onnx), str(image), "--out", str(tmp_path / "notes.txt" / "why")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"elcell: error: --out {tmp_path / 'notes.txt' / 'why'}: "
                                    f"{tmp_path / 'notes.txt'} is a file, not a folder")
