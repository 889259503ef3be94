"""Metrics and threshold tuning, against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import t as student_t
from sklearn.metrics import f1_score, roc_auc_score

from elcell.errors import DataError
from elcell.infer.metrics import (
    burden_note,
    label_metrics,
    summary,
    threshold_for_f1,
    threshold_for_recall,
    tune,
)
from elcell.infer.scorecard import format_report


def test_threshold_search_is_exact():
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = np.array([1, 0, 1, 1, 0])
    # recall 1 needs the cell at 0.6: threshold halfway to the next lower cell
    assert threshold_for_recall(positive, probs, 1.0) == pytest.approx(0.55)
    assert threshold_for_recall(positive, probs, 0.6) == pytest.approx(0.65)  # 2 of 3
    assert threshold_for_recall(positive, probs, 0.2) == pytest.approx(0.85)
    # F1: top 4 cells -> 2*3 / (3 + 1 + 3) = 0.857, the best cut
    assert threshold_for_f1(positive, probs) == pytest.approx(0.55)
    # ties stay on one side of the threshold
    tied = np.array([0.7, 0.7, 0.7, 0.2])
    assert threshold_for_f1(np.array([1, 0, 1, 0]), tied) == pytest.approx(0.45)
    assert threshold_for_recall(np.array([1, 0, 1, 0]), tied, 0.5) == pytest.approx(0.45)


def test_expected_estimator_counts_one_more_positive():
    probs = np.append(np.linspace(0.95, 0.05, 19), 1e-4)  # positives at 0.95, 0.85, ... 0.05; clean cells between
    positive = np.append(np.arange(19) % 2 == 0, False)  # 10 positives, a clean cell far below them all
    # recall 0.5: k / 11 >= 0.5 -> k = 6 (empirical: 5), halfway to the next lower cell
    assert threshold_for_recall(positive, probs, 0.5, "expected") == pytest.approx(np.mean(probs[[10, 11]]))
    assert threshold_for_recall(positive, probs, 0.5, "empirical") == pytest.approx(np.mean(probs[[8, 9]]))
    # 0.99 of 10 would need a 100th positive: the Student-t bound on the logits, below the lowest positive
    logits = np.log(probs[positive] / (1 - probs[positive]))
    bound = logits.mean() + student_t.ppf(0.01, 9) * logits.std(ddof=1) * np.sqrt(1 + 1 / 10)
    expected = threshold_for_recall(positive, probs, 0.99, "expected")
    assert expected == pytest.approx(1 / (1 + np.exp(-bound)))
    assert expected < threshold_for_recall(positive, probs, 0.99, "empirical") == pytest.approx((0.05 + 1e-4) / 2)
    with pytest.raises(DataError, match="recall estimator 'median'"):
        threshold_for_recall(positive, probs, 0.9, "median")


def test_tail_estimators_at_their_edges():
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([1, 0, 1, 0, 1, 0])
    for method in ("expected", "logit-normal"):
        # recall 1 of new positives: only every cell keeps that for sure, more review than 0.99 asks
        assert threshold_for_recall(positive, probs, 1.0, method) == 0.0
        assert threshold_for_recall(positive, probs, 0.99, method) > 0.0
        # two positives are too few to fit a tail: the lowest kept, halfway to the next cell
        assert threshold_for_recall(np.array([1, 0, 0, 0, 1, 0]), probs, 0.95, method) == pytest.approx(0.45)
    _, _, details = tune(["crack"], np.array([[1], [0], [0], [0], [1], [0]]), probs[:, None], [0.5], [0.5],
                         "recall=0.95", None, estimator="expected")
    assert "2 positive cells: too few for the expected estimator" in details["crack"]["note"]


@pytest.mark.parametrize("n, method, lowest, highest", [
    (10, "empirical", 0.89, 0.93), (10, "expected", 0.94, 0.97), (10, "logit-normal", 0.94, 0.97),
    (40, "empirical", 0.935, 0.955), (40, "expected", 0.955, 0.98)])
def test_recall_held_on_new_cells(n, method, lowest, highest):
    """Thresholds for recall 0.95 from n positive cells, applied to 2,000 new
    ones of the same kind: on 10 the empirical one (their lowest) keeps about
    10/11 on average, the others the target; on 40 the empirical one, the
    38th highest, keeps about the target and expected, the 39th (no tail), a
    little more."""
    rng = np.random.default_rng(0)
    logits = rng.normal(2.0, 1.5, (400, n))  # 400 validation sets of n positives (logit-normal)
    new = 1 / (1 + np.exp(-rng.normal(2.0, 1.5, 2000)))
    kept = [np.mean(new >= threshold_for_recall(np.ones(n), 1 / (1 + np.exp(-v)), 0.95, method))
            for v in logits]
    assert lowest < np.mean(kept) < highest


def test_a_heavy_review_burden_is_named_with_what_to_do():
    assert burden_note(0.35, 0.99, "validation cells") is None
    assert burden_note(0.5, 0.99, "validation cells") is None  # half is the line
    assert burden_note(0.51, 0.99, "validation cells") is not None
    note = burden_note(0.96, 0.99, "validation cells")
    assert "96% of the validation cells are flagged or in review" in note
    assert "recall 0.99" in note and "--threshold-recall" in note


# --------------------------------------------------------------------------- unknown labels
def cells_with_unknowns() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two labels over 40 cells; the unknown cells of each would change every figure
    were they counted (high probabilities that would be false positives)."""
    rng = np.random.default_rng(4)
    positives = (rng.random((40, 2)) < 0.4).astype(np.int64)
    probs = np.clip(positives * 0.5 + rng.random((40, 2)) * 0.5, 0, 1)
    known = rng.random((40, 2)) > 0.3
    positives[~known] = 0  # as LabelTable.positives gives them
    probs[~known] = 0.99
    return positives, probs, known


