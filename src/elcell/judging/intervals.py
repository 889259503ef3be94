"""How sure a figure is: bootstrap intervals of a model's metrics, and paired
intervals of the difference between two models on the same cells. Torch-free.

Both read scored cells as `evaluate` and the k-fold protocol write them
(predictions.csv, oof.csv: path; true_<label>; prob_<label>; decision_<label>).
A label is judged at two operating points: 0.5, and the decisions the model
made at its own thresholds, where `review` counts as caught for recall and
for the review burden (the share of cells a person must look at or that are
flagged), but not as a positive for precision and F1.

The bootstrap resamples cells with replacement; a paired difference resamples
the same cells for both models, so that cells both find hard do not widen the
interval of the difference. The intervals cover the choice of cells, not of
training seeds (those move a recipe's F1 by about 0.03 more): a recipe beats
another only where the interval of one figure chosen beforehand excludes 0,
and better on several seeds or protocols. Among the dozens of figures shown,
a few will exclude 0 by chance.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elcell.errors import DataError
from elcell.infer.runtime import DEFECT, OK

LABEL_FIGURES = ("at_0.5_precision", "at_0.5_recall", "at_0.5_f1", "at_0.5_accuracy", "own_precision",
                 "own_recall", "own_f1", "own_recall_with_review", "roc_auc")
REPLICATES = 2000  # enough for stable 2.5/97.5 % quantiles (a few thousandths of F1)
LEVEL = 0.95


@dataclass
class Scored:
    """Scored cells: truth (NaN where unknown), probabilities and decisions per label."""

    paths: list[str]
    labels: list[str]
    truth: np.ndarray  # float [N, L]: 0/1, NaN unknown
    probs: np.ndarray  # float [N, L]
    decisions: np.ndarray  # str [N, L]: ok / review / defect
    folds: np.ndarray | None = None  # int [N] for out-of-fold predictions

    def subset(self, index: np.ndarray) -> Scored:
        return Scored([self.paths[i] for i in index], self.labels, self.truth[index], self.probs[index],
                      self.decisions[index], None if self.folds is None else self.folds[index])


def read_scored(path: str | Path) -> Scored:
    """A predictions.csv of `evaluate` or an oof.csv of `train --folds`."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle, delimiter=";"))
    except OSError as err:
        raise DataError(f"{path}: cannot read scored cells ({err})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: no scored cells")
    header = rows[0]
    labels = [name[len("prob_"):] for name in header if name.startswith("prob_")]
    missing = [f"{kind}_{label}" for label in labels for kind in ("true", "decision")
               if f"{kind}_{label}" not in header]
    if not labels or missing:
        raise DataError(f"{path}: expected columns path, true_<label>, prob_<label>, decision_<label>; "
                        f"missing {missing or 'prob_<label>'}")

    def column(name: str) -> list[str]:
        at = header.index(name)
        return [row[at] for row in rows[1:]]

    truth = np.array([[float(v) if v.strip() else np.nan for v in column(f"true_{label}")] for label in labels],
                     dtype=np.float64).T
    probs = np.array([[float(v) for v in column(f"prob_{label}")] for label in labels], dtype=np.float64).T
    decisions = np.array([column(f"decision_{label}") for label in labels]).T
    folds = np.array([int(v) for v in column("fold")]) if "fold" in header else None
    return Scored(column("path"), labels, truth, probs, decisions, folds)


# --------------------------------------------------------------------------- counting
# A replicate is a weight per cell: how often the resample drew it (int [B, N]);
# the whole set is one replicate of ones. Sums become matrix products, which
# keeps 2,000 replicates of 2,600 cells to a fraction of a second.
def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """NaN where undefined (no positives, nothing called positive): no figure, not a 0."""
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def _auc(weights: np.ndarray, positive: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Weighted ROC-AUC per replicate (the Mann-Whitney statistic, ties counting
    one half); NaN where a replicate lacks a class."""
    if not len(prob):
        return np.full(len(weights), np.nan)
    order = np.argsort(prob, kind="stable")
    ranked = prob[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one group per distinct value
    w = weights[:, order].astype(np.float64)
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each group
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)


def _label_figures(truth: np.ndarray, prob: np.ndarray, decision: np.ndarray,
                   weights: np.ndarray) -> dict[str, np.ndarray]:
    """One label's figures per replicate, on the cells whose label is known: at
    0.5 and at the model's own decisions (review counted as caught for
    recall_with_review)."""
    known = ~np.isnan(truth)
    if not known.any():  # nothing to judge this label on: no figure, rather than a 0
        return {name: np.full(len(weights), np.nan) for name in LABEL_FIGURES}
    weights, prob, decision = weights[:, known], prob[known], decision[known]
    positive = truth[known] >= 0.5
    positives = weights @ positive.astype(np.float64)
    figures = {}
    for name, flag in (("at_0.5", prob >= 0.5), ("own", decision == DEFECT)):
        tp = weights @ (flag & positive).astype(np.float64)
        fp = weights @ (flag & ~positive).astype(np.float64)
        figures[f"{name}_precision"] = _ratio(tp, tp + fp)
        figures[f"{name}_recall"] = _ratio(tp, positives)
        figures[f"{name}_f1"] = _ratio(2 * tp, tp + fp + positives)
        if name == "at_0.5":  # ELPV's binary task is judged by accuracy
            tn = weights @ (~flag & ~positive).astype(np.float64)
            figures["at_0.5_accuracy"] = _ratio(tp + tn, weights.sum(axis=1).astype(np.float64))
    caught = weights @ ((decision != OK) & positive).astype(np.float64)
    figures["own_recall_with_review"] = _ratio(caught, positives)
    figures["roc_auc"] = _auc(weights, positive, prob)
    return figures


def _figures(scored: Scored, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every figure per replicate (weights int [B, N]): per label, the mean F1
    over labels at both operating points, and the review burden."""
    figures: dict[str, np.ndarray] = {}
    for j, label in enumerate(scored.labels):
        for name, values in _label_figures(scored.truth[:, j], scored.probs[:, j], scored.decisions[:, j],
                                           weights).items():
            figures[f"{label}/{name}"] = values
    # over the labels with a known positive in the resample, as metrics.summary: a label without
    # one has no F1 worth averaging (one false alarm would make it 0 and halve the mean)
    truth = np.nan_to_num(scored.truth, nan=0.0) >= 0.5  # unknown counts as no positive here
    has_positive = (weights @ truth.astype(np.float64)).T > 0  # [labels, B]
    for point in ("at_0.5", "own"):
        f1 = np.array([figures[f"{label}/{point}_f1"] for label in scored.labels])  # [labels, B]
        defined = has_positive & ~np.isnan(f1)
        figures[f"mean_f1/{point}"] = np.divide(np.where(defined, f1, 0).sum(axis=0), defined.sum(axis=0),
                                                out=np.full(len(weights), np.nan), where=defined.any(axis=0))
    cells = weights.sum(axis=1)
    looked_at = (scored.decisions != OK).any(axis=1)  # flagged or in review for any label
    figures["review_burden"] = weights @ looked_at.astype(np.float64) / cells
    figures["flagged"] = weights @ (scored.decisions == DEFECT).any(axis=1).astype(np.float64) / cells
    return figures


