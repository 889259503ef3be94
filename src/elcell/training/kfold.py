"""`elcell train --folds K`: the k-fold protocol that tells recipes apart.

K models, each trained with one K-th of the cells held out as its test set
(elcell.judging.folds), into RUN/fold0 .. RUN/fold{K-1}, each an ordinary run folder.
Every cell is then scored once by the model that never saw it: RUN/oof.csv,
pooled over all cells, gives figures on 1,600 cells instead of 160, with
bootstrap intervals (elcell.judging.intervals) and the spread between folds.

A protocol run can span sessions: the same command again skips the folds
with a summary.json, resumes one with a last.ckpt, and refuses to mix folds
trained with other options. RUN/kfold.json and RUN/oof.csv are rewritten
after each fold, so what has landed is on disk whatever stops the run.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from elcell.cells.labels import LabelTable, label_fields, load_table
from elcell.errors import DataError
from elcell.infer.metrics import fmt, tune
from elcell.io import atomic_write_json, atomic_write_text, check_out_folder
from elcell.judging.folds import (
    ASSIGNMENT,
    OOF,
    PROTOCOL,
    assign_folds,
    finished_folds,
    fold_folder,
)
from elcell.judging.intervals import Scored, bootstrap, point_figures, read_scored
from elcell.training.config import TrainConfig, complete_run_record
from elcell.training.data import check_labels, fold_split, limit_table
from elcell.training.train import check_options, prepare, train, with_absolute_paths

# options that say how, not what, a fold is trained: a later session may change them
HOW = {"progress", "workers", "devices", "accelerator", "precision", "num_nodes", "cache_dir", "resume"}
SPREAD = ("mean_f1/at_0.5", "mean_f1/own", "review_burden")


def _options(yaml_text: str, also: tuple[str, ...] = ()) -> dict:
    """The options that decide what a fold learns (not where or how fast)."""
    # a record written before an option existed holds what the run did without it
    values = complete_run_record(yaml.safe_load(yaml_text))
    return {k: v for k, v in values.items() if k not in HOW and k not in also}


def _changed(started: dict, wanted: dict) -> list[str]:
    return [f"{k} {started.get(k)} (now {wanted.get(k)})" for k in sorted(set(wanted) | set(started))
            if wanted.get(k) != started.get(k)]


def _check_protocol(run: Path, config: TrainConfig) -> None:
    """Check that RUN's protocol was started with these options, or refuse a
    folder that holds something else."""
    record = run / PROTOCOL
    if record.is_file():
        changed = _changed(_options(record.read_text(), ("fold",)), _options(config.to_yaml(), ("fold",)))
        if changed:
            raise DataError(f"{run}: this k-fold protocol was started with other options: {'; '.join(changed)}. "
                            f"Continue it with `elcell train --config {record}`, or choose another --out")
    elif run.exists() and any(run.iterdir()):
        raise DataError(f"{run}: run folder exists, is not empty and holds no k-fold protocol; "
                        "choose another --out")


def _start_protocol(run: Path, config: TrainConfig) -> None:
    """Check every fold's inputs (bad options, data or a label missing from a
    fold stop the protocol before its folder exists), then record the options
    and each cell's fold."""
    table, _, _ = prepare(replace(config, fold=0))  # also decodes the cells into the cache the folds reuse
    for fold in range(1, config.folds):
        check_labels(table, fold_split(table, config.folds, fold, config.val_fraction, config.seed))
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / ASSIGNMENT, _assignment(table, config))
    atomic_write_text(run / PROTOCOL, replace(config, fold=None).to_yaml())


def _assignment(table: LabelTable, config: TrainConfig) -> str:
    folds = assign_folds(table, config.folds, config.seed)
    return "path;fold\n" + "".join(f"{path};{fold}\n" for path, fold in zip(table.paths, folds))


def _check_assignment(run: Path, config: TrainConfig) -> None:
    """The data must still give every cell the fold it had when the protocol
    started: an edited CSV would mix folds that saw each other's test cells."""
    table = load_table(config.data, group=config.group)
    if config.limit:
        table = limit_table(table, config.limit, config.seed)
    if not (run / ASSIGNMENT).is_file():  # a protocol started before the record existed
        atomic_write_text(run / ASSIGNMENT, _assignment(table, config))
    elif (run / ASSIGNMENT).read_text() != _assignment(table, config):
        raise DataError(f"{config.data}: its cells or their labels changed since the k-fold protocol in "
                        f"{run} started ({run / ASSIGNMENT} holds each cell's fold then); start a new "
                        "protocol with another --out")