def test_label_metrics_score_only_known_cells_and_count_the_unknown():
    positives, probs, known = cells_with_unknowns()
    j = 0
    masked = label_metrics(positives[:, j], probs[:, j], 0.5, 0.3, known[:, j])
    subset = label_metrics(positives[known[:, j], j], probs[known[:, j], j], 0.5, 0.3)
    assert masked["unknown"] == int((~known[:, j]).sum()) > 0 and subset["unknown"] == 0
    assert masked["cells"] == int(known[:, j].sum())
    assert {k: v for k, v in masked.items() if k != "unknown"} == {k: v for k, v in subset.items() if k != "unknown"}
    assert masked["f1"] == pytest.approx(f1_score(positives[known[:, j], j], probs[known[:, j], j] >= 0.5))
    assert masked["roc_auc"] == pytest.approx(roc_auc_score(positives[known[:, j], j], probs[known[:, j], j]))
    assert label_metrics(positives[:, j], probs[:, j], 0.5, 0.3)["cells"] == 40  # no mask: every cell known


def test_a_label_no_cell_knows_is_not_scored_and_left_out_of_the_mean():
    positives, probs, known = cells_with_unknowns()
    known[:, 1] = False
    positives[:, 1] = 0
    m = label_metrics(positives[:, 1], probs[:, 1], 0.5, 0.5, known[:, 1])
    assert m["cells"] == 0 and m["unknown"] == 40 and "not scored" in m["note"]
    assert m["f1"] is None and m["roc_auc"] is None and m["average_precision"] is None
    assert sum(m["confusion_matrix"].values()) == 0
    result = summary(positives, probs, ["crack", "inactive"], [0.5, 0.5], [0.5, 0.5], known)
    assert result["mean_f1"] == pytest.approx(result["per_label"]["crack"]["f1"])
    assert result["weighted_f1"] == pytest.approx(result["per_label"]["crack"]["f1"])
    assert result["cells"] == 40  # decisions (ok / review) need no labels: every cell counts
    assert "note" not in result["per_label"]["crack"]


