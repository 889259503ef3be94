"""One set of metrics, used by `evaluate` and by `export --int8`'s comparison,
and threshold tuning. Torch-free (scikit-learn for ROC-AUC and AP).

A cell is positive for a label when its target is >= 0.5 (ELPV targets are
expert probabilities). A cell whose label is unknown (left empty in the labels
CSV; `known` False) is left out of that label's metrics and counted as
`unknown`; its other labels still count. A cell is predicted positive (`defect`) when its
probability is >= the label's threshold; between the review threshold and the
threshold it is `review`, which counts as negative for precision/recall/F1,
but a person looks at it, so `recall_with_review` counts it as caught.
"""

from __future__ import annotations

import math
import re

import numpy as np

from elcell.errors import DataError
from elcell.infer.runtime import DEFECT, OK, REVIEW, decide
from elcell.options import RECALL_ESTIMATORS


def _ratio(num: float, den: float) -> float | None:
    """None where the figure is undefined (recall without positives, precision
    without a cell called positive): a 0 there reads as "every defect missed"."""
    return float(num / den) if den else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A figure for a person: '-' where there is none."""
    return "-" if x is None else format(x, spec)


def known_cells(positive: np.ndarray, prob: np.ndarray,
                known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """One label's truth (bool) and probabilities on the cells whose label is
    known, and how many were unknown. known None: every cell is."""
    positive, prob = np.asarray(positive).astype(bool), np.asarray(prob)
    if known is None:
        return positive, prob, 0
    known = np.asarray(known, dtype=bool)
    return positive[known], prob[known], int((~known).sum())


def label_metrics(positive: np.ndarray, prob: np.ndarray, threshold: float,
                  review_threshold: float, known: np.ndarray | None = None) -> dict:
    """Metrics of one label at one operating point, on the cells whose label is
    `known` (default all). ROC-AUC and average precision need both classes
    (positives for AP) and are None otherwise."""
    # imported here: `compare` and the k-fold report format figures through this
    # module, and scikit-learn's import costs them a second
    from sklearn.metrics import average_precision_score, roc_auc_score

    positive, prob, unknown = known_cells(positive, prob, known)
    predicted = prob >= threshold
    in_review = (prob >= min(review_threshold, threshold)) & ~predicted
    # counted directly: sklearn's confusion_matrix refuses a label with no known cell
    tp, fp = int((predicted & positive).sum()), int((predicted & ~positive).sum())
    fn, tn = int((~predicted & positive).sum()), int((~predicted & ~positive).sum())
    both = 0 < positive.sum() < len(positive)
    note = {"note": "no cell with this label known: not scored"} if not len(positive) else {}
    return {
        "threshold": float(threshold),
        "review_threshold": float(min(review_threshold, threshold)),
        "cells": int(len(positive)),
        "unknown": unknown,
        "positives": int(positive.sum()),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(positive)),
        "roc_auc": float(roc_auc_score(positive, prob)) if both else None,
        "average_precision": float(average_precision_score(positive, prob)) if positive.any() else None,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "review": int(in_review.sum()),
        "review_positives": int((in_review & positive).sum()),
        # the decisions a person sees, against the truth: review is a third answer, not "ok"
        "decisions": {truth: {"ok": int((~predicted & ~in_review & mask).sum()), "review": int((in_review & mask).sum()),
                              "defect": int((predicted & mask).sum())}
                      for truth, mask in (("ok", ~positive), ("defect", positive))},
        "recall_with_review": _ratio(int(((predicted | in_review) & positive).sum()), int(positive.sum())),
        **note,
    }


def summary(positives: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float],
            review_thresholds: list[float], known: np.ndarray | None = None) -> dict:
    """Per-label metrics on the cells whose label is `known` (bool like positives;
    default all), plus the seed's weighted F1 (weighted by positives), the mean
    F1 over the labels with a known positive, and how many cells land in review
    (decisions need no labels: every cell counts there)."""
    per_label = {label: label_metrics(positives[:, j], probs[:, j], thresholds[j], review_thresholds[j],
                                      None if known is None else known[:, j])
                 for j, label in enumerate(labels)}
    support = np.array([m["positives"] for m in per_label.values()], dtype=np.float64)
    # the mean is over labels with a known positive: without one F1 is undefined (None), or 0
    # after a single false alarm, which would halve the mean; the weighted F1 gives them no weight
    scored = support > 0
    f1 = np.array([m["f1"] if m["f1"] is not None else 0.0 for m in per_label.values()])
    decisions = decide(probs, thresholds, review_thresholds) if len(probs) else np.zeros((0, 0))
    flagged = (decisions == DEFECT).any(axis=1)
    review_only = (decisions == REVIEW).any(axis=1) & ~flagged
    return {
        "cells": int(len(probs)),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else None,
        "mean_f1": float(f1[scored].mean()) if scored.any() else None,
        "cells_flagged": int(flagged.sum()),
        "cells_in_review": int(review_only.sum()),
        "cells_ok": int((decisions == OK).all(axis=1).sum()) if len(probs) else 0,
        # what recall costs a line: the share of cells a person looks at (flagged or in review)
        "review_burden": _ratio(int(flagged.sum() + review_only.sum()), len(probs)),
        "per_label": per_label,
    }


HEADLINE = ("accuracy", "f1", "precision", "recall", "roc_auc", "recall_with_review")


def headline(metrics: dict) -> dict:
    """The figures of an evaluation worth a line in summary.json: weighted/mean F1
    and per label accuracy, F1, precision, recall, ROC-AUC; the same per group."""
    def compact(block: dict) -> dict:
        return {"cells": block["cells"], "weighted_f1": block["weighted_f1"], "mean_f1": block["mean_f1"],
                "review_burden": block["review_burden"],
                **{label: {k: m[k] for k in HEADLINE} for label, m in block["per_label"].items()}}

    result = {"tta": metrics["tta"], **compact(metrics)}
    if "groups" in metrics:
        result["groups"] = {name: compact(block) for name, block in metrics["groups"].items()}
    return result


# More than this share of cells flagged or in review at recall-first thresholds
# is worth a word: a line reviews most of what it makes (docs/accuracy.md, K07).
HEAVY_BURDEN = 0.5


def burden_note(burden: float, recall: float, where: str) -> str | None:
    """A line for the user when thresholds set for `recall` send most cells on
    `where` to a person, with what to do about it; None when they do not."""
    if burden <= HEAVY_BURDEN:
        return None
    return (f"at its recall-first thresholds {burden:.0%} of the {where} are flagged or in review: this "
            f"model ranks its defects too close to clean cells for recall {recall:g} to be cheap, or the "
            "validation set holds too few positives to read it off (see the thresholds' notes); a lower "
            "--threshold-recall/--review-recall trades recall for fewer cells to look at, and a better "
            "model (more cells, docs/accuracy.md) for both")


# --------------------------------------------------------------------------- tuning
def _midpoint(ranked: np.ndarray, k: int) -> float:
    """A threshold that includes the k highest probabilities of `ranked` (sorted
    descending) and nothing below: halfway to the next lower probability, so a
    slightly different runtime (int8, GPU) does not flip the boundary cell."""
    above = float(ranked[k - 1])
    below = float(ranked[k]) if k < len(ranked) else 0.0
    return above if above == below else (above + below) / 2


def _below_boundary(prob: np.ndarray, boundary: float) -> float:
    """Halfway from `boundary` to the next lower probability of any cell."""
    below = prob[prob < boundary]
    return float(boundary + below.max()) / 2 if len(below) else float(boundary)


# Fewer positives than this give no spread worth fitting: the tail estimators
# then keep the lowest positive, which keeps about n/(n+1) of new ones.
TAIL_MIN_POSITIVES = 3


def _logit_normal_quantile(caught: np.ndarray, recall: float) -> float:
    """The probability above which a new positive falls with chance `recall`, if
    the positives' logits are normal: the Student-t prediction bound, which
    counts the uncertainty of a mean and spread fitted to a few cells. A smooth
    tail where the lowest few positives are all there is. len(caught) >= 3."""
    from scipy.stats import t as student_t  # imported here, as scikit-learn above

    logits = np.log(np.clip(caught, 1e-6, 1 - 1e-6) / np.clip(1 - caught, 1e-6, 1))
    n = len(logits)
    bound = logits.mean() + student_t.ppf(1 - recall, n - 1) * logits.std(ddof=1) * math.sqrt(1 + 1 / n)
    return float(1 / (1 + np.exp(-bound)))


def check_estimator(name: str) -> str:
    if name not in RECALL_ESTIMATORS:
        raise DataError(f"recall estimator {name!r}: use one of {', '.join(RECALL_ESTIMATORS)}")
    return name


def threshold_for_recall(positive: np.ndarray, prob: np.ndarray, recall: float,
                         method: str = "empirical") -> float:
    """A threshold meant to keep `recall` (0 < recall <= 1) of the positive cells.

    empirical: the highest threshold whose recall on these cells is >= recall.
    On n positives that is the ceil(recall * n)-th highest, and a new positive
    falls above the k-th highest of n with chance k / (n + 1): on 10 positives
    the 0.95 threshold is their lowest and keeps 0.91 on cells it did not see.
    expected: the k-th highest with k / (n + 1) >= recall, so the expected
    recall on new cells is the target; where that needs more positives than
    there are, the logit-normal bound, never above the lowest positive.
    logit-normal: the prediction bound of a normal fitted to the positives'
    logits (never above the highest positive).
    Both tail estimators keep the lowest positive below TAIL_MIN_POSITIVES
    positives, and give 0 (every cell) for recall 1: no bound keeps every new
    positive short of that."""
    check_estimator(method)
    positive = positive.astype(bool)
    caught = np.sort(prob[positive])[::-1]
    n = len(caught)
    lowest = _below_boundary(prob, float(caught[-1]))
    if method != "empirical":
        if recall >= 1:
            return 0.0
        if n < TAIL_MIN_POSITIVES:
            return lowest
    if method == "logit-normal":
        return min(_logit_normal_quantile(caught, recall), float(caught[0]))
    if method == "expected":
        need = max(1, math.ceil(recall * (n + 1) - 1e-9))
        if need > n:
            return min(_logit_normal_quantile(caught, recall), lowest)
    else:
        need = max(1, math.ceil(recall * n - 1e-9))
    return _below_boundary(prob, float(caught[need - 1]))


def threshold_for_f1(positive: np.ndarray, prob: np.ndarray) -> float:
    """The threshold of maximum F1 on these cells; among equal F1 the lowest
    threshold (more recall: a missed crack costs more than a false alarm)."""
    order = np.argsort(-prob, kind="stable")
    ranked, hits = prob[order], positive[order].astype(bool)
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    f1 = 2 * tp / (tp + fp + hits.sum())
    # only cut where the probability changes (ties fall on the same side)
    last_of_tie = np.append(ranked[1:] != ranked[:-1], True)
    f1 = np.where(last_of_tie, f1, -1)
    best = np.flatnonzero(f1 == f1.max())[-1]
    return _midpoint(ranked, best + 1)


def parse_tuning(text: str) -> tuple[str, float | None]:
    """`f1` or `recall=0.95`."""
    if text == "f1":
        return "f1", None
    match = re.fullmatch(r"recall=([0-9.]+)", text)
    if match:
        value = float(match.group(1))
        if 0 < value <= 1:
            return "recall", value
    raise DataError(f"--tune-thresholds {text}: use 'f1' or 'recall=R' with 0 < R <= 1 (e.g. recall=0.95)")


def parse_review_band(text: str) -> tuple[str, float]:
    """`recall=0.99` (review down to the threshold that keeps that recall) or a
    probability such as `0.2` (review from 0.2 up to the threshold)."""
    match = re.fullmatch(r"recall=([0-9.]+)", text)
    try:
        value = float(match.group(1) if match else text)
    except ValueError:
        value = -1.0
    if (match and 0 < value <= 1) or (not match and 0 <= value <= 1):
        return ("recall" if match else "probability"), value
    raise DataError(f"--review-band {text}: use a probability such as 0.2 (review from it up to the "
                    "threshold) or recall=R, e.g. recall=0.99 (review down to where recall reaches R)")


def tune(labels: list[str], positives: np.ndarray, probs: np.ndarray, thresholds: list[float],
         review_thresholds: list[float], method: str | None, review_band: str | None,
         known: np.ndarray | None = None, estimator: str = "empirical") -> tuple[list[float], list[float], dict]:
    """New thresholds (and review thresholds) for `labels` (columns of positives
    and probs), tuned on the cells whose label is `known` (default all), with
    what each label got. Labels without positives keep their thresholds.
    `estimator` reads recall targets off the positives (threshold_for_recall)."""
    thresholds, review_thresholds = list(thresholds), list(review_thresholds)
    kind, target = parse_tuning(method) if method else (None, None)
    band = parse_review_band(review_band) if review_band else None
    reads_recall = kind == "recall" or (band is not None and band[0] == "recall")
    details: dict = {}
    for j, label in enumerate(labels):
        positive, prob, unknown = known_cells(positives[:, j], probs[:, j], None if known is None else known[:, j])
        old, old_review = thresholds[j], review_thresholds[j]
        none = "no known cells" if not len(positive) else "no positive cells"
        note = None
        if kind and not positive.any():
            note = f"{none}: threshold kept at {old:.3g}"
        elif kind == "f1":
            thresholds[j] = threshold_for_f1(positive, prob)
        elif kind == "recall":
            thresholds[j] = threshold_for_recall(positive, prob, target, estimator)
        if band is None:  # keep the model's band width
            review_thresholds[j] = max(0.0, thresholds[j] - (old - old_review))
        elif band[0] == "probability":
            review_thresholds[j] = min(band[1], thresholds[j])
        elif positive.any():
            review_thresholds[j] = min(threshold_for_recall(positive, prob, band[1], estimator), thresholds[j])
        else:
            review_thresholds[j] = thresholds[j]
            note = f"{none}: {'threshold kept at ' + format(old, '.3g') + ', ' if kind else ''}no review band"
        at = label_metrics(positive, prob, thresholds[j], review_thresholds[j])
        details[label] = {
            "cells": at["cells"], "unknown": unknown, "threshold": thresholds[j], "previous_threshold": old,
            "review_threshold": review_thresholds[j], "previous_review_threshold": old_review,
            **{key: at[key] for key in ("precision", "recall", "f1", "review", "recall_with_review")},
        }
        if not note and reads_recall and estimator != "empirical" and positive.sum() < TAIL_MIN_POSITIVES:
            note = (f"{int(positive.sum())} positive cells: too few for the {estimator} estimator; the lowest one "
                    f"kept, about {int(positive.sum())}/{int(positive.sum()) + 1} of new ones")
        if note:
            details[label]["note"] = note
    return thresholds, review_thresholds, details
