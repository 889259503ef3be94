"""`elcell evaluate`: how good a model is on labelled cells, and which
thresholds it should use. Torch-free.

Writes metrics.json (elcell.infer.metrics), predictions.csv, PR/ROC curves and
confusion matrices to one folder, optionally the HTML report
(elcell.infer.report), and with threshold tuning a copy of the model carrying the
tuned thresholds, which `elcell predict` then uses.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from elcell.cells.images import load_cell, read_gray
from elcell.cells.inputs import Unreadable, report_unreadable
from elcell.cells.labels import LabelTable, load_table
from elcell.errors import DataError
from elcell.infer.metrics import (
    check_estimator,
    fmt,
    parse_review_band,
    parse_tuning,
    summary,
    tune,
)
from elcell.infer.modelinfo import write_info
from elcell.infer.plots import plot_curves
from elcell.infer.predict import CSV_SEPARATOR
from elcell.infer.report import Table, build_galleries, write_report
from elcell.infer.runtime import Model, decide, default_workers, open_model, score_files
from elcell.infer.scorecard import format_report, unknown_note
from elcell.io import atomic_write_json, atomic_write_text, check_out_folder
from elcell.options import show_progress


@dataclass
class Predictions:
    """Probabilities of the readable cells of a label table, aligned with its targets."""

    paths: list[Path]
    labels: list[str]
    positives: np.ndarray  # int [N, L], 1 where target >= 0.5
    probs: np.ndarray  # float [N, L]; the TTA mean with tta
    plain: np.ndarray | None  # float [N, L] without TTA; None without tta
    groups: list[str] | None
    failed: list[Unreadable]
    # bool [N, L], False where the label was left empty (unknown: positives is 0
    # there, and the metrics leave the cell out for that label); None: all known
    known: np.ndarray | None = None


def shared_labels(model: Model, table: LabelTable) -> list[str]:
    """The model's labels that are columns of the data, in the model's order.

    A label of the model missing from the data is left out (evaluate notes it),
    but one that differs only in case is refused: a misspelt column would
    otherwise silently go unscored."""
    labels = [label for label in model.info.labels if label in table.names]
    for label in [label for label in model.info.labels if label not in labels]:
        near = [name for name in table.names if name.casefold() == label.casefold()]
        if near:
            raise DataError(f"{table.source}: column {near[0]!r} differs from the model's label {label!r} "
                            "only in case; rename the column")
    if not labels:
        raise DataError(f"{table.source}: none of the model's labels {model.info.labels} is a column "
                        f"of the data (its labels are {table.names})")
    return labels


def predict_table(model: Model, table: LabelTable, batch_size: int = 16, workers: int | None = None,
                  tta: bool = False, progress: bool = True, print_failed: bool = True) -> Predictions:
    """Run the model over every cell of `table` whose labels the model has.

    Bad images are left out and listed in `failed` (and reported on stderr
    unless not print_failed)."""
    labels = shared_labels(model, table)
    model_columns = [model.info.labels.index(label) for label in labels]
    probs = np.empty((len(table), len(labels)), dtype=np.float32)
    plain = np.empty_like(probs)
    failed: list[Unreadable] = []
    row = 0
    workers = default_workers() if workers is None else workers
    with tqdm(total=len(table), unit="cell", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for scored in score_files(model, table.paths, batch_size, workers, tta):
            n = len(scored.paths)
            probs[row:row + n] = scored.probs[:, model_columns]
            plain[row:row + n] = scored.plain[:, model_columns]
            for item in [Unreadable(str(p), e) for p, e in zip(scored.paths, scored.errors) if e is not None]:
                failed.append(item)
                if print_failed:
                    bar.clear()
                    report_unreadable(item, "skipped")
            row += n
            bar.update(n)
    keep = np.flatnonzero(~np.isnan(probs).any(axis=1))
    if not len(keep):
        raise DataError(f"{table.source}: none of its {len(table)} images could be read")
    table_columns = [table.names.index(label) for label in labels]
    return Predictions(
        paths=[table.paths[i] for i in keep], labels=labels,
        positives=table.positives[keep][:, table_columns], probs=probs[keep],
        plain=plain[keep] if tta else None,
        groups=None if table.groups is None else [table.groups[i] for i in keep], failed=failed,
        known=table.known[keep][:, table_columns],
    )


def known_labels(predictions: Predictions) -> np.ndarray:
    """bool [N, L]: where each cell's label is known (all of them without `known`)."""
    if predictions.known is None:
        return np.ones(predictions.positives.shape, dtype=bool)
    return predictions.known