def test_figures_without_their_cells_are_undefined_not_zero():
    # no positive known: recall has nothing to count; a false alarm still makes F1 0
    clean = np.zeros(6, dtype=bool)
    quiet = label_metrics(clean, np.array([0.1, 0.2, 0.1, 0.3, 0.2, 0.1]), 0.5, 0.4)
    assert quiet["recall"] is None and quiet["precision"] is None and quiet["f1"] is None
    assert quiet["recall_with_review"] is None and quiet["accuracy"] == 1.0
    alarm = label_metrics(clean, np.array([0.9, 0.2, 0.1, 0.3, 0.2, 0.1]), 0.5, 0.4)
    assert alarm["recall"] is None and alarm["precision"] == 0.0 and alarm["f1"] == 0.0
    positives = np.stack([np.array([1, 0, 0, 1, 0, 0], bool), clean], axis=1)
    probs = np.stack([np.array([0.9, 0.1, 0.2, 0.8, 0.1, 0.1]), np.full(6, 0.1)], axis=1)
    result = summary(positives, probs, ["crack", "inactive"], [0.5, 0.5], [0.4, 0.4])
    assert result["per_label"]["inactive"]["f1"] is None
    assert result["mean_f1"] == result["per_label"]["crack"]["f1"] == 1.0  # the undefined label stays out
    probs[0, 1] = 0.9  # one false alarm: inactive's F1 is 0, yet a label without positives is no part of the mean
    alarmed = summary(positives, probs, ["crack", "inactive"], [0.5, 0.5], [0.4, 0.4])
    assert alarmed["per_label"]["inactive"]["f1"] == 0.0 and alarmed["mean_f1"] == 1.0
    text = format_report({**result, "tta": False, "labels_not_in_data": [], "failed": [], "images": 6})
    inactive = next(line for line in text.splitlines() if line.strip().startswith("inactive"))
    assert "0.000" not in inactive and " -" in inactive


def test_a_label_without_positives_says_its_threshold_was_kept_and_has_no_band():
    positives = np.zeros((8, 1), dtype=bool)
    probs = np.linspace(0.1, 0.8, 8)[:, None]
    thresholds, review, details = tune(["inactive"], positives, probs, [0.5], [0.4], "recall=0.95", "recall=0.99")
    assert thresholds == [0.5] and review == [0.5]
    assert details["inactive"]["note"] == "no positive cells: threshold kept at 0.5, no review band"


def test_summary_per_label_figures_use_each_labels_known_cells():
    positives, probs, known = cells_with_unknowns()
    result = summary(positives, probs, ["crack", "inactive"], [0.5, 0.5], [0.5, 0.5], known)
    f1s = []
    for j, label in enumerate(["crack", "inactive"]):
        y, p = positives[known[:, j], j], probs[known[:, j], j] >= 0.5
        f1s.append(f1_score(y, p))
        assert result["per_label"][label]["f1"] == pytest.approx(f1s[-1])
        assert result["per_label"][label]["positives"] == y.sum()
    assert result["mean_f1"] == pytest.approx(np.mean(f1s))


def test_tuning_uses_only_known_cells():
    positives, probs, known = cells_with_unknowns()
    labels = ["crack", "inactive"]
    tuned, review, details = tune(labels, positives, probs, [0.5, 0.5], [0.5, 0.5], "f1", "recall=1.0", known)
    for j, label in enumerate(labels):
        y, p = positives[known[:, j], j], probs[known[:, j], j]
        assert tuned[j] == pytest.approx(threshold_for_f1(y, p))
        assert review[j] == pytest.approx(min(threshold_for_recall(y, p, 1.0), tuned[j]))
        assert details[label]["cells"] == len(y) and details[label]["unknown"] == 40 - len(y)
    known[:, 1] = False
    kept, _, details = tune(labels, positives, probs, [0.5, 0.7], [0.5, 0.6], "f1", None, known)
    assert kept[1] == 0.7 and details["inactive"]["note"] == "no known cells: threshold kept at 0.7"


def test_review_burden_is_the_share_of_cells_a_person_looks_at():
    # crack: defect, review, ok, ok; inactive: ok, defect, review, ok -> cells 0,1 flagged, 2 review only
    probs = np.array([[0.9, 0.1], [0.4, 0.8], [0.1, 0.3], [0.1, 0.1]])
    positives = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    block = summary(positives, probs, ["crack", "inactive"], [0.5, 0.5], [0.3, 0.25])
    assert block["cells_flagged"] == 2 and block["cells_in_review"] == 1 and block["cells_ok"] == 1
    assert block["review_burden"] == pytest.approx(3 / 4)
    assert block["per_label"]["crack"]["recall_with_review"] == 1.0  # the 0.4 crack is in review
    assert block["per_label"]["inactive"]["recall_with_review"] == 1.0
