"""`elcell train --folds K` end to end on real ELPV cells: every cell scored out
of fold once, pooled figures that match the rows, recall-first thresholds in
each fold's model, and a protocol that continues where it stopped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from elcell.cells.labels import read_labels_csv
from elcell.cli import main
from elcell.infer.modelinfo import read_info
from elcell.judging.intervals import point_figures, read_scored

pytestmark = pytest.mark.slow

TINY = ["--recipe", "spec", "--backbone", "test_resnet", "--pretrained", "none", "--image-size", "64",
        "--batch-size", "16", "--epochs", "1", "--lr", "1e-3", "--val-fraction", "0.25",
        "--threshold-recall", "0.95", "--review-recall", "0.99", "--threshold-estimator", "expected",
        "--no-progress"]


@pytest.fixture(scope="module")
def protocol(tmp_path_factory, seed_csv):
    out = tmp_path_factory.mktemp("kfold") / "kf"
    assert main(["train", "--data", str(seed_csv), "--folds", "3", "--out", str(out), *TINY]) == 0
    return out


def test_every_cell_is_scored_once_by_the_model_that_did_not_train_on_it(protocol, seed_csv):
    oof = read_scored(protocol / "oof.csv")
    cells = read_labels_csv(seed_csv)
    assert sorted(oof.paths) == sorted(str(p) for p in cells.paths)
    for fold in range(3):
        split = (protocol / f"fold{fold}" / "split.csv").read_text().splitlines()[1:]
        trained_on = {line.split(";")[0] for line in split if line.split(";")[1] != "test"}
        scored_here = {p for p, f in zip(oof.paths, oof.folds) if f == fold}
        assert scored_here and not scored_here & trained_on
        assert scored_here == {line.split(";")[0] for line in split if line.split(";")[1] == "test"}


def test_pooled_figures_are_those_of_the_out_of_fold_rows_with_intervals(protocol):
    report = json.loads((protocol / "kfold.json").read_text())
    assert report["finished"] == [0, 1, 2] and report["cells"] == 64
    figures = point_figures(read_scored(protocol / "oof.csv"))
    for name, pooled in report["pooled"].items():
        if figures[name] is None:  # no figure where a label has no positive (AUC) in these cells
            assert pooled["value"] is None, name
            continue
        assert pooled["value"] == pytest.approx(figures[name]), name
        if pooled["low"] is not None:
            assert pooled["low"] <= pooled["value"] + 1e-9 and pooled["value"] <= pooled["high"] + 1e-9, name
    spread = report["spread"]["mean_f1/at_0.5"]
    per_fold = [report["per_fold"][str(f)]["mean_f1/at_0.5"] for f in range(3)]
    assert spread["mean"] == pytest.approx(np.mean(per_fold)) and spread["min"] == min(per_fold)


def test_each_fold_model_carries_thresholds_for_recall_on_its_validation_cells(protocol):
    for fold in range(3):
        run = protocol / f"fold{fold}"
        summary = json.loads((run / "summary.json").read_text())
        info = read_info(run / summary["onnx"])
        chosen = summary["thresholds"]
        assert info.thresholds == [chosen[label]["threshold"] for label in info.labels]
        assert info.review_thresholds == [chosen[label]["review_threshold"] for label in info.labels]
        assert info.extra["tuning"]["estimator"] == "expected"
        val = json.loads((run / "eval" / "val" / "metrics.json").read_text())
        for label, m in val["per_label"].items():
            if m["positives"]:
                assert m["recall"] >= 0.95 and m["recall_with_review"] >= 0.99, (fold, label)
        # the test cells are judged at those stored thresholds
        test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
        assert test["thresholds"] == {label: chosen[label]["threshold"] for label in info.labels}


def test_the_same_command_skips_finished_folds_and_resumes_a_stopped_one(protocol, seed_csv, capsys):
    before = (protocol / "oof.csv").read_text()
    (protocol / "fold2" / "summary.json").unlink()  # fold 2 stopped after its last epoch's checkpoint
    assert main(["train", "--data", str(seed_csv), "--folds", "3", "--out", str(protocol), *TINY]) == 0
    err = capsys.readouterr().err
    assert "fold 0: finished earlier, skipped" in err and "fold 1: finished earlier, skipped" in err
    assert "fold 2: resuming from" in err
    assert (protocol / "fold2" / "summary.json").is_file()
    assert read_scored(protocol / "oof.csv").paths == read_scored(before_file(protocol, before)).paths


def before_file(protocol, text):
    path = protocol.parent / "before.csv"
    path.write_text(text)
    return path


def test_a_fold_that_never_finished_an_epoch_starts_again(protocol, seed_csv, capsys):
    shutil.rmtree(protocol / "fold1" / "checkpoints")
    (protocol / "fold1" / "summary.json").unlink()
    assert main(["train", "--config", str(protocol / "kfold.yaml")]) == 0  # the hint the refusal gives
    err = capsys.readouterr().err
    assert "fold 1 of 3: training into" in err and "resuming" not in err
    assert (protocol / "fold1" / "checkpoints" / "last.ckpt").is_file()


def test_one_fold_alone_trains_into_the_protocol_folder(protocol, seed_csv, capsys):
    shutil.rmtree(protocol / "fold0")
    assert main(["train", "--data", str(seed_csv), "--folds", "3", "--fold", "0", "--out", str(protocol),
                 *TINY]) == 0
    err = capsys.readouterr().err
    assert "fold 0 of 3: training into" in err and "fold 1" not in err
    assert (protocol / "fold0" / "summary.json").is_file()
    assert json.loads((protocol / "kfold.json").read_text())["finished"] == [0, 1, 2]


def test_other_options_are_refused_with_what_changed(protocol, seed_csv, capsys):
    code = main(["train", "--data", str(seed_csv), "--folds", "3", "--out", str(protocol),
                 *TINY[:-3], "--epochs", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "epochs 1 (now 3)" in err and f"--config {protocol / 'kfold.yaml'}" in err


def test_fold_and_test_fraction_need_a_protocol(seed_csv, tmp_path, capsys):
    assert main(["train", "--data", str(seed_csv), "--fold", "1", "--out", str(tmp_path / "a"), *TINY]) != 0
    assert "--fold 1 needs --folds K" in capsys.readouterr().err
    assert main(["train", "--data", str(seed_csv), "--folds", "3", "--test-fraction", "0.2",
                 "--out", str(tmp_path / "b"), *TINY]) != 0
    assert "leave --test-fraction at 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_protocol_folder_under_a_file_is_refused_before_any_cell_is_read(seed_csv, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr("elcell.training.kfold.prepare", lambda *a, **k: pytest.fail("cells were read"))
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "kf"
    assert main(["train", "--data", str(seed_csv), "--folds", "3", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: {tmp_path / 'a-file'} is a file, not a folder" in err and "Traceback" not in err


def test_compare_gives_paired_intervals_and_gates_on_require(protocol, seed_csv, tmp_path, capsys):
    fold0, fold1 = protocol / "fold0", protocol / "fold1"
    code = main(["compare", str(fold0), str(fold1), "--data", str(seed_csv), "--out", str(tmp_path / "cmp"),
                 "--require", "recall=crack", "--no-progress"])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["cells"] == 64 and "crack/own_recall" in result["required"]
    recall = result["figures"]["crack/own_recall"]
    assert recall["low"] <= recall["difference"] <= recall["high"]
    assert code == (1 if recall["verdict"] == "worse" else 0)
    assert "crack/roc_auc" in out and "B - A" in out
    rows = (tmp_path / "cmp" / "disagreements.csv").read_text().splitlines()
    assert len(rows) - 1 == result["disagreements"]
    # a model against itself: no difference, nothing to refuse
    assert main(["compare", str(fold0), str(fold0), "--data", str(seed_csv), "--require", "f1=crack,inactive",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 cells decided differently" in out and "A and B are the same model" in out


def test_compare_of_protocols_reads_their_out_of_fold_scores(protocol, capsys):
    assert main(["compare", str(protocol), str(protocol / "oof.csv")]) == 0
    assert "64 cells both scored" in capsys.readouterr().out
    assert main(["compare", str(protocol / "fold0"), str(protocol)]) == 2
    assert "give --data" in capsys.readouterr().err


def test_a_student_learns_the_fold_models_mean_on_its_train_cells(protocol, seed_csv, tmp_path, capsys):
    from elcell.infer.runtime import open_model
    from elcell.training.distill import teacher_models, teacher_probs

    cells = read_labels_csv(seed_csv)
    models = teacher_models(str(protocol))
    assert [m.parent.name for m in models] == ["fold0", "fold1", "fold2"]
    mean = teacher_probs(models, cells)
    one = np.array([open_model(m).run(_cell(cells.paths[0], m))[0] for m in models])
    assert np.allclose(mean[0], one.mean(axis=0), atol=1e-5)

    from elcell.training.config import TrainConfig
    from elcell.training.distill import taught

    split = np.where(np.arange(len(cells)) % 4 == 0, "val", "train")
    blended = taught(TrainConfig(teacher=str(protocol), teacher_weight=0.25), cells, split)
    train = split == "train"
    assert np.allclose(blended.targets[train], 0.25 * mean[train] + 0.75 * cells.targets[train], atol=1e-6)
    assert np.array_equal(blended.targets[~train], cells.targets[~train])

    out = tmp_path / "student"
    assert main(["train", "--data", str(seed_csv), "--teacher", str(protocol), "--teacher-weight", "0.5",
                 "--out", str(out), *TINY]) == 0
    # the fold models trained on most of the student's validation cells: said, not hidden
    assert "the teacher trained on" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["train"] + summary["cells"]["val"] == 64
    # val keeps the real labels (checkpoints and thresholds judged on the truth)
    val = read_labels_csv(out / "val.csv")
    truth = {str(p): t for p, t in zip(cells.paths, cells.targets)}
    assert all(np.array_equal(t, truth[str(p)]) for p, t in zip(val.paths, val.targets))


def _cell(path, model_path):
    from elcell.cells.images import load_cell
    from elcell.infer.runtime import open_model

    return load_cell(path, open_model(model_path).decoding)[None]