def run_fold(config: TrainConfig, run: Path, fold: int) -> None:
    """Train fold `fold` unless it finished: resume it from its last epoch, or
    start it again if it stopped before finishing one."""
    folder = fold_folder(run, fold)
    fold_config = replace(config, out=str(folder), fold=fold, resume=None)
    if (folder / "config.yaml").is_file():  # trained, or begun, by an earlier session: the same fold?
        changed = _changed(_options((folder / "config.yaml").read_text(), ("out",)),
                           _options(fold_config.to_yaml(), ("out",)))
        if changed:
            raise DataError(f"{folder}: trained with other options than this protocol's ({'; '.join(changed)}); "
                            "move it away to train the fold again")
    if (folder / "summary.json").is_file():
        print(f"elcell: fold {fold}: finished earlier, skipped", file=sys.stderr)
        return
    last = folder / "checkpoints" / "last.ckpt"
    if config.finetune_epochs > 0 and folder.exists():
        # a two-stage fold keeps its stages apart (RUN/foldI/pretext): never delete a finished stage
        raise DataError(f"{folder}: this two-stage fold stopped part-way; continue its stage with "
                        f"elcell train --resume {folder}/pretext/checkpoints/last.ckpt (or {last}) "
                        "--finetune-epochs 0, or move the folder away, then run this command again")
    if last.is_file():
        print(f"elcell: fold {fold}: resuming from {last}", file=sys.stderr)
        fold_config = replace(fold_config, resume=str(last))
    elif folder.exists():  # stopped before its first epoch ended: nothing worth keeping
        shutil.rmtree(folder)
    print(f"elcell: fold {fold} of {config.folds}: training into {folder}", file=sys.stderr)
    train(fold_config)


def run_kfold(config: TrainConfig) -> dict:
    """Every fold of the protocol, then its report."""
    if not config.out:
        raise DataError("--folds needs --out: the protocol's folder, so that the same command "
                        "again continues it")
    check_options(config)
    config = with_absolute_paths(config)
    run = check_out_folder(config.out)  # before the cells are decoded
    _check_protocol(run, config)
    if (run / PROTOCOL).is_file():
        _check_assignment(run, config)
    else:
        _start_protocol(run, config)
    # --fold I: that fold alone (another machine or session takes the others)
    for fold in range(config.folds) if config.fold is None else [config.fold]:
        run_fold(config, run, fold)
        report = write_report(run, config)  # results as they land
    return report


# --------------------------------------------------------------------------- report
def gather_oof(run: Path, folds: list[int]) -> Scored:
    """The finished folds' test predictions, one row per cell, with its fold."""
    parts = []
    for fold in folds:
        scored = read_scored(fold_folder(run, fold) / "eval" / "test" / "predictions.csv")
        scored.folds = np.full(len(scored.paths), fold)
        parts.append(scored)
    paths = [p for s in parts for p in s.paths]
    if len(set(paths)) != len(paths):
        raise DataError(f"{run}: a cell is in the test set of two folds; the folds were not trained by "
                        "one protocol")
    return Scored(paths, parts[0].labels,
                  np.concatenate([s.truth for s in parts]), np.concatenate([s.probs for s in parts]),
                  np.concatenate([s.decisions for s in parts]), np.concatenate([s.folds for s in parts]))


def write_oof(path: Path, scored: Scored) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    labels = scored.labels
    writer.writerow(["path", "fold", *(f"true_{n}" for n in labels), *(f"prob_{n}" for n in labels),
                     *(f"decision_{n}" for n in labels)])
    for i, image in enumerate(scored.paths):
        truth = label_fields(scored.truth[i])
        writer.writerow([image, int(scored.folds[i]), *truth, *(f"{p:.6f}" for p in scored.probs[i]),
                         *scored.decisions[i]])
    atomic_write_text(path, buffer.getvalue())


def _per_fold(scored: Scored, folds: list[int]) -> dict:
    result = {}
    for fold in folds:
        rows = np.flatnonzero(scored.folds == fold)
        result[str(fold)] = {"cells": len(rows), **point_figures(scored.subset(rows))}
    return result