def _whole(n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.int64)


def _resamples(n: int, replicates: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """int [replicates, n]: how often each cell is drawn in each resample. With
    groups ([n] keys), whole groups are drawn: rows of one cell seen several
    times (one cell in several assembled modules) are not independent evidence."""
    if groups is None:
        return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=replicates)
    keys, member = np.unique(np.asarray(groups), return_inverse=True)
    drawn = np.random.default_rng(seed).multinomial(len(keys), np.full(len(keys), 1 / len(keys)), size=replicates)
    return drawn[:, member]


def _value(x: float) -> float | None:
    """A figure for JSON: None where there is none (NaN is not JSON)."""
    return None if np.isnan(x) else float(x)


def _interval(values: np.ndarray) -> list[float | None]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [None, None]
    tail = (1 - LEVEL) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


# --------------------------------------------------------------------------- public
def point_figures(scored: Scored) -> dict[str, float]:
    """Every figure on the cells as they are (no resampling)."""
    return {name: _value(values[0]) for name, values in _figures(scored, _whole(len(scored.paths))).items()}


def bootstrap(scored: Scored, replicates: int = REPLICATES, seed: int = 0) -> dict:
    """Each figure with its 95 % bootstrap interval: {name: {value, low, high}}."""
    point = _figures(scored, _whole(len(scored.paths)))
    resampled = _figures(scored, _resamples(len(scored.paths), replicates, seed))
    return {name: {"value": _value(point[name][0]), **dict(zip(("low", "high"), _interval(resampled[name])))}
            for name in point}


def align(a: Scored, b: Scored) -> tuple[Scored, Scored]:
    """The cells and labels both scored, in one order; refuses disjoint sets."""
    labels = [label for label in a.labels if label in b.labels]
    where = {path: i for i, path in enumerate(b.paths)}
    shared = [i for i, path in enumerate(a.paths) if path in where]
    if not labels or not shared:
        raise DataError(f"the two sets of scored cells share {len(shared)} cells and labels {labels}: "
                        "nothing to compare")
    ia, ib = np.array(shared), np.array([where[a.paths[i]] for i in shared])

    def pick(s: Scored, rows: np.ndarray) -> Scored:
        cols = [s.labels.index(label) for label in labels]
        return Scored([s.paths[i] for i in rows], labels, s.truth[rows][:, cols], s.probs[rows][:, cols],
                      s.decisions[rows][:, cols])

    return pick(a, ia), pick(b, ib)


def paired_difference(a: Scored, b: Scored, replicates: int = REPLICATES, seed: int = 0,
                      groups: dict[str, str] | None = None) -> dict:
    """B minus A for every figure, on the cells both scored, with the paired 95 %
    interval and a verdict: 'better'/'worse' only where the interval excludes 0,
    'n/a' where the figure cannot be measured on these cells.
    groups: path -> key; rows sharing a key are resampled together (a cluster bootstrap)."""
    a, b = align(a, b)
    if not np.array_equal(np.isnan(a.truth), np.isnan(b.truth)) or \
            not np.array_equal(np.nan_to_num(a.truth) >= 0.5, np.nan_to_num(b.truth) >= 0.5):
        raise DataError("the two sets of scored cells give the same cells different labels")
    keys = None if groups is None else np.array([groups[path] for path in a.paths])
    whole, weights = _whole(len(a.paths)), _resamples(len(a.paths), replicates, seed, keys)
    point_a, point_b = _figures(a, whole), _figures(b, whole)
    diff_a, diff_b = _figures(a, weights), _figures(b, weights)
    result = {}
    for name in point_a:
        low, high = _interval(diff_b[name] - diff_a[name])
        lower_is_better = name in ("review_burden", "flagged")
        a_value, b_value = _value(point_a[name][0]), _value(point_b[name][0])
        verdict = "same"
        if a_value is None or b_value is None or low is None:  # e.g. recall where no cell is positive
            verdict = "n/a"
        elif low > 0 or high < 0:
            verdict = "better" if (low > 0) != lower_is_better else "worse"
        result[name] = {"a": a_value, "b": b_value, "low": low, "high": high, "verdict": verdict,
                        "difference": None if a_value is None or b_value is None else b_value - a_value}
    return {"cells": len(a.paths), "labels": a.labels, "figures": result}
