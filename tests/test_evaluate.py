"""`elcell evaluate`: metrics, plots, groups, tuning, the report, on real cells."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_partly_unknown_csv
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, recall_score, roc_auc_score
from test_report import parse_report

from elcell.cells.labels import load_table
from elcell.cli import main
from elcell.infer.modelinfo import read_info
from elcell.infer.runtime import decide


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


@pytest.fixture(scope="module")
def typed_csv(tmp_path_factory, elpv) -> Path:
    """48 real cells with crack/inactive stand-in labels and the ELPV cell type as a group."""
    folder = tmp_path_factory.mktemp("typed")
    rng = np.random.default_rng(3)
    probability = elpv.targets[:, 0]
    lines = ["path,crack,inactive,type"]
    for i in rng.permutation(len(elpv))[:48]:
        shutil.copy(elpv.paths[i], folder / elpv.paths[i].name)
        lines.append(f"{elpv.paths[i].name},{int(probability[i] >= 0.5)},{int(probability[i] == 1)},"
                     f"{elpv.groups[i]}")
    (folder / "broken.png").write_bytes(b"not an image")
    lines.append("broken.png,1,0,mono")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder / "data.csv"


def test_metrics_plots_and_groups(tiny_onnx, typed_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(typed_csv), "--group", "type",
                 "--out", str(out), "--no-progress"]) == 1  # the metrics are written, but leave a cell out
    printed = capsys.readouterr()
    assert "1 of 49 images could not be read" in printed.out and "broken.png" in printed.err
    assert "1 of 49 images could not be read (listed above) and are not in the metrics" in printed.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["crack", "inactive"] and metrics["cells"] == 48
    assert [f["path"] for f in metrics["failed"]] == [str(typed_csv.parent / "broken.png")]

    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 48
    truth = np.array([[int(r["true_crack"]), int(r["true_inactive"])] for r in rows])
    probs = np.array([[float(r["prob_crack"]), float(r["prob_inactive"])] for r in rows])
    predicted = (probs >= 0.5).astype(int)
    for j, label in enumerate(["crack", "inactive"]):
        m = metrics["per_label"][label]
        assert m["f1"] == pytest.approx(f1_score(truth[:, j], predicted[:, j], zero_division=0), abs=1e-4)
        assert m["recall"] == pytest.approx(recall_score(truth[:, j], predicted[:, j], zero_division=0), abs=1e-4)
        assert m["roc_auc"] == pytest.approx(roc_auc_score(truth[:, j], probs[:, j]), abs=1e-3)
        assert m["average_precision"] == pytest.approx(average_precision_score(truth[:, j], probs[:, j]), abs=1e-3)
        cm = m["confusion_matrix"]
        assert cm["tp"] + cm["fn"] == truth[:, j].sum() and sum(cm.values()) == 48
    assert metrics["weighted_f1"] == pytest.approx(
        f1_score(truth, predicted, average="weighted", zero_division=0), abs=1e-4)
    assert metrics["mean_f1"] == pytest.approx(
        f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-4)

    groups = {r["group"] for r in rows}
    assert set(metrics["groups"]) == groups and groups <= {"mono", "poly"}
    assert sum(g["cells"] for g in metrics["groups"].values()) == 48
    for name in ["", *(f"_{g}" for g in groups)]:
        for plot in ("pr_curve", "roc_curve", "confusion_matrix"):
            assert (out / f"{plot}{name}.png").read_bytes()[:4] == b"\x89PNG"
    # again into the same folder without groups: the groups' plots go with their figures
    untyped = typed_csv.parent / "untyped.csv"
    untyped.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in typed_csv.read_text().splitlines()))
    assert main(["evaluate", str(tiny_onnx), "--data", str(untyped), "--out", str(out), "--no-progress"]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == sorted(json.loads((out / "metrics.json").read_text())["plots"])
    assert not list(out.glob("*_mono.png"))


def test_tuned_thresholds_round_trip_into_predict(tiny_onnx, seed_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out), "--no-progress",
                 "--tune-thresholds", "recall=0.9", "--review-band", "recall=0.98"]) == 0
    assert "cells in review" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    tuned = out / f"{tiny_onnx.stem}.tuned.onnx"
    assert metrics["tuning"]["model"] == str(tuned)
    info = read_info(tuned)
    assert info.thresholds == [metrics["thresholds"][label] for label in info.labels]
    assert info.review_thresholds == [metrics["review_thresholds"][label] for label in info.labels]
    assert info.extra["tuning"]["method"] == "recall=0.9"
    assert info.thresholds != read_info(tiny_onnx).thresholds
    for label in info.labels:
        m = metrics["per_label"][label]
        assert m["recall"] >= 0.9 and m["recall_with_review"] >= 0.98
        assert m["review_threshold"] <= m["threshold"]

    # predict picks the tuned thresholds up from the model file
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(tuned), str(seed_csv), "--out", str(preds), "--no-progress"]) == 0
    rows = read_csv(preds)
    probs = np.array([[float(r["prob_crack"]), float(r["prob_inactive"])] for r in rows])
    decisions = np.array([[r["decision_crack"], r["decision_inactive"]] for r in rows])
    # The CSV rounds probabilities to 6 decimals; predict decided on the exact ones,
    # so cells within that rounding of a threshold may legitimately differ.
    high, low = np.array(info.thresholds), np.array(info.review_thresholds)
    clear = (np.abs(probs - high) > 1e-6) & (np.abs(probs - low) > 1e-6)
    assert clear.mean() > 0.8
    assert (decisions == decide(probs, info.thresholds, info.review_thresholds))[clear].all()
    for j, label in enumerate(info.labels):
        cm = metrics["per_label"][label]["confusion_matrix"]
        assert (decisions[:, j] == "defect").sum() == cm["tp"] + cm["fp"]
        assert (decisions[:, j] == "review").sum() == metrics["per_label"][label]["review"]
    in_review = ((decisions == "review").any(1) & ~(decisions == "defect").any(1)).sum()
    assert in_review == metrics["cells_in_review"]


def test_tta_reported_with_and_without(tiny_onnx, seed_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out), "--no-progress",
                 "--tta", "--tune-thresholds", "f1", "--review-band", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "TTA" in text and "without TTA" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] and set(metrics["without_tta"]["per_label"]) == {"crack", "inactive"}
    for label, threshold in metrics["thresholds"].items():
        assert metrics["review_thresholds"][label] == min(0.3, threshold)


def test_user_mistakes_are_one_line_errors(tiny_onnx, seed_csv, tmp_path, capsys):
    assert main(["evaluate", str(tiny_onnx), "--data", "elpv", "--out", str(tmp_path)]) == 2
    assert "none of the model's labels" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--tune-thresholds", "recall"]) == 2
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--review-band", "big"]) == 2
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--group", "type"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("elcell: error:") == 3
    (tmp_path / "a-file").write_text("")  # refused before a cell is scored, naming the option
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(tmp_path / "a-file")]) == 2
    assert "--out " + str(tmp_path / "a-file") + ": exists and is not a folder" in capsys.readouterr().err
    # a column spelt with other capitals would otherwise go unscored with only a note
    misspelt = tmp_path / "misspelt.csv"
    misspelt.write_text(seed_csv.read_text().replace("crack", "Crack", 1))
    assert main(["evaluate", str(tiny_onnx), "--data", str(misspelt), "--out", str(tmp_path / "ev")]) == 2
    assert "column 'Crack' differs from the model's label 'crack' only in case" in capsys.readouterr().err
    # a column that is no label of the model is scored by nothing: said, not silently left
    extra = tmp_path / "extra.csv"
    lines = seed_csv.read_text().splitlines()
    extra.write_text(f"{lines[0]};defect\n" + "".join(f"{seed_csv.parent / line};{i % 2}\n"
                                                      for i, line in enumerate(lines[1:])))
    assert main(["evaluate", str(tiny_onnx), "--data", str(extra), "--out", str(tmp_path / "ex"), "--no-progress"]) == 0
    assert "data columns that are not the model's labels (not evaluated): ['defect']" in capsys.readouterr().out


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
    # written for people: readable headings, no raw keys of metrics.json, file names as captions
    for heading in ("Summary", "Per label", "cells for a person to review", "recall counting review"):
        assert heading in text
    for key in ("labels_not_in_data", "per_label", "cells_in_review", "recall_with_review", "colours relative"):
        assert key not in text
    captions = re.findall(r"<figcaption>([^<]*)<br>", text)
    assert captions and all("/" not in caption for caption in captions)  # the full path is the tooltip
    assert "overflow-x:auto" in text and "max-width:1100px" in text  # wide tables scroll, not the page
    # evaluated again into the same folder without --report: no page left contradicting metrics.json
    (out / "metrics.json").unlink()
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()


def test_review_is_its_own_decision_and_a_model_leaving_no_cell_ok_is_warned_about(tiny_onnx, seed_csv,
                                                                                  tmp_path, capsys):
    out = tmp_path / "eval"
    # a review band from probability 0 up: every cell is defect or review for every label
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out),
                 "--review-band", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: no cell is ok: all 64 are defect or review" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cells_ok"] == 0
    for label, m in metrics["per_label"].items():
        decided = m["decisions"]
        assert decided["ok"]["ok"] == decided["defect"]["ok"] == 0, label  # nothing is counted as ok
        assert decided["ok"]["review"] + decided["defect"]["review"] == m["review"]
        assert sum(decided["defect"].values()) == m["positives"]
        assert decided["defect"]["defect"] == m["confusion_matrix"]["tp"]
    predictions = read_csv(out / "predictions.csv")
    assert all(row[f"decision_{label}"] != "ok" for row in predictions for label in metrics["labels"])
    with Image.open(out / "confusion_matrix.png") as plot:
        assert plot.width > plot.height  # ok / review / defect side by side for each label
    # the same model at its own thresholds leaves cells ok, and says nothing
    assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out),
                 "--no-progress"]) == 0
    assert "no cell is ok" not in capsys.readouterr().err


# --------------------------------------------------------------------------- unknown labels
@pytest.fixture(scope="module")
def partly_unknown_csv(tmp_path_factory, seed_csv) -> Path:
    return write_partly_unknown_csv(tmp_path_factory.mktemp("unknown"), seed_csv)


def test_unknown_labels_are_left_out_of_each_labels_metrics_and_counted(tiny_onnx, partly_unknown_csv, tmp_path,
                                                                         capsys):
    """crack is unknown on every third cell, inactive on the others: each label is
    scored on its known cells, and every output says how many were unknown."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(partly_unknown_csv), "--out", str(out),
                 "--report", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_csv(out / "predictions.csv")
    assert metrics["cells"] == len(rows) == 64
    f1s = []
    for label, unknown in (("crack", 22), ("inactive", 42)):
        known = np.array([r[f"true_{label}"] != "" for r in rows])  # unknown stays empty
        truth = np.array([int(r[f"true_{label}"]) for r in rows if r[f"true_{label}"]])
        probs = np.array([float(r[f"prob_{label}"]) for r in rows])[known]
        m = metrics["per_label"][label]
        assert (~known).sum() == m["unknown"] == unknown and m["cells"] == 64 - unknown
        assert m["positives"] == truth.sum() and sum(m["confusion_matrix"].values()) == m["cells"]
        f1s.append(f1_score(truth, probs >= 0.5, zero_division=0))
        assert m["f1"] == pytest.approx(f1s[-1], abs=1e-4)
        assert m["roc_auc"] == pytest.approx(roc_auc_score(truth, probs), abs=1e-3)
    assert metrics["mean_f1"] == pytest.approx(np.mean(f1s), abs=1e-4)
    assert "unk" in printed and "crack 22, inactive 42" in printed
    report = (out / "report.html").read_text()
    assert "unknown (not scored)" in report and "crack 22, inactive 42" in report