# --------------------------------------------------------------------------- evaluate
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "group"


def write_predictions(path: Path, predictions: Predictions, thresholds: list[float],
                      review_thresholds: list[float]) -> None:
    """One row per evaluated cell, so the misses can be looked at; a label left
    empty in the data (unknown) has an empty true_ column."""
    labels = predictions.labels
    decisions = decide(predictions.probs, thresholds, review_thresholds)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=CSV_SEPARATOR, lineterminator="\n")
    group = ["group"] if predictions.groups is not None else []
    writer.writerow(["path", *group, *(f"true_{n}" for n in labels), *(f"prob_{n}" for n in labels),
                     *(f"decision_{n}" for n in labels)])
    known = known_labels(predictions)
    for i, image in enumerate(predictions.paths):
        truth = [int(t) if k else "" for t, k in zip(predictions.positives[i], known[i])]  # empty: unknown
        writer.writerow([str(image), *([predictions.groups[i]] if group else []),
                         *truth, *(f"{p:.6f}" for p in predictions.probs[i]), *decisions[i]])
    atomic_write_text(path, buffer.getvalue())


def _check_tuning(tune_thresholds: str | None, review_band: str | None, recall_estimator: str) -> bool:
    """Refuse bad tuning options before any cell is scored; whether a recall
    target is read off the cells (and so the estimator matters)."""
    kind = parse_tuning(tune_thresholds)[0] if tune_thresholds else None
    band = parse_review_band(review_band)[0] if review_band else None
    check_estimator(recall_estimator)
    return "recall" in (kind, band)


