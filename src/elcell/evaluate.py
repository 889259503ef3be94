"""How good is a model on labelled cells, and which thresholds should it use.

Torch-free: ONNX Runtime (via elcell.infer), scikit-learn metrics and
matplotlib plots. Writes metrics.json, predictions.csv, PR/ROC curves and
confusion matrices to one folder, and with threshold tuning a copy of the
model carrying the tuned thresholds, which `elcell predict` then uses.

A cell is positive for a label when its target is >= 0.5 (ELPV targets are
expert probabilities). A cell is predicted positive (`defect`) when its
probability is >= the label's threshold; between the review threshold and the
threshold it is `review`, which counts as negative for precision/recall/F1,
but a person looks at it, so `recall_with_review` counts it as caught.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from elcell.errors import DataError
from elcell.infer import CSV_SEPARATOR, DEFECT, REVIEW, Model, decide, default_workers, score
from elcell.io import atomic_path, atomic_write_json, atomic_write_text
from elcell.labels import LabelTable, load_table


@dataclass
class Predictions:
    """Probabilities of the readable cells of a label table, aligned with its targets."""

    paths: list[Path]
    labels: list[str]
    positives: np.ndarray  # int [N, L], 1 where target >= 0.5
    probs: np.ndarray  # float [N, L]; the TTA mean with tta
    plain: np.ndarray | None  # float [N, L] without TTA; None without tta
    groups: list[str] | None
    failed: list[tuple[str, str]]


def predict_table(model: Model, table: LabelTable, batch_size: int = 16, workers: int | None = None,
                  tta: bool = False, progress: bool = True, print_failed: bool = True) -> Predictions:
    """Run the model over every cell of `table` whose labels the model has.

    Bad images are left out and listed in `failed` (and printed on stderr
    unless not print_failed)."""
    from tqdm import tqdm

    labels = [label for label in model.info.labels if label in table.names]
    for label in [label for label in model.info.labels if label not in labels]:
        # a label of the model missing from the data is left out with a note, but a
        # misspelt column would then silently go unscored
        near = [name for name in table.names if name.casefold() == label.casefold()]
        if near:
            raise DataError(f"{table.source}: column {near[0]!r} differs from the model's label {label!r} "
                            "only in case; rename the column")
    if not labels:
        raise DataError(f"{table.source}: none of the model's labels {model.info.labels} is a column "
                        f"of the data (its labels are {table.names})")
    model_columns = [model.info.labels.index(label) for label in labels]
    table_columns = [table.names.index(label) for label in labels]
    probs = np.empty((len(table), len(labels)), dtype=np.float32)
    plain = np.empty_like(probs)
    ok = np.zeros(len(table), dtype=bool)
    failed: list[tuple[str, str]] = []
    row = 0
    workers = default_workers() if workers is None else workers
    with tqdm(total=len(table), unit="cell", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for scored in score(model, table.paths, batch_size, workers, tta):
            n = len(scored.paths)
            probs[row:row + n] = scored.probs[:, model_columns]
            plain[row:row + n] = scored.plain[:, model_columns]
            for i, error in enumerate(scored.errors):
                if error is None:
                    ok[row + i] = True
                else:
                    failed.append((str(scored.paths[i]), error))
                    if print_failed:
                        bar.write(f"elcell: {scored.paths[i]}: {error} (skipped)", file=sys.stderr)
            row += n
            bar.update(n)
    if not ok.any():
        raise DataError(f"{table.source}: none of its {len(table)} images could be read")
    keep = np.flatnonzero(ok)
    return Predictions(
        paths=[table.paths[i] for i in keep], labels=labels,
        positives=table.positives[keep][:, table_columns], probs=probs[keep],
        plain=plain[keep] if tta else None,
        groups=None if table.groups is None else [table.groups[i] for i in keep], failed=failed,
    )


# --------------------------------------------------------------------------- metrics
def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def label_metrics(positive: np.ndarray, prob: np.ndarray, threshold: float,
                  review_threshold: float) -> dict:
    """Metrics of one label at one operating point. ROC-AUC and average precision
    need both classes (positives for AP) and are None otherwise."""
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    positive = positive.astype(bool)
    predicted = prob >= threshold
    in_review = (prob >= min(review_threshold, threshold)) & ~predicted
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(positive, predicted, labels=[False, True]).ravel())
    both = 0 < positive.sum() < len(positive)
    return {
        "threshold": float(threshold),
        "review_threshold": float(min(review_threshold, threshold)),
        "cells": int(len(positive)),
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
        "recall_with_review": _ratio(int(((predicted | in_review) & positive).sum()), int(positive.sum())),
    }


def report(positives: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: list[float],
           review_thresholds: list[float]) -> dict:
    """Per-label metrics plus the seed's weighted F1 (weighted by positives), the
    mean F1 over labels and how many cells land in review."""
    per_label = {label: label_metrics(positives[:, j], probs[:, j], thresholds[j], review_thresholds[j])
                 for j, label in enumerate(labels)}
    support = np.array([m["positives"] for m in per_label.values()], dtype=np.float64)
    f1 = np.array([m["f1"] for m in per_label.values()])
    decisions = decide(probs, None, thresholds, review_thresholds) if len(probs) else np.zeros((0, 0))
    review_only = (decisions == REVIEW).any(axis=1) & ~(decisions == DEFECT).any(axis=1)
    return {
        "cells": int(len(probs)),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "mean_f1": float(f1.mean()),
        "cells_in_review": int(review_only.sum()),
        "per_label": per_label,
    }


HEADLINE = ("accuracy", "f1", "precision", "recall", "roc_auc")


def headline(metrics: dict) -> dict:
    """The figures of an evaluation worth a line in summary.json: weighted/mean F1
    and per label accuracy, F1, precision, recall, ROC-AUC; the same per group."""
    def compact(block: dict) -> dict:
        return {"cells": block["cells"], "weighted_f1": block["weighted_f1"], "mean_f1": block["mean_f1"],
                **{label: {k: m[k] for k in HEADLINE} for label, m in block["per_label"].items()}}

    result = {"tta": metrics["tta"], **compact(metrics)}
    if "groups" in metrics:
        result["groups"] = {name: compact(block) for name, block in metrics["groups"].items()}
    return result


# --------------------------------------------------------------------------- tuning
def _midpoint(ranked: np.ndarray, k: int) -> float:
    """A threshold that includes the k highest probabilities of `ranked` (sorted
    descending) and nothing below: halfway to the next lower probability, so a
    slightly different runtime (int8, GPU) does not flip the boundary cell."""
    above = float(ranked[k - 1])
    below = float(ranked[k]) if k < len(ranked) else 0.0
    return above if above == below else (above + below) / 2


def threshold_for_recall(positive: np.ndarray, prob: np.ndarray, recall: float) -> float:
    """The highest threshold whose recall on these cells is >= `recall`."""
    positive = positive.astype(bool)
    caught = np.sort(prob[positive])[::-1]
    need = max(1, math.ceil(recall * len(caught) - 1e-9))
    boundary = caught[need - 1]
    below = prob[prob < boundary]
    return float(boundary + below.max()) / 2 if len(below) else float(boundary)


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


def tune(predictions: Predictions, thresholds: list[float], review_thresholds: list[float],
         method: str | None, review_band: str | None) -> tuple[list[float], list[float], dict]:
    """New thresholds (and review thresholds) for the predicted labels, with what
    each label got. Labels without positives keep their thresholds."""
    thresholds, review_thresholds = list(thresholds), list(review_thresholds)
    kind, target = parse_tuning(method) if method else (None, None)
    band = parse_review_band(review_band) if review_band else None
    details: dict = {}
    for j, label in enumerate(predictions.labels):
        positive, prob = predictions.positives[:, j], predictions.probs[:, j]
        old, old_review = thresholds[j], review_thresholds[j]
        note = None
        if kind and not positive.any():
            note = "no positive cells: threshold kept"
        elif kind == "f1":
            thresholds[j] = threshold_for_f1(positive, prob)
        elif kind == "recall":
            thresholds[j] = threshold_for_recall(positive, prob, target)
        if band is None:  # keep the model's band width
            review_thresholds[j] = max(0.0, thresholds[j] - (old - old_review))
        elif band[0] == "probability":
            review_thresholds[j] = min(band[1], thresholds[j])
        elif positive.any():
            review_thresholds[j] = min(threshold_for_recall(positive, prob, band[1]), thresholds[j])
        else:
            review_thresholds[j] = thresholds[j]
            note = "no positive cells: no review band"
        at = label_metrics(positive, prob, thresholds[j], review_thresholds[j])
        details[label] = {
            "threshold": thresholds[j], "previous_threshold": old,
            "review_threshold": review_thresholds[j], "previous_review_threshold": old_review,
            **{key: at[key] for key in ("precision", "recall", "f1", "review", "recall_with_review")},
        }
        if note:
            details[label]["note"] = note
    return thresholds, review_thresholds, details


# --------------------------------------------------------------------------- plots
def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_curves(predictions: Predictions, positives: np.ndarray, probs: np.ndarray,
                thresholds: list[float], review_thresholds: list[float], out: Path,
                suffix: str = "", title: str = "") -> list[Path]:
    """pr_curve.png, roc_curve.png and confusion_matrix.png (one line / panel per label)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    labels = predictions.labels
    written = []
    pr, roc = Figure(figsize=(5.5, 4.5)), Figure(figsize=(5.5, 4.5))
    ax_pr, ax_roc = pr.add_subplot(), roc.add_subplot()
    for j, label in enumerate(labels):
        y, p = positives[:, j], probs[:, j]
        if not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        line, = ax_pr.plot(recall, precision, label=f"{label} (AP {average_precision_score(y, p):.3f})")
        for cut, marker in ((thresholds[j], "o"), (review_thresholds[j], "v")):
            predicted = p >= cut
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

    matrix = Figure(figsize=(3.4 * len(labels), 3.4), layout="constrained")
    for j, label in enumerate(labels):
        ax = matrix.add_subplot(1, len(labels), j + 1)
        m = label_metrics(positives[:, j], probs[:, j], thresholds[j], review_thresholds[j])
        cm = m["confusion_matrix"]
        counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        ax.imshow(counts, cmap="Blues")
        for (r, c), value in np.ndenumerate(counts):
            ax.text(c, r, str(value), ha="center", va="center",
                    color="white" if value > counts.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["ok", "defect"], yticklabels=["ok", "defect"],
               xlabel="predicted", ylabel="true",
               title=f"{label} @ {thresholds[j]:.3g}\n{m['review']} in review")
    path = out / f"confusion_matrix{suffix}.png"
    _save(matrix, path)
    written.append(path)
    return written