def test_a_label_column_left_empty_is_not_scored_and_keeps_its_threshold(tiny_onnx, seed_csv, tmp_path, capsys):
    data = write_partly_unknown_csv(tmp_path, seed_csv, inactive_column=True)
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(data), "--out", str(out),
                 "--tune-thresholds", "f1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    crack, inactive = metrics["per_label"]["crack"], metrics["per_label"]["inactive"]
    assert crack["cells"] == 64 and crack["unknown"] == 0 and "note" not in crack
    assert inactive["cells"] == 0 and inactive["unknown"] == 64 and "not scored" in inactive["note"]
    assert inactive["roc_auc"] is None and metrics["mean_f1"] == pytest.approx(crack["f1"])  # not a 0 in the mean
    tuning = metrics["tuning"]["per_label"]
    assert tuning["inactive"]["note"].startswith("no known cells: threshold kept at ")
    assert tuning["inactive"]["threshold"] == read_info(tiny_onnx).thresholds[1]
    assert "inactive 64" in printed and "no known cells: threshold kept at" in printed
    assert all(row["true_inactive"] == "" for row in read_csv(out / "predictions.csv"))


def test_int8_comparison_scores_the_known_cells(model, partly_unknown_csv):
    from elcell.infer.quantize import compare, format_comparison

    comparison = compare(model, model, load_table(partly_unknown_csv), progress=False)
    assert comparison["per_label"]["crack"]["unknown"] == 22
    assert comparison["per_label"]["inactive"]["unknown"] == 42
    assert comparison["cells"] == 64 and comparison["decision_agreement"] == 1.0  # same model twice
    comparison.update(calibration="cal.csv", calibration_cells=8, calibration_failed=[])
    assert "unk" in format_comparison(comparison)


