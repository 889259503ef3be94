"""Figures of an evaluation: precision-recall and ROC curves with the operating
points marked, and per label a matrix of the decisions (ok / review / defect)
against the truth, each label on the cells whose label is known. Torch-free
(matplotlib's object API, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from elcell.infer.metrics import _ratio, known_cells, label_metrics
from elcell.io import atomic_path

DECISIONS = ("ok", "review", "defect")


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")


def _column(known: np.ndarray | None, j: int) -> np.ndarray | None:
    return None if known is None else known[:, j]


def plot_curves(labels: list[str], positives: np.ndarray, probs: np.ndarray,
                thresholds: list[float], review_thresholds: list[float], out: Path,
                suffix: str = "", title: str = "", known: np.ndarray | None = None) -> list[Path]:
    """pr_curve.png, roc_curve.png and confusion_matrix.png (one line / panel per
    label, on the cells whose label is `known`, default all)."""
    written = []
    pr, roc = Figure(figsize=(5.5, 4.5)), Figure(figsize=(5.5, 4.5))
    ax_pr, ax_roc = pr.add_subplot(), roc.add_subplot()
    for j, label in enumerate(labels):
        y, p, _ = known_cells(positives[:, j], probs[:, j], _column(known, j))
        if not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        line, = ax_pr.plot(recall, precision, label=f"{label} (AP {average_precision_score(y, p):.3f})")
        for cut, marker in ((thresholds[j], "o"), (review_thresholds[j], "v")):
            predicted = p >= cut
            if predicted.any():  # no cell called positive: no precision to mark
                ax_pr.plot(_ratio((predicted & (y == 1)).sum(), y.sum()),
                           _ratio((predicted & (y == 1)).sum(), predicted.sum()), marker,
                           color=line.get_color())
        if not y.all():
            fpr, tpr, _ = roc_curve(y, p)
            ax_roc.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, p):.3f})")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
              title=f"Precision-recall {title}(o threshold, v review)".strip())
    ax_roc.plot([0, 1], [0, 1], ":", color="gray")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
               title=f"ROC {title}".strip())
    for ax in (ax_pr, ax_roc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left" if ax is ax_pr else "lower right")
    for figure, name in ((pr, "pr_curve"), (roc, "roc_curve")):
        path = out / f"{name}{suffix}.png"
        _save(figure, path)
        written.append(path)

    matrix = Figure(figsize=(4.2 * len(labels), 3.4), layout="constrained")
    for j, label in enumerate(labels):
        ax = matrix.add_subplot(1, len(labels), j + 1)
        m = label_metrics(positives[:, j], probs[:, j], thresholds[j], review_thresholds[j], _column(known, j))
        # review is its own column: a cell a person will look at is neither ok nor defect
        counts = np.array([[m["decisions"][truth][d] for d in DECISIONS] for truth in ("ok", "defect")])
        ax.imshow(counts, cmap="Blues")
        for (r, c), value in np.ndenumerate(counts):
            ax.text(c, r, str(value), ha="center", va="center",
                    color="white" if value > counts.max() / 2 else "black")
        ax.set(xticks=[0, 1, 2], yticks=[0, 1], xticklabels=list(DECISIONS), yticklabels=["ok", "defect"],
               xlabel="decided", ylabel="true",
               title=f"{label}: defect >= {thresholds[j]:.3g}, review >= {review_thresholds[j]:.3g}"
                     + (f"\n({m['unknown']} cells unknown, left out)" if m["unknown"] else ""))
    path = out / f"confusion_matrix{suffix}.png"
    _save(matrix, path)
    written.append(path)
    return written