# --------------------------------------------------------------------------- evaluate
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "group"


def write_predictions(path: Path, predictions: Predictions, thresholds: list[float],
                      review_thresholds: list[float]) -> None:
    """One row per evaluated cell, so the misses can be looked at."""
    labels = predictions.labels
    decisions = decide(predictions.probs, None, thresholds, review_thresholds)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=CSV_SEPARATOR, lineterminator="\n")
    group = ["group"] if predictions.groups is not None else []
    writer.writerow(["path", *group, *(f"true_{n}" for n in labels), *(f"prob_{n}" for n in labels),
                     *(f"decision_{n}" for n in labels)])
    for i, image in enumerate(predictions.paths):
        writer.writerow([str(image), *([predictions.groups[i]] if group else []),
                         *predictions.positives[i], *(f"{p:.6f}" for p in predictions.probs[i]),
                         *decisions[i]])
    atomic_write_text(path, buffer.getvalue())


def evaluate(model: Model, data: str | LabelTable, out: str | Path, group: str | None = None, tta: bool = False,
             tune_thresholds: str | None = None, review_band: str | None = None,
             batch_size: int = 16, workers: int | None = None, progress: bool = True,
             html_report: bool = False) -> dict:
    """Score `model` on labelled cells; write metrics.json, predictions.csv and plots
    to `out`; with tuning also `out/<model>.tuned.onnx`; with html_report also
    `out/report.html`. Returns the metrics. `data` is a labels CSV, 'elpv', or an
    already loaded table (its groups, if any, are reported)."""
    from elcell.modelinfo import write_info

    if tune_thresholds:
        parse_tuning(tune_thresholds)
    if review_band:
        parse_review_band(review_band)
    if isinstance(data, LabelTable):
        table, data = data, data.source
    else:
        table = load_table(data, group=group)
        if group is None:
            table = replace(table, groups=None)  # ELPV always has cell types; report them when asked
    out = Path(out)
    info = model.info
    predictions = predict_table(model, table, batch_size, workers, tta, progress)
    columns = [info.labels.index(label) for label in predictions.labels]
    thresholds = [info.thresholds[c] for c in columns]
    review_thresholds = [info.review_thresholds[c] for c in columns]

    metrics: dict = {
        "model": str(model.path), "data": str(data), "provider": model.provider, "tta": tta,
        "labels": predictions.labels,
        "labels_not_in_data": [label for label in info.labels if label not in predictions.labels],
        "images": len(table), "failed": [{"path": p, "error": e} for p, e in predictions.failed],
    }
    tuned_model = None
    if tune_thresholds or review_band:
        before = report(predictions.positives, predictions.probs, predictions.labels, thresholds,
                        review_thresholds)
        thresholds, review_thresholds, details = tune(predictions, thresholds, review_thresholds,
                                                      tune_thresholds, review_band)
        all_thresholds, all_review = list(info.thresholds), list(info.review_thresholds)
        for c, high, low in zip(columns, thresholds, review_thresholds, strict=True):
            all_thresholds[c], all_review[c] = high, low
        tuned_model = out / f"{model.path.stem}.tuned.onnx"
        tuning = {"method": tune_thresholds, "review_band": review_band, "data": str(data),
                  "cells": len(predictions.paths), "tta": tta, "per_label": details}
        tuned_info = replace(info, thresholds=all_thresholds, review_thresholds=all_review,
                             extra={**info.extra, "tuning": tuning})
        write_info(model.path, tuned_model, tuned_info)
        metrics["tuning"] = {**tuning, "model": str(tuned_model),
                             "before": {k: before[k] for k in ("weighted_f1", "mean_f1", "cells_in_review")}
                             | {"per_label": {label: {k: m[k] for k in ("threshold", "precision", "recall", "f1")}
                                              for label, m in before["per_label"].items()}}}

    metrics["thresholds"] = dict(zip(predictions.labels, thresholds, strict=True))
    metrics["review_thresholds"] = dict(zip(predictions.labels, review_thresholds, strict=True))
    metrics.update(report(predictions.positives, predictions.probs, predictions.labels, thresholds,
                          review_thresholds))
    if tta:
        metrics["without_tta"] = report(predictions.positives, predictions.plain, predictions.labels,
                                        thresholds, review_thresholds)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(predictions, predictions.positives, predictions.probs, thresholds,
                        review_thresholds, out)
    if predictions.groups is not None:
        metrics["groups"] = {}
        names = np.array(predictions.groups)
        for name in sorted(set(predictions.groups)):
            rows = np.flatnonzero(names == name)
            metrics["groups"][name] = report(predictions.positives[rows], predictions.probs[rows],
                                             predictions.labels, thresholds, review_thresholds)
            if tta:
                metrics["groups"][name]["without_tta"] = report(
                    predictions.positives[rows], predictions.plain[rows], predictions.labels,
                    thresholds, review_thresholds)
            plots += plot_curves(predictions, predictions.positives[rows], predictions.probs[rows],
                                 thresholds, review_thresholds, out, suffix=f"_{_slug(name)}",
                                 title=f"({name}) ")
    write_predictions(out / "predictions.csv", predictions, thresholds, review_thresholds)
    metrics["plots"] = [p.name for p in plots]
    atomic_write_json(out / "metrics.json", metrics)
    if html_report:
        write_html_report(model, predictions, metrics, plots, thresholds, out / "report.html",
                          subtitle=f"{model.path.name} on {data}")
    else:  # one from an earlier evaluation into `out` would contradict metrics.json
        (out / "report.html").unlink(missing_ok=True)
    return metrics