def test_evaluate_report_keeps_markup_in_names_and_errors_as_text(tiny_onnx, seed_csv, tmp_path):
    """Issue 34: a data file and an unreadable image named like markup (the image's
    error message repeats its name) appear in report.html as text, never as tags."""
    cells = [seed_csv.parent / line.split(";")[0] for line in seed_csv.read_text().splitlines()[1:9]]
    broken = tmp_path / "<img src=x onerror=alert(1)>.png"
    broken.write_bytes(b"<script>alert(2)</script> is no image")
    data = tmp_path / "<b>shift 3.csv"  # no "/": it is a file name
    data.write_text("path;crack;inactive\n" + "".join(f"{p};0;0\n" for p in [*cells, broken]))
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_onnx), "--data", str(data), "--out", str(out), "--report",
                 "--no-progress"]) == 1  # an unreadable image: not whole metrics
    text = (out / "report.html").read_text()
    for markup in ("<img src=x", "<b>shift", "<script>"):
        assert markup not in text, markup
    assert "Images that could not be read" in text and "&lt;b&gt;shift 3.csv" in text
    row = re.search(r"<tr><th>([^<]*onerror[^<]*)</th><td>([^<]*)</td></tr>", text)
    assert row and row.group(1).endswith("&lt;img src=x onerror=alert(1)&gt;.png")
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in row.group(2)  # the error names the file, escaped
    report = parse_report(out / "report.html")  # tags nest; no script, link or iframe
    assert "b" not in report.tags and all(image["src"].startswith("data:") for image in report.images)


def test_recall_estimator_reaches_the_tuned_model(tiny_onnx, seed_csv, tmp_path):
    """--recall-estimator expected counts one more positive than there are: its
    thresholds are never above the empirical ones, and the model records it."""
    tuned = {}
    for estimator in ("empirical", "expected"):
        out = tmp_path / estimator
        assert main(["evaluate", str(tiny_onnx), "--data", str(seed_csv), "--out", str(out), "--no-progress",
                     "--tune-thresholds", "recall=0.9", "--recall-estimator", estimator]) == 0
        info = read_info(out / f"{tiny_onnx.stem}.tuned.onnx")
        assert info.extra["tuning"]["estimator"] == estimator
        tuned[estimator] = np.array(info.thresholds)
    assert (tuned["expected"] <= tuned["empirical"]).all()
    assert (tuned["expected"] < tuned["empirical"]).any()
