"""`elcell predict`: the streaming, resumable CSV writer, on real ELPV cells with the tiny trained model."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import read_rows, seed_rows, write_partly_unknown_csv
from PIL import Image

from elcell.cells.images import Decoding, find_images, load_cell
from elcell.cells.labels import load_table
from elcell.cli import main
from elcell.errors import DataError
from elcell.infer.runtime import Model, decide, parse_thresholds


def test_predict_labels_csv_schema_and_probabilities(tiny_onnx, model, seed_csv, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(seed_csv), "--out", str(out), "--no-progress",
                 "--batch-size", "5"]) == 0
    header, rows = read_rows(out)
    assert header == ["path", "prob_crack", "prob_inactive", "decision_crack", "decision_inactive", "error",
                      "model", "thresholds"]
    # every row names the model that judged it (file and weights hash) and its thresholds
    assert {(row["model"], row["thresholds"]) for row in rows} == \
        {(f"{tiny_onnx.name}@{model.info.identity[:16]}", "crack=0.5/0.5 inactive=0.5/0.5")}
    table = load_table(seed_csv)
    assert [row["path"] for row in rows] == [str(p) for p in table.paths]  # relative to the CSV, in order
    probs = np.array([[float(row["prob_crack"]), float(row["prob_inactive"])] for row in rows])
    expected = model.run(np.stack([load_cell(p, Decoding(model.info.decoding.size)) for p in table.paths]))
    np.testing.assert_allclose(probs, expected, atol=2e-6)  # batching does not change a cell's result
    decisions = decide(probs, model.info.thresholds, model.info.review_thresholds)
    assert [[row["decision_crack"], row["decision_inactive"]] for row in rows] == decisions.tolist()
    assert all(row["error"] == "" for row in rows)
    assert "CPUExecutionProvider" in capsys.readouterr().err  # says which provider runs


def test_a_labels_csv_with_unknown_labels_is_just_a_list_of_cells(tiny_onnx, seed_csv, tmp_path):
    """predict reads only the paths of a labels CSV: empty (unknown) labels change
    nothing, even a row with no label at all (which training refuses)."""
    labels = write_partly_unknown_csv(tmp_path, seed_csv)
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].split(";")[0] + ";;"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(labels), "--out", str(out), "--no-progress"]) == 0
    _, rows = read_rows(out)
    assert [row["path"] for row in rows] == [str(path) for path, _ in seed_rows(seed_csv)]
    assert all(row["error"] == "" and 0 <= float(row["prob_inactive"]) <= 1 for row in rows)


def test_bad_images_reported_not_fatal(tiny_onnx, cell_folder, tmp_path, capsys):
    (cell_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (cell_folder / "row2" / "empty.jpg").write_bytes(b"")
    Image.new("L", (300, 4)).save(cell_folder / "sliver.png")  # an image, but no cell
    good = sorted(p for p in cell_folder.rglob("cell*.png"))
    truncated = cell_folder / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress",
                 "--batch-size", "4", "--workers", "2"]) == 1
    _, rows = read_rows(out)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert len(rows) == 16  # recursive: 12 cells + 4 bad files, each once
    bad = {"corrupt.png", "empty.jpg", "sliver.png", "truncated.png"}
    for name in bad:
        assert by_name[name]["error"] and by_name[name]["prob_crack"] == "" and by_name[name]["decision_crack"] == ""
    for name, row in by_name.items():
        if name not in bad:
            assert row["error"] == "" and 0 <= float(row["prob_crack"]) <= 1
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    assert "4 of 16 images failed" in err


def test_threshold_override_and_review_band(tiny_onnx, model, cell_folder, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress",
                 "--threshold", "0", "--threshold", "inactive=1", "--review-threshold", "inactive=0"]) == 0
    _, rows = read_rows(out)
    assert {row["decision_crack"] for row in rows} == {"defect"}
    assert {row["decision_inactive"] for row in rows} == {"review"}
    assert parse_thresholds(["0.3", "crack=0.7"], ["crack", "inactive"], [0.5, 0.5]) == [0.7, 0.3]
    for bad in (["cracks=0.3"], ["1.5"], ["crack=x"]):
        with pytest.raises(DataError):
            parse_thresholds(bad, ["crack", "inactive"], [0.5, 0.5])
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--threshold", "cracks=0.3"]) == 2


def test_resume_after_crash_drops_half_line_and_retries_failures(tiny_onnx, cell_folder, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "preds.csv"
    reference = tmp_path / "reference.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(reference), "--no-progress"]) == 0
    _, expected = read_rows(reference)

    # crash in the third batch: the two batches before it are on disk already
    calls = itertools.count()
    real_run = Model.run

    def crashing_run(self, images, heatmaps=False):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, images, heatmaps)

    monkeypatch.setattr(Model, "run", crashing_run)
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress",
                 "--batch-size", "3"]) == 130
    monkeypatch.undo()
    _, partial = read_rows(out)
    assert partial == expected[:6]

    # a crash mid-write leaves half a line; an image that failed before is retried
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    model_and_thresholds = lines[1].rstrip("\n").split(";")[-2:]
    failed = ";".join([lines[2].split(";")[0], "", "", "", "", "not a readable image (was broken)",
                       *model_and_thresholds]) + "\n"
    out.write_text(lines[0] + lines[1] + failed + "".join(lines[3:]) + expected[6]["path"][:10])
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress",
                 "--resume"]) == 0
    header, resumed = read_rows(out)
    assert sorted(resumed, key=lambda r: r["path"]) == sorted(expected, key=lambda r: r["path"])
    assert out.read_text().count("path;") == 1


def test_resume_refuses_another_model_or_other_thresholds(tiny_onnx, model, cell_folder, tmp_path, capsys):
    """A resumed CSV holds one model's decisions: a tuned copy, a changed
    threshold or a retrained model are refused, and the file is left as it was."""
    import onnx

    from elcell.infer.modelinfo import write_info

    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir(), rest.mkdir()
    for i, path in enumerate(sorted(find_images([cell_folder]))):
        shutil.copy(path, (first if i < 6 else rest) / path.name)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(first), "--out", str(out), "--no-progress"]) == 0
    before = out.read_text()
    _, rows = read_rows(out)
    probs = sorted(float(row["prob_crack"]) for row in rows)
    between = (probs[2] + probs[3]) / 2  # a threshold that changes the decision of three cells

    tuned = tmp_path / "tuned.onnx"
    write_info(tiny_onnx, tuned, replace(model.info, thresholds=[between, 0.5], review_thresholds=[between, 0.5]))
    retrained = onnx.load(str(tiny_onnx))  # the same graph and metadata, other weights
    bias = next(t for t in retrained.graph.initializer if t.name.endswith("bias") and t.dims == [2])
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(retrained, str(tmp_path / "retrained.onnx"))
    for args, message in (([str(tiny_onnx), "--threshold", f"crack={between}"], "made with other thresholds"),
                          ([str(tuned)], "made with other thresholds"),
                          ([str(tmp_path / "retrained.onnx")], "written by another model")):
        assert main(["predict", *args, str(rest), "--out", str(out), "--resume", "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert out.read_text() == before
    assert main(["predict", str(tiny_onnx), str(first), str(rest), "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    assert "predicted 6 cells in" in (err := capsys.readouterr().err) and "(6 were already in" in err
    assert len(read_rows(out)[1]) == 12


def test_existing_output_needs_resume_or_overwrite(tiny_onnx, cell_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("something\n")
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--resume"]) == 2
    assert out.read_text() == "something\n"  # a foreign file is not touched
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert main(["predict", str(tiny_onnx), str(tmp_path / "nowhere")]) == 2
    assert main(["predict", str(tmp_path / "missing.onnx"), str(cell_folder)]) == 2
    # nothing is left behind by options that cannot work
    with pytest.raises(SystemExit) as stopped:  # argparse's own one line, as for any malformed option
        main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(tmp_path / "b.csv"), "--batch-size", "0"])
    assert stopped.value.code == 2 and "argument --batch-size: 0: need at least 1" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "is a folder: give the CSV file to write" in capsys.readouterr().err
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(tmp_path / "band.csv"),
                 "--threshold", "crack=0.3", "--review-threshold", "crack=0.6", "--no-progress"]) == 0
    assert "crack: review threshold 0.6 is above the threshold 0.3" in capsys.readouterr().err
    (tmp_path / "run.ckpt").write_bytes(b"a checkpoint")
    assert main(["predict", str(tmp_path / "run.ckpt"), str(cell_folder)]) == 2
    assert f"export it first: elcell export {tmp_path / 'run.ckpt'}" in capsys.readouterr().err


@pytest.mark.slow  # starts a process
def test_predict_into_a_closed_pipe_ends_quietly(tiny_onnx, seed_csv):
    """`elcell predict MODEL CELLS | head -c 1`: no traceback, the status a shell gives."""
    code = "import sys; from elcell.cli import main; sys.exit(main())"
    # 64 writes of one row: the reader is gone long before the last
    process = subprocess.Popen([sys.executable, "-c", code, "predict", str(tiny_onnx), str(seed_csv),
                                "--no-progress", "--batch-size", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(1) == b"p"  # the header's first byte; then the reader goes away
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and "Traceback" not in stderr


@pytest.mark.slow
def test_predict_and_evaluate_import_no_torch(tiny_onnx, seed_csv, tmp_path):
    code = (
        "import sys\n"
        "from elcell.cli import main\n"
        f"assert main(['predict', {str(tiny_onnx)!r}, {str(seed_csv)!r}, '--no-progress',"
        f" '--out', {str(tmp_path / 'p.csv')!r}]) == 0\n"
        f"assert main(['evaluate', {str(tiny_onnx)!r}, '--data', {str(seed_csv)!r}, '--no-progress',"
        f" '--out', {str(tmp_path / 'eval')!r}, '--tune-thresholds', 'f1']) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # as after `pip install .`: a command that needs the training packages says so in one line
    blocked = ("import sys\nfor name in ('torch', 'lightning', 'kornia', 'torchmetrics'): sys.modules[name] = None\n"
               f"{code.splitlines()[1]}\nsys.exit(main(sys.argv[1:]))")
    for command in (["export", str(tmp_path / "x.ckpt")], ["train", "--data", str(seed_csv)],
                    ["pretrain", "--data", str(seed_csv)]):
        result = subprocess.run([sys.executable, "-c", blocked, *command], capture_output=True, text=True)
        assert result.returncode == 2, (command, result.stderr[-1000:])
        assert result.stderr.startswith("elcell: error: this command trains or exports"), command


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
    # --heatmaps naming a file: refused by name before the CSV is begun, so the same command can be rerun
    again = tmp_path / "again.csv"
    assert main(["predict", str(tiny_onnx), str(seed_csv), "--out", str(again), "--heatmaps", str(out)]) == 2
    assert f"--heatmaps {out}: exists and is not a folder" in capsys.readouterr().err and not again.exists()
    assert main(["predict", str(tiny_onnx), str(seed_csv), "--out", str(tmp_path / "p.json")]) == 2
    assert "predict writes CSV (FILE.csv) or Parquet (FILE.parquet), not JSON" in capsys.readouterr().err


def test_a_run_folder_stands_for_its_model_and_a_second_model_is_not_read_as_an_image(
        tiny_run, tiny_onnx, cell_folder, tmp_path, capsys):
    by_file, by_run = tmp_path / "file.csv", tmp_path / "run.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(by_file), "--no-progress"]) == 0
    assert main(["predict", str(tiny_run), str(cell_folder), "--out", str(by_run), "--no-progress"]) == 0
    assert read_rows(by_file) == read_rows(by_run)
    # `predict runs/x/best_model_epoch*.onnx cells/` after export --int8 matched two models
    int8 = tiny_run / f"{tiny_onnx.stem}.int8.onnx"
    shutil.copy(tiny_onnx, int8)
    try:
        assert main(["predict", str(tiny_onnx), str(int8), str(cell_folder), "--no-progress"]) == 2
    finally:
        int8.unlink()
    err = capsys.readouterr().err
    assert f"{int8}: a model, not an image; give one model, then the images" in err


def test_a_threshold_that_leaves_no_cell_ok_is_warned_about(tiny_onnx, cell_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--no-progress",
                 "--review-threshold", "0"]) == 0
    assert "no cell is ok" not in capsys.readouterr().err  # 12 cells: too few to call it a pattern
    many = tmp_path / "many"
    for i in range(2):
        shutil.copytree(cell_folder, many / str(i))
    assert main(["predict", str(tiny_onnx), str(many), "--out", str(out), "--overwrite", "--no-progress",
                 "--review-threshold", "0"]) == 0
    assert "warning: no cell is ok: all 24 are defect or review" in capsys.readouterr().err
    assert main(["predict", str(tiny_onnx), str(many), "--out", str(out), "--overwrite",
                 "--no-progress", "--threshold", "0.99", "--review-threshold", "0.99"]) == 0
    assert "no cell is ok" not in capsys.readouterr().err  # thresholds under which most cells are ok


def test_resume_matches_files_not_the_text_typed(tiny_onnx, cell_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "preds.csv"
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(tiny_onnx), "cells", "--out", "preds.csv", "--no-progress"]) == 0
    rows = read_rows(out)
    # the same cells typed another way (absolute): nothing scored twice
    assert main(["predict", str(tiny_onnx), str(cell_folder), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert read_rows(out) == rows
    # rows typed relative to another folder cannot be matched from here: refused, not doubled
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["predict", str(tiny_onnx), "../cells", "--out", "../preds.csv", "--resume"]) == 2
    assert "resume from the folder the first run ran in" in capsys.readouterr().err
    assert read_rows(out) == rows