def write_html_report(model: Model, predictions: Predictions, metrics: dict, plots: list[Path],
                      thresholds: list[float], out_html: Path, subtitle: str = "") -> Path:
    """The self-contained HTML report: metrics, curves, and per label galleries of the
    most confident true positives, false positives and false negatives with overlays.
    Only the cells shown are decoded again and run for their heatmaps."""
    from elcell.explain import build_galleries, write_report
    from elcell.images import load_cell

    columns = [model.info.labels.index(label) for label in predictions.labels]

    def cell(i: int) -> np.ndarray:
        return load_cell(predictions.paths[i], model.info.image_size, model.info.shrink, model.info.bit_depth)

    def heatmap(i: int) -> np.ndarray:
        return model.run(cell(i)[None], heatmaps=True)[1][0][columns]

    galleries = build_galleries(predictions.labels, [str(p) for p in predictions.paths],
                                predictions.probs, predictions.positives, thresholds, cell, heatmap)
    figures = [(path.stem.replace("_", " "), path) for path in plots]
    shown = {k: v for k, v in metrics.items() if k not in ("plots", "failed")}
    shown["failed"] = len(metrics["failed"])
    return write_report(out_html, shown, figures, galleries, subtitle=subtitle)


def format_report(metrics: dict) -> str:
    """The metrics as a short text table for the terminal."""
    lines = []

    def table(block: dict, title: str) -> None:
        lines.append(title)
        lines.append(f"  {'label':<14}{'cells':>6}{'pos':>6}{'thresh':>8}{'prec':>7}{'recall':>7}"
                     f"{'F1':>7}{'AUC':>7}{'AP':>7}{'review':>7}{'rec+rev':>8}")
        for label, m in block["per_label"].items():
            auc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
            ap = "-" if m["average_precision"] is None else f"{m['average_precision']:.3f}"
            lines.append(f"  {label:<14}{m['cells']:>6}{m['positives']:>6}{m['threshold']:>8.3f}"
                         f"{m['precision']:>7.3f}{m['recall']:>7.3f}{m['f1']:>7.3f}{auc:>7}{ap:>7}"
                         f"{m['review']:>7}{m['recall_with_review']:>8.3f}")
        lines.append(f"  weighted F1 {block['weighted_f1']:.4f}, mean F1 {block['mean_f1']:.4f}, "
                     f"{block['cells_in_review']} of {block['cells']} cells in review")

    table(metrics, "all cells" + (" (TTA: mean over flips/rotations)" if metrics["tta"] else ""))
    if "without_tta" in metrics:
        table(metrics["without_tta"], "all cells without TTA")
    for name, block in metrics.get("groups", {}).items():
        table(block, f"group {name}")
    if "tuning" in metrics:
        tuning = metrics["tuning"]
        before = tuning["before"]
        lines.append(f"tuned ({tuning['method'] or 'thresholds kept'}"
                     f"{', review band ' + tuning['review_band'] if tuning['review_band'] else ''}) "
                     f"on these {tuning['cells']} cells -> {tuning['model']}")
        for label, d in tuning["per_label"].items():
            lines.append(f"  {label}: threshold {d['previous_threshold']:.4f} -> {d['threshold']:.4f} "
                         f"(precision {d['precision']:.3f}, recall {d['recall']:.3f}, F1 {d['f1']:.3f}), "
                         f"review from {d['review_threshold']:.4f}: {d['review']} cells"
                         + (f" [{d['note']}]" if "note" in d else ""))
        lines.append(f"  before tuning: weighted F1 {before['weighted_f1']:.4f}, mean F1 "
                     f"{before['mean_f1']:.4f}; metrics tuned on the same cells are optimistic: "
                     "tune on validation cells, evaluate on others")
    if metrics["labels_not_in_data"]:
        lines.append(f"model labels not in the data (not evaluated): {metrics['labels_not_in_data']}")
    failed = metrics["failed"]
    if failed:
        lines.append(f"{len(failed)} of {metrics['images']} images could not be read and were skipped "
                     f"(first: {failed[0]['path']}: {failed[0]['error']})")
    return "\n".join(lines)