def _spread(per_fold: dict) -> dict:
    result = {}
    for name in SPREAD:
        values = np.array([fold[name] for fold in per_fold.values() if fold[name] is not None])
        if not len(values):
            continue
        result[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max())}
    return result


def oof_thresholds(scored: Scored, recall: float, review_recall: float, estimator: str = "empirical") -> dict:
    """Thresholds that reach `recall` (review band down to `review_recall`) on
    the pooled out-of-fold scores, with the recall and review they give on those
    same cells (in-sample): what a model of this recipe would need, chosen on
    every labelled cell rather than on one run's few validation positives."""
    known = ~np.isnan(scored.truth)
    labels = scored.labels
    _, _, details = tune(labels, np.nan_to_num(scored.truth) >= 0.5, scored.probs, [0.5] * len(labels),
                         [0.5] * len(labels), f"recall={recall:g}", f"recall={review_recall:g}", known,
                         estimator)
    return details


def write_report(run: Path, config: TrainConfig) -> dict:
    """RUN/oof.csv and RUN/kfold.json from the folds finished so far."""
    folds = finished_folds(run, config.folds)
    report: dict = {"folds": config.folds, "finished": folds, "recipe": config.recipe, "data": config.data}
    if not folds:
        return report
    scored = gather_oof(run, folds)
    write_oof(run / OOF, scored)
    per_fold = _per_fold(scored, folds)
    report.update(cells=len(scored.paths), labels=scored.labels,
                  unknown={label: int(np.isnan(scored.truth[:, j]).sum()) for j, label in enumerate(scored.labels)},
                  pooled=bootstrap(scored, seed=config.seed), per_fold=per_fold, spread=_spread(per_fold))
    if config.threshold_recall > 0:
        report["oof_thresholds"] = oof_thresholds(scored, config.threshold_recall, config.review_recall or
                                                  config.threshold_recall, config.threshold_estimator)
    atomic_write_json(run / "kfold.json", report)
    return report


def format_report(report: dict) -> str:
    """The pooled figures a person reads first, with their intervals."""
    if "pooled" not in report:
        return f"k-fold: no fold of {report['folds']} has finished"
    pooled = report["pooled"]
    done = len(report["finished"])
    lines = [f"k-fold: {done} of {report['folds']} folds finished"
             + ("" if done == report["folds"] else " (partial: run the same command to go on)")
             + f", {report['cells']} cells scored out of fold (95 % bootstrap intervals over cells)"]

    def figure(name: str) -> str:
        f = pooled[name]
        return f"{fmt(f['value'])} [{fmt(f['low'])}, {fmt(f['high'])}]"

    lines.append(f"{'label':<12}{'unknown':>8}{'F1 at 0.5':>22}{'ROC-AUC':>22}{'recall, own thr.':>22}"
                 f"{'recall+review':>22}")
    for label in report["labels"]:
        lines.append(f"{label:<12}{report['unknown'][label]:>8}{figure(f'{label}/at_0.5_f1'):>22}"
                     f"{figure(f'{label}/roc_auc'):>22}{figure(f'{label}/own_recall'):>22}"
                     f"{figure(f'{label}/own_recall_with_review'):>22}")
    lines.append(f"mean F1 at 0.5 {figure('mean_f1/at_0.5')}; at each fold model's own thresholds "
                 f"{figure('mean_f1/own')}")
    lines.append(f"review burden (cells flagged or in review) {figure('review_burden')}, flagged "
                 f"{figure('flagged')}")
    spread = report["spread"].get("mean_f1/at_0.5")
    if spread:
        lines.append(f"per fold mean F1 at 0.5: {spread['mean']:.3f} ± {spread['std']:.3f} "
                     f"(min {spread['min']:.3f}, max {spread['max']:.3f})")
    for label, d in report.get("oof_thresholds", {}).items():
        lines.append(f"thresholds for {label} chosen on all out-of-fold scores: {d['threshold']:.3f}, review "
                     f"from {d['review_threshold']:.3f} (recall {fmt(d['recall'])}, with review "
                     f"{fmt(d['recall_with_review'])} on those same cells)")
    return "\n".join(lines)


def main(config: TrainConfig) -> int:
    report = run_kfold(config)
    print(format_report(report))
    print(json.dumps({"run": config.out, "oof": str(Path(config.out) / OOF),
                      "report": str(Path(config.out) / "kfold.json")}, indent=2))
    return 0