def evaluate(model: Model, data: str | LabelTable, out: str | Path, group: str | None = None, tta: bool = False,
             tune_thresholds: str | None = None, review_band: str | None = None,
             recall_estimator: str = "empirical", batch_size: int = 16, workers: int | None = None,
             progress: bool = True,
             html_report: bool = False) -> dict:
    """Score `model` on labelled cells; write metrics.json, predictions.csv and plots
    to `out`; with tuning also `out/<model>.tuned.onnx`; with html_report also
    `out/report.html`. Returns the metrics. `data` is a labels CSV, 'elpv', or an
    already loaded table (its groups, if any, are reported)."""
    reads_recall = _check_tuning(tune_thresholds, review_band, recall_estimator)
    out = check_out_folder(out)  # before a cell is scored
    if isinstance(data, LabelTable):
        table, data = data, data.source
    else:
        table = load_table(data, group=group)
        if group is None:
            table = replace(table, groups=None)  # ELPV always has cell types; report them when asked
    info = model.info
    predictions = predict_table(model, table, batch_size, workers, tta, progress)
    known = known_labels(predictions)
    columns = [info.labels.index(label) for label in predictions.labels]
    thresholds = [info.thresholds[c] for c in columns]
    review_thresholds = [info.review_thresholds[c] for c in columns]

    metrics: dict = {
        "model": str(model.path), "data": str(data), "provider": model.provider, "tta": tta,
        "labels": predictions.labels,
        "labels_not_in_data": [label for label in info.labels if label not in predictions.labels],
        "columns_not_labels": [name for name in table.names if name not in info.labels],
        "images": len(table), "failed": [{"path": u.path, "error": u.reason} for u in predictions.failed],
    }
    tuned_model = None
    if tune_thresholds or review_band:
        before = summary(predictions.positives, predictions.probs, predictions.labels, thresholds,
                        review_thresholds, known)
        thresholds, review_thresholds, details = tune(predictions.labels, predictions.positives,
                                                      predictions.probs, thresholds, review_thresholds,
                                                      tune_thresholds, review_band, known, recall_estimator)
        all_thresholds, all_review = list(info.thresholds), list(info.review_thresholds)
        for c, high, low in zip(columns, thresholds, review_thresholds, strict=True):
            all_thresholds[c], all_review[c] = high, low
        tuned_model = out / f"{model.path.stem}.tuned.onnx"
        tuning = {"method": tune_thresholds, "review_band": review_band,
                  "estimator": recall_estimator if reads_recall else None, "data": str(data),
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
    metrics.update(summary(predictions.positives, predictions.probs, predictions.labels, thresholds,
                          review_thresholds, known))
    if tta:
        metrics["without_tta"] = summary(predictions.positives, predictions.plain, predictions.labels,
                                        thresholds, review_thresholds, known)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(predictions.labels, predictions.positives, predictions.probs, thresholds,
                        review_thresholds, out, known=known)
    if predictions.groups is not None:
        metrics["groups"] = {}
        names = np.array(predictions.groups)
        for name in sorted(set(predictions.groups)):
            rows = np.flatnonzero(names == name)
            metrics["groups"][name] = summary(predictions.positives[rows], predictions.probs[rows],
                                             predictions.labels, thresholds, review_thresholds, known[rows])
            if tta:
                metrics["groups"][name]["without_tta"] = summary(
                    predictions.positives[rows], predictions.plain[rows], predictions.labels,
                    thresholds, review_thresholds, known[rows])
            plots += plot_curves(predictions.labels, predictions.positives[rows], predictions.probs[rows],
                                 thresholds, review_thresholds, out, suffix=f"_{_slug(name)}",
                                 title=f"({name}) ", known=known[rows])
    write_predictions(out / "predictions.csv", predictions, thresholds, review_thresholds)
    metrics["plots"] = [p.name for p in plots]
    _drop_earlier_plots(out, metrics["plots"])
    atomic_write_json(out / "metrics.json", metrics)
    if html_report:
        write_html_report(model, predictions, metrics, plots, thresholds, out / "report.html",
                          subtitle=f"{model.path.name} on {data}")
    else:  # one from an earlier evaluation into `out` would contradict metrics.json
        (out / "report.html").unlink(missing_ok=True)
    return metrics


def _drop_earlier_plots(out: Path, plots: list[str]) -> None:
    """Plots an earlier evaluation into `out` drew and this one did not (another
    --group, other labels): left there, they would contradict metrics.json."""
    try:
        earlier = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("plots", [])
    except (OSError, ValueError, AttributeError):  # none, or not elcell's: nothing is removed
        return
    for name in earlier:
        if isinstance(name, str) and name not in plots and Path(name).name == name and name.endswith(".png"):
            (out / name).unlink(missing_ok=True)


PER_LABEL = (("cells", "cells scored"), ("unknown", "unknown (not scored)"), ("positives", "positives"),
             ("threshold", "threshold"), ("review_threshold", "review from"),
             ("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("accuracy", "accuracy"),
             ("roc_auc", "ROC-AUC"), ("average_precision", "average precision"), ("review", "cells in review"),
             ("recall_with_review", "recall counting review"))


def _label_table(title: str, block: dict) -> Table:
    return Table(title, [heading for _, heading in PER_LABEL],
                 [(label, [m[key] for key, _ in PER_LABEL]) for label, m in block["per_label"].items()],
                 note=unknown_note(block))


MAX_FAILED_SHOWN = 20  # unreadable images listed in report.html; metrics.json lists all


def report_tables(metrics: dict) -> list[Table]:
    """The metrics as tables a person reads: a summary, per label, per group,
    and what tuning changed."""
    summary = [("model", Path(metrics["model"]).name), ("data", metrics["data"]),
               ("images", metrics["images"]), ("images that could not be read", len(metrics["failed"])),
               ("cells scored", metrics["cells"]), ("weighted F1 (by positives)", metrics["weighted_f1"]),
               ("mean F1 over labels", metrics["mean_f1"]), ("cells ok for every label", metrics["cells_ok"]),
               ("cells flagged as defect", metrics["cells_flagged"]),
               ("cells for a person to review", metrics["cells_in_review"]),
               ("review burden (share flagged or in review)", metrics["review_burden"]),
               ("recall counting review", ", ".join(f"{label} {fmt(m['recall_with_review'])}"
                                                    for label, m in metrics["per_label"].items())),
               ("test-time augmentation", "yes" if metrics["tta"] else "no")]
    missing = metrics["labels_not_in_data"]
    tables = [Table("Summary", [], [(name, [value]) for name, value in summary],
                    note=f"Labels of the model not in the data, not scored: {', '.join(missing)}" if missing else ""),
              _label_table("Per label", metrics)]
    failed = metrics["failed"]
    if failed:  # which files, and why: paths and messages are the data's, escaped as every value is
        tables.append(Table("Images that could not be read", ["why"],
                            [(f["path"], [f["error"]]) for f in failed[:MAX_FAILED_SHOWN]],
                            note=f"{len(failed) - MAX_FAILED_SHOWN} more in metrics.json"
                            if len(failed) > MAX_FAILED_SHOWN else ""))
    if "without_tta" in metrics:
        tables.append(_label_table("Per label, without test-time augmentation", metrics["without_tta"]))
    tables += [_label_table(f"Per label, {name} cells", block) for name, block in metrics.get("groups", {}).items()]
    if "tuning" in metrics:
        tuning = metrics["tuning"]
        tables.append(Table(
            "Threshold tuning", ["threshold before", "threshold after", "review from", "precision", "recall",
                                 "F1", "cells in review"],
            [(label, [d["previous_threshold"], d["threshold"], d["review_threshold"], d["precision"],
                      d["recall"], d["f1"], d["review"]]) for label, d in tuning["per_label"].items()],
            note=f"tuned for {tuning['method'] or 'the review band only'} on these {tuning['cells']} cells: "
                 "figures tuned on the same cells are optimistic; tune on validation cells, evaluate on others"))
    return tables


def write_html_report(model: Model, predictions: Predictions, metrics: dict, plots: list[Path],
                      thresholds: list[float], out_html: Path, subtitle: str = "") -> Path:
    """The self-contained HTML report: metrics, curves, and per label galleries of the
    most confident true positives, false positives and false negatives with overlays.
    Only the cells shown are decoded again and run for their heatmaps."""
    columns = [model.info.labels.index(label) for label in predictions.labels]

    def cell(i: int) -> np.ndarray:  # at its own resolution, for the overlay
        return read_gray(predictions.paths[i], model.decoding.bit_depth)

    def heatmap(i: int) -> np.ndarray:
        return model.run(load_cell(predictions.paths[i], model.decoding)[None], heatmaps=True)[1][0][columns]

    galleries = build_galleries(predictions.labels, [str(p) for p in predictions.paths],
                                predictions.probs, predictions.positives, thresholds, cell, heatmap,
                                known=known_labels(predictions))
    figures = [(path.stem.replace("_", " "), path) for path in plots]
    return write_report(out_html, report_tables(metrics), figures, galleries, subtitle=subtitle,
                        gallery_note=GALLERY_NOTE)


GALLERY_NOTE = ("Each overlay shows the label's heatmap on the cell at its own resolution: where the model "
                "found evidence for the label, coloured up to the cell's strongest evidence (the colour bar) "
                "and left untinted where there is little; the box surrounds the hottest region.")


def main(args) -> int:
    """`elcell evaluate` (options: elcell.cli)."""
    model = open_model(args.model, threads=args.threads)
    out = Path(args.out) if args.out else model.path.parent / f"{model.path.stem}-eval"
    check_out_folder(out, "--out" if args.out else "the report folder (--out DIR to choose another)")
    print(f"elcell: {model.path.name} on {model.provider}; data {args.data}", file=sys.stderr)
    metrics = evaluate(model, args.data, out, group=args.group, tta=args.tta,
                       tune_thresholds=args.tune_thresholds, review_band=args.review_band,
                       recall_estimator=args.recall_estimator,
                       batch_size=args.batch_size, workers=args.workers, progress=show_progress(args.progress),
                       html_report=args.report)
    print(format_report(metrics))
    print(f"wrote {out / 'metrics.json'}, predictions.csv and {len(metrics['plots'])} plots to {out}"
          + (f"; report: {out / 'report.html'}" if args.report else ""))
    if metrics["cells"] >= 20 and metrics["cells_ok"] == 0:
        print(f"elcell: warning: no cell is ok: all {metrics['cells']} are defect or review for some label "
              "at these thresholds; is that the operating point you meant?", file=sys.stderr)
    if metrics["failed"]:  # as predict and explain: a script must not take partial metrics for whole ones
        print(f"elcell: {len(metrics['failed'])} of {metrics['images']} images could not be read "
              "(listed above) and are not in the metrics", file=sys.stderr)
        return 1
    return 0
