"""`--out *.parquet` and `--ray`: predict and inspect on a local Ray (2 CPUs)
against the local path, on real ELPV cells and the real module photos; a Ray
run killed with SIGKILL and resumed; every Parquet file read back with pyarrow."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elcell.cli import main

REPO = Path(__file__).resolve().parents[1]
MODULES = REPO / "tests" / "data" / "modules"


@pytest.fixture(scope="module")
def cells(seed_csv, tmp_path_factory) -> Path:
    """A folder of 64 real cells and one corrupt file."""
    folder = tmp_path_factory.mktemp("archive")
    for path in sorted((seed_csv.parent / "cells").glob("*.png")):
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module's tests, sized as the brief's machine: the
    commands join it (they would start their own otherwise)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle, delimiter=";")}


def read_parquet(path: Path, key: str = "path") -> dict[str, dict]:
    rows = pq.read_table(path).to_pylist()
    assert len({row[key] for row in rows}) == len(rows), "a row written twice"
    return {row[key]: row for row in rows}


def assert_same_predictions(local: dict[str, dict], other: dict[str, dict]) -> None:
    """Same rows (any order), probabilities within 1e-5, same decisions and errors."""
    assert set(other) == set(local)
    for path, row in local.items():
        theirs = other[path]
        assert bool(row["error"]) == bool(theirs["error"]), path
        for column, value in row.items():
            if column.startswith("prob_") and value not in ("", None):
                assert abs(float(value) - float(theirs[column])) <= 1e-5, (path, column)
            elif column.startswith("decision_") or column in ("model", "thresholds"):
                assert (value or "") == (theirs[column] or ""), (path, column)


# --------------------------------------------------------------------------- Parquet, no Ray
def test_parquet_holds_the_csv_rows_typed_and_resumes(tiny_onnx, cells, tmp_path, capsys):
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(tmp_path / "p.csv")]) == 1
    out = tmp_path / "p.parquet"
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(out)]) == 1
    table = pq.read_table(out)
    assert table.schema.field("prob_crack").type == pa.float64()
    assert table.schema.field("decision_crack").type == pa.string()
    local, rows = read_csv(tmp_path / "p.csv"), read_parquet(out)
    assert_same_predictions(local, rows)
    broken = rows[str(cells / "broken.png")]
    assert "not a readable image" in broken["error"] and broken["prob_crack"] is None
    assert sum(row["error"] is None for row in rows.values()) == 64
    assert not out.with_name("p.parquet.parts").exists()
    # the finished cells are skipped; the broken one is tried again and still holds one row
    capsys.readouterr()
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(out), "--resume"]) == 1
    assert "64 were already in" in capsys.readouterr().err
    assert_same_predictions(local, read_parquet(out))
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(out)]) == 2  # neither --resume nor --overwrite


def test_parquet_parts_a_merge_already_took_are_not_counted_twice(tmp_path):
    """A kill between the merge's rename and its removal of the parts leaves both;
    the merged file's record tells resume which parts it holds. An earlier
    run's failed row is dropped once this run has tried the file again."""
    from elcell.infer.tables import ParquetRows

    header = ["path", "prob_crack", "error", "model", "thresholds"]
    out = tmp_path / "x.parquet"
    sink = ParquetRows(out, header, key="path", rows_per_part=2)
    sink.write([["a.png", "0.25", "", "m@1", "t"], ["b.png", "", "unreadable", "m@1", "t"]])
    sink.write([["c.png", "0.75", "", "m@1", "t"]])
    sink.flush()
    kept = tmp_path / "kept"
    shutil.copytree(sink.parts, kept)
    sink.close()
    shutil.copytree(kept, sink.parts)  # as if killed before the parts were removed
    again = ParquetRows(out, header, key="path", rows_per_part=2)
    assert sorted(again.previous(["path"]).column("path").to_pylist()) == ["a.png", "c.png"]
    assert not any(again.parts.glob("*.parquet"))
    again.write([["b.png", "0.5", "", "m@1", "t"]])
    again.close()
    rows = read_parquet(out)
    assert sorted(rows) == ["a.png", "b.png", "c.png"] and rows["b.png"]["prob_crack"] == 0.5
    assert rows["a.png"]["error"] is None and isinstance(rows["c.png"]["prob_crack"], float)


@pytest.mark.slow
def test_predict_without_ray_never_imports_it(tiny_onnx, cells, tmp_path):
    code = ("import sys; from elcell.cli import main; main(sys.argv[1:]); "
            "sys.exit(3 if 'ray' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code, "predict", str(tiny_onnx), str(cells / "broken.png"),
                           str(next(cells.glob("cell*.png"))), "--out", str(tmp_path / "p.parquet")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_ray_scores_the_same_rows_as_the_local_path(tiny_onnx, cells, ray_address, tmp_path, capsys):
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(tmp_path / "local.csv")]) == 1
    local = read_csv(tmp_path / "local.csv")
    ray_parquet = tmp_path / "ray.parquet"
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(ray_parquet), "--ray", "--batch-size", "8"]) == 1
    rows = read_parquet(ray_parquet)
    assert_same_predictions(local, rows)
    assert "not a readable image" in rows[str(cells / "broken.png")]["error"]
    assert main(["predict", str(tiny_onnx), str(cells), "--out", str(tmp_path / "ray.csv"), "--ray",
                 "--actors", "1", "--threads", "2"]) == 1
    assert_same_predictions(local, read_csv(tmp_path / "ray.csv"))
    with open(tmp_path / "ray.csv", encoding="utf-8") as ours, open(tmp_path / "local.csv", encoding="utf-8") as theirs:
        assert ours.readline() == theirs.readline()  # the same columns, in the same order
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert main(["predict", str(tiny_onnx), str(cells), "--ray", "--heatmaps", str(tmp_path / "h")]) == 2


