"""K-fold assignment (elcell.judging.folds) and the intervals of elcell.judging.intervals, on
real ELPV labels and on scored cells whose figures are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from elcell.cells.labels import LabelTable
from elcell.errors import DataError
from elcell.judging.folds import assign_folds, strata
from elcell.judging.intervals import Scored, align, bootstrap, paired_difference, point_figures
from elcell.training.data import fold_split


def test_folds_cover_every_cell_once_and_spread_each_stratum(elpv):
    folds = assign_folds(elpv, 5, seed=0)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.sum() == len(elpv) and sizes.max() - sizes.min() <= 1
    keys = strata(elpv)
    for key in set(keys):  # each stratum split as evenly as it can be
        members = np.flatnonzero([k == key for k in keys])
        per_fold = np.bincount(folds[members], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (key, per_fold)
    assert np.array_equal(folds, assign_folds(elpv, 5, seed=0))
    assert not np.array_equal(folds, assign_folds(elpv, 5, seed=1))


def test_fold_split_holds_out_its_fold_and_a_stratified_val(elpv):
    folds = assign_folds(elpv, 4, seed=3)
    tested = np.zeros(len(elpv), dtype=int)
    for fold in range(4):
        split = fold_split(elpv, 4, fold, val_fraction=0.1, seed=3)
        assert np.array_equal(split == "test", folds == fold)
        assert abs((split == "val").sum() - 0.1 * (folds != fold).sum()) <= len(set(strata(elpv)))
        tested += split == "test"
    assert (tested == 1).all()  # every cell out of fold exactly once


def test_unknown_labels_are_a_stratum_of_their_own():
    targets = np.array([[1, 0], [0, 0], [np.nan, 0], [np.nan, 1]], dtype=np.float32)
    table = LabelTable(paths=[f"c{i}.png" for i in range(4)], names=["crack", "inactive"], targets=targets)
    assert strata(table) == [(1, 0), (0, 0), (-1, 0), (-1, 1)]


@pytest.mark.parametrize("k", [1, 10])
def test_impossible_fold_counts_are_refused(k):
    table = LabelTable(paths=["a", "b", "c"], names=["x"], targets=np.array([[0.0], [1.0], [0.0]]))
    with pytest.raises(DataError, match=f"--folds {k}"):
        assign_folds(table, k, seed=0)
    with pytest.raises(DataError, match="--fold 3"):
        fold_split(table, 3, 3, 0.3, seed=0)


def _scored(truth, probs, decisions, labels=("crack",)) -> Scored:
    truth, probs = np.asarray(truth, float).reshape(len(truth), -1), np.asarray(probs, float).reshape(len(probs), -1)
    return Scored([f"c{i}" for i in range(len(truth))], list(labels), truth, probs,
                  np.asarray(decisions).reshape(len(truth), -1))


def test_point_figures_by_hand():
    # 4 positives (one unknown cell), at 0.5: tp 2, fp 1, fn 2 -> precision 2/3, recall 1/2, F1 4/7
    scored = _scored([1, 1, 1, 1, 0, 0, 0, np.nan], [.9, .6, .4, .1, .7, .2, .3, .95],
                     ["defect", "defect", "review", "ok", "defect", "ok", "review", "defect"])
    figures = point_figures(scored)
    assert figures["crack/at_0.5_precision"] == pytest.approx(2 / 3)
    assert figures["crack/at_0.5_recall"] == pytest.approx(0.5)
    assert figures["crack/at_0.5_f1"] == pytest.approx(4 / 7)
    assert figures["crack/at_0.5_accuracy"] == pytest.approx(4 / 7)  # 2 tp + 2 tn of 7 known
    assert figures["crack/own_recall_with_review"] == pytest.approx(3 / 4)
    assert figures["crack/roc_auc"] == pytest.approx(7 / 12)  # 3 + 2 + 2 + 0 of 12 pairs ranked right
    assert figures["review_burden"] == pytest.approx(6 / 8)  # every cell counts, known or not
    assert figures["flagged"] == pytest.approx(4 / 8)


def test_bootstrap_interval_brackets_the_value_and_narrows_with_cells():
    rng = np.random.default_rng(0)

    def scored(n):
        truth = rng.random(n) < 0.3
        probs = np.clip(truth * 0.3 + rng.random(n) * 0.7, 0, 1)
        return _scored(truth, probs, np.where(probs >= 0.5, "defect", "ok"))

    small, large = bootstrap(scored(100), replicates=500), bootstrap(scored(2000), replicates=500)
    for figures in (small, large):
        f1 = figures["crack/at_0.5_f1"]
        assert f1["low"] < f1["value"] < f1["high"]
    width = {name: f["crack/roc_auc"]["high"] - f["crack/roc_auc"]["low"] for name, f in
             (("small", small), ("large", large))}
    assert width["large"] < width["small"] / 2


def test_paired_difference_sees_a_small_gain_an_unpaired_view_would_miss():
    rng = np.random.default_rng(1)
    n = 1500
    truth = rng.random(n) < 0.3
    base = np.clip(truth * 0.25 + rng.random(n) * 0.75, 0, 1)
    better = np.clip(base + 0.03 * np.where(truth, 1, -1), 0, 1)  # every cell a little further right
    a = _scored(truth, base, np.where(base >= 0.5, "defect", "ok"))
    b = _scored(truth, better, np.where(better >= 0.5, "defect", "ok"))
    figures = paired_difference(a, b, replicates=500)["figures"]
    auc = figures["crack/roc_auc"]
    assert auc["verdict"] == "better" and 0 < auc["low"] < auc["difference"] < auc["high"]
    same = paired_difference(a, a, replicates=200)["figures"]["crack/roc_auc"]
    assert same["verdict"] == "same" and same["low"] == same["high"] == 0


def test_cells_seen_several_times_are_resampled_together():
    """Each cell three times (as in three assembled modules): resampling the cells as
    groups gives the interval of the cells seen once; resampling rows narrows it
    as if there were three times the evidence."""
    rng = np.random.default_rng(2)
    n = 300
    truth = rng.random(n) < 0.3
    base = np.clip(truth * 0.3 + rng.random(n) * 0.7, 0, 1)
    other = np.clip(base + rng.normal(0, 0.1, n), 0, 1)

    def pair(times: int) -> tuple[Scored, Scored]:
        t, p, q = (np.tile(v, times) for v in (truth, base, other))
        a, b = _scored(t, p, np.where(p >= 0.5, "defect", "ok")), _scored(t, q, np.where(q >= 0.5, "defect", "ok"))
        return a, b

    once = paired_difference(*pair(1), replicates=400)["figures"]["crack/at_0.5_f1"]
    a, b = pair(3)
    groups = {path: f"{int(path[1:]) % n:04d}" for path in a.paths}  # sorted as the cells
    grouped = paired_difference(a, b, replicates=400, groups=groups)["figures"]["crack/at_0.5_f1"]
    rows = paired_difference(a, b, replicates=400)["figures"]["crack/at_0.5_f1"]
    assert grouped["difference"] == pytest.approx(once["difference"])
    assert (grouped["low"], grouped["high"]) == pytest.approx((once["low"], once["high"]))
    assert rows["high"] - rows["low"] < 0.75 * (once["high"] - once["low"])


def test_align_matches_cells_by_path_and_refuses_disjoint_sets():
    a = _scored([1, 0, 1], [.9, .1, .8], ["defect", "ok", "defect"])
    b = Scored(["c2", "c0", "x"], ["crack"], np.array([[1.0], [1.0], [0.0]]), np.array([[.7], [.6], [.2]]),
               np.array([["defect"], ["defect"], ["ok"]]))
    left, right = align(a, b)
    assert left.paths == right.paths == ["c0", "c2"]
    assert right.probs[:, 0].tolist() == [.6, .7]
    c = Scored(["y"], ["crack"], np.array([[1.0]]), np.array([[.5]]), np.array([["defect"]]))
    with pytest.raises(DataError, match="nothing to compare"):
        align(a, c)


def _fake_protocol(run, seed=0, shift=0.0):
    """Three finished folds whose test predictions are made up (no training)."""
    from elcell.training.config import TrainConfig

    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "kfold.yaml").write_text(TrainConfig(folds=3).to_yaml())
    for fold in range(3):
        folder = run / f"fold{fold}"
        (folder / "eval" / "test").mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
        lines = ["path;true_crack;true_inactive;prob_crack;prob_inactive;decision_crack;decision_inactive"]
        for i in range(40):
            crack, inactive = int(rng.random() < 0.4), "" if i % 10 == 0 else int(rng.random() < 0.2)
            pc = min(1.0, 0.2 * crack + 0.8 * rng.random() + shift * crack)
            pi = 0.5 * (inactive == 1) + 0.5 * rng.random()
            decide = lambda p: "defect" if p >= 0.5 else "review" if p >= 0.3 else "ok"  # noqa: E731
            lines.append(f"f{fold}c{i}.png;{crack};{inactive};{pc:.6f};{pi:.6f};{decide(pc)};{decide(pi)}")
        (folder / "eval" / "test" / "predictions.csv").write_text("\n".join(lines) + "\n")


def test_kfold_report_pools_the_finished_folds(tmp_path):
    from elcell.judging.intervals import read_scored
    from elcell.training.config import TrainConfig
    from elcell.training.kfold import format_report, write_report

    _fake_protocol(tmp_path)
    report = write_report(tmp_path, TrainConfig(folds=4, threshold_recall=0.95, review_recall=0.99))
    assert report["finished"] == [0, 1, 2] and report["cells"] == 120  # fold 3 not run yet
    oof = read_scored(tmp_path / "oof.csv")
    assert oof.folds.tolist() == [0] * 40 + [1] * 40 + [2] * 40
    assert report["unknown"] == {"crack": 0, "inactive": 12}
    assert np.isnan(oof.truth[::10, 1]).all()
    assert report["pooled"]["review_burden"]["value"] == pytest.approx(point_figures(oof)["review_burden"])
    for label, chosen in report["oof_thresholds"].items():  # chosen on the pooled scores, for recall
        assert chosen["recall"] >= 0.95 and chosen["recall_with_review"] >= 0.99, label
    text = format_report(report)
    assert "3 of 4 folds finished (partial" in text and "120 cells scored out of fold" in text
    assert "review burden" in text and "thresholds for inactive chosen on all out-of-fold scores" in text


def test_compare_exits_1_when_b_is_worse_on_a_required_figure(tmp_path, capsys):
    from elcell.cli import main

    _fake_protocol(tmp_path / "a", shift=0.3)
    _fake_protocol(tmp_path / "b", shift=0.0)
    for name in ("a", "b"):
        from elcell.training.config import TrainConfig
        from elcell.training.kfold import write_report

        write_report(tmp_path / name, TrainConfig(folds=3))
    code = main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--require", "roc_auc=crack",
                 "--require", "roc_auc=inactive"])
    out = capsys.readouterr().out
    assert code == 1 and "worse than A beyond the interval on crack/roc_auc" in out
    assert "inactive/roc_auc" not in out.splitlines()[-1]  # same scores for inactive: not refused
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "a"), "--require", "roc_auc=crack"]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--require", "recall"]) == 2
    assert "--require recall: use METRIC=LABEL" in capsys.readouterr().err


def test_a_label_no_cell_knows_gives_no_figure_rather_than_a_crash():
    scored = _scored(np.array([[1, np.nan], [0, np.nan], [1, np.nan]]), np.array([[.9, .2], [.1, .7], [.6, .1]]),
                     np.array([["defect", "ok"], ["ok", "defect"], ["defect", "ok"]]), labels=("crack", "inactive"))
    figures = bootstrap(scored, replicates=50)
    assert figures["inactive/at_0.5_f1"] == {"value": None, "low": None, "high": None}
    assert figures["mean_f1/at_0.5"]["value"] == pytest.approx(1.0)  # crack alone: the known label
    assert paired_difference(scored, scored, replicates=50)["figures"]["inactive/roc_auc"]["verdict"] == "n/a"


def test_a_gate_on_a_figure_these_cells_cannot_measure_refuses(tmp_path, capsys):
    from elcell.cli import main

    # no inactive cell among them: inactive recall is undefined, not "the same"
    rows = ["path;true_crack;true_inactive;prob_crack;prob_inactive;decision_crack;decision_inactive"]
    rows += [f"{tmp_path / f'c{i}'};{i % 2};0;{0.9 if i % 2 else 0.1};0.1;{'defect' if i % 2 else 'ok'};ok"
             for i in range(12)]
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    args = ["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert main([*args, "--require", "recall=crack"]) == 0
    capsys.readouterr()
    assert main([*args, "--require", "recall=inactive"]) == 1
    out = capsys.readouterr().out
    assert "cannot be measured on these 12 cells (inactive/own_recall needs a cell with the label's defect)" \
        in out and "not promoted" in out
    assert "0.000" not in next(line for line in out.splitlines() if line.startswith("inactive/own_recall "))
    assert main([*args, "--require", "roc_auc=inactive"]) == 1  # every cell without: the reason is that
    assert "inactive/roc_auc needs cells with and without the label's defect" in capsys.readouterr().out
    # --data limits scored cells to those it lists, as it limits models' cells
    (tmp_path / "c0").write_bytes(b"")
    (tmp_path / "c1").write_bytes(b"")
    (tmp_path / "few.csv").write_text("path;crack;inactive\nc0;0;0\nc1;1;0\n")
    assert main([*args, "--data", str(tmp_path / "few.csv")]) == 0
    assert "2 cells both scored" in capsys.readouterr().out
    (tmp_path / "out").write_text("a file, not a folder")
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "--out " + str(tmp_path / "out") + ": exists and is not a folder" in capsys.readouterr().err


def test_a_protocol_refuses_data_whose_cells_moved_between_folds(seed_csv, tmp_path):
    from elcell.cells.labels import read_labels_csv
    from elcell.errors import DataError
    from elcell.judging.folds import ASSIGNMENT
    from elcell.training.config import TrainConfig
    from elcell.training.kfold import _assignment, _check_assignment

    config = TrainConfig(data=str(seed_csv), folds=3)
    (tmp_path / ASSIGNMENT).write_text(_assignment(read_labels_csv(seed_csv), config))
    _check_assignment(tmp_path, config)  # the same data: fine
    lines = seed_csv.read_text().splitlines()
    edited = seed_csv.with_name("edited.csv")
    edited.write_text("\n".join([lines[0], *lines[2:], lines[1]]) + "\n")  # one row moved to the end
    with pytest.raises(DataError, match="changed since the k-fold protocol"):
        _check_assignment(tmp_path, TrainConfig(data=str(edited), folds=3))