@pytest.mark.slow
def test_a_killed_ray_run_resumes_where_it_stopped(tiny_onnx, cells, ray_address, tmp_path):
    """The driver is killed (SIGKILL) once a part is on disk; --resume keeps the
    finished parts, scores the rest and leaves each cell once."""
    many = tmp_path / "many"
    many.mkdir()
    originals = sorted(cells.glob("cell*.png"))
    for k in range(1200):  # hard links: an archive's worth of names without the disk
        os.link(originals[k % len(originals)], many / f"c{k:04d}.png")
    out = tmp_path / "run.parquet"
    command = [sys.executable, "-m", "elcell.cli", "predict", str(tiny_onnx), str(many), "--out", str(out),
               "--ray", ray_address, "--batch-size", "4", "--actors", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out.with_name("run.parquet.parts")
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))) and process.poll() is None:
        assert time.monotonic() < deadline, "no part written in 4 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, process.stderr.read().decode()
    assert not out.exists()
    finished = sum(pq.read_metadata(part).num_rows for part in parts.glob("part-*.parquet"))
    assert 0 < finished < 1200
    assert main(["predict", str(tiny_onnx), str(many), "--out", str(out), "--ray", "--resume"]) == 0
    rows = read_parquet(out)
    assert len(rows) == 1200 and not parts.exists()
    assert main(["predict", str(tiny_onnx), *map(str, originals), "--out", str(tmp_path / "local.csv")]) == 0
    local = read_csv(tmp_path / "local.csv")
    for path, row in rows.items():  # each name scored as its original was
        original = str(originals[int(Path(path).stem[1:]) % len(originals)])
        assert abs(row["prob_crack"] - float(local[original]["prob_crack"])) <= 1e-5


@pytest.mark.slow
def test_a_warning_said_in_a_ray_worker_reaches_the_user(tiny_onnx, cells, ray_address, tmp_path, capsys,
                                                          monkeypatch):
    """A 12-bit camera's cells in 16-bit files: the decoding task meets the low
    range, and the driver says so once, as the local path does (workers' stderr
    goes to Ray's logs only)."""
    import cv2

    import elcell.cells.images

    monkeypatch.setattr(elcell.cells.images, "_warned_low_range", False)
    twelve = tmp_path / "twelve"
    twelve.mkdir()
    for path in sorted(cells.glob("cell*.png"))[:6]:
        cv2.imwrite(str(twelve / path.name), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16)
    capsys.readouterr()
    assert main(["predict", str(tiny_onnx), str(twelve), "--out", str(tmp_path / "p.csv"), "--ray",
                 "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("16-bit image whose largest value is") == 1 and "train with --bit-depth" in err


@pytest.mark.slow
def test_inspect_on_ray_matches_the_local_path_on_real_photos(tiny_onnx, ray_address, tmp_path, capsys,
                                                              monkeypatch):
    """A real photo as a 12-bit camera stores it (16-bit PNG, values 0..4095) and an
    unusable one: the same rows both ways, and the low-range warning, met in an
    actor, said once by the driver."""
    import cv2

    import elcell.cells.images

    photos = tmp_path / "photos"
    photos.mkdir()
    gray = cv2.imread(str(MODULES / "poly-6x10-A1.jpg"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(photos / "poly-6x10-A1.png"), gray.astype(np.uint16) * 16)
    (photos / "unusable.jpg").write_bytes(b"not a photo")
    args = ["inspect", str(tiny_onnx), str(photos), "--grid", "6x10"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 1
    monkeypatch.setattr(elcell.cells.images, "_warned_low_range", False)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray"]) == 1
    assert capsys.readouterr().err.count("16-bit image whose largest value is") == 1
    for name, key in (("cells.csv", ("module", "row", "col")), ("modules.csv", ("module",))):
        local, ray = (sorted(csv.DictReader(open(tmp_path / where / name, encoding="utf-8"), delimiter=";"),
                             key=lambda row: tuple(row[k] for k in key)) for where in ("local", "ray"))
        assert len(local) == len(ray) == (60 if name == "cells.csv" else 2)
        for ours, theirs in zip(local, ray, strict=True):
            for column, value in ours.items():
                if column.startswith("prob_"):
                    assert abs(float(value) - float(theirs[column])) <= 1e-5
                elif column != "seconds":
                    assert value == theirs[column], (name, column)
    assert (tmp_path / "ray" / "maps" / "poly-6x10-A1.png").is_file()
    assert (tmp_path / "ray" / "report.html").is_file()
    # Parquet: one row per cell with its module's grade; the unusable photo one row with its error
    assert main([*args, "--out", str(tmp_path / "modules.parquet"), "--ray"]) == 1
    table = pq.read_table(tmp_path / "modules.parquet").to_pylist()
    grade = next(csv.DictReader(open(tmp_path / "local" / "modules.csv", encoding="utf-8"), delimiter=";"))
    poly = [row for row in table if row["module"] == "poly-6x10-A1"]
    assert len(poly) == 60 and {row["grade"] for row in poly} == {grade["grade"]}
    assert sorted((row["row"], row["col"]) for row in poly) == [(r, c) for r in range(1, 7) for c in range(1, 11)]
    unusable = [row for row in table if row["module"] == "unusable"]
    assert len(unusable) == 1 and unusable[0]["error"] and unusable[0]["row"] is None
    assert np.isclose(sum(row["dark_area"] for row in poly) / 60, float(grade["dark_area"]), atol=1e-4)
    # resumed with another layout: refused before anything is cut
    assert main([*args, "--out", str(tmp_path / "modules.parquet"), "--resume", "--grid", "10x6"]) == 2
