"""`elcell train --folds K`: the k-fold protocol that tells recipes apart.

K models, each trained with one K-th of the cells held out as its test set
(elcell.folds), into RUN/fold0 .. RUN/fold{K-1}, each an ordinary run folder.
Every cell is then scored once by the model that never saw it: RUN/oof.csv,
pooled over all cells, gives figures on 1,600 cells instead of 160, with
bootstrap intervals (elcell.intervals) and the spread between folds.

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

from elcell.config import TrainConfig
from elcell.errors import DataError
from elcell.intervals import Scored, bootstrap, point_figures, read_scored
from elcell.io import atomic_write_json, atomic_write_text
from elcell.metrics import tune

PROTOCOL = "kfold.yaml"  # the options the protocol was started with
# options that say how, not what, a fold is trained: a later session may change them
HOW = {"progress", "workers", "devices", "accelerator", "precision", "num_nodes", "cache_dir", "resume"}
SPREAD = ("mean_f1/at_0.5", "mean_f1/own", "review_burden")


def fold_folder(run: Path, fold: int) -> Path:
    return run / f"fold{fold}"


def _check_protocol(run: Path, config: TrainConfig) -> None:
    """Start RUN/kfold.yaml, or check that the folds already there were trained
    with these options."""
    record = run / PROTOCOL
    wanted = {k: v for k, v in yaml.safe_load(config.to_yaml()).items() if k not in HOW}
    if record.is_file():
        started = {k: v for k, v in yaml.safe_load(record.read_text()).items() if k not in HOW}
        changed = [f"{k} {started.get(k)} (now {wanted.get(k)})" for k in sorted(set(wanted) | set(started))
                   if wanted.get(k) != started.get(k)]
        if changed:
            raise DataError(f"{run}: this k-fold protocol was started with other options: {'; '.join(changed)}. "
                            f"Continue it with `elcell train --config {record}`, or choose another --out")
    elif run.exists() and any(run.iterdir()):
        raise DataError(f"{run}: run folder exists, is not empty and holds no k-fold protocol; "
                        "choose another --out")
    else:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, config.to_yaml())


def run_fold(config: TrainConfig, run: Path, fold: int) -> None:
    """Train fold `fold` unless it finished: resume it from its last epoch, or
    start it again if it stopped before finishing one."""
    from elcell.train import train  # imports torch

    folder = fold_folder(run, fold)
    if (folder / "summary.json").is_file():
        print(f"elcell: fold {fold}: finished earlier, skipped", file=sys.stderr)
        return
    fold_config = replace(config, out=str(folder), fold=fold, resume=None)
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"elcell: fold {fold}: resuming from {last}", file=sys.stderr)
        fold_config = replace(fold_config, resume=str(last))
    elif folder.exists():  # stopped before its first epoch ended: nothing worth keeping
        shutil.rmtree(folder)
    print(f"elcell: fold {fold} of {config.folds}: training into {folder}", file=sys.stderr)
    train(fold_config)


def run_kfold(config: TrainConfig) -> dict:
    """Every fold of the protocol, then its report."""
    from elcell.train import prepare, with_absolute_paths  # imports torch

    if not config.out:
        raise DataError("--folds needs --out: the protocol's folder, so that the same command "
                        "again continues it")
    config = with_absolute_paths(config)
    run = Path(config.out)
    if not (run / PROTOCOL).is_file():  # bad options or data stop a new protocol before its folder exists
        prepare(replace(config, fold=0))
    _check_protocol(run, config)
    for fold in range(config.folds):
        run_fold(config, run, fold)
        report = write_report(run, config)  # results as they land
    return report


# --------------------------------------------------------------------------- report
def _finished(run: Path, folds: int) -> list[int]:
    return [i for i in range(folds) if (fold_folder(run, i) / "summary.json").is_file()]


def gather_oof(run: Path, folds: list[int]) -> Scored:
    """The finished folds' test predictions, one row per cell, with its fold."""
    parts = []
    for fold in folds:
        scored = read_scored(fold_folder(run, fold) / "eval" / "test" / "predictions.csv")
        scored.folds = np.full(len(scored.paths), fold)
        parts.append(scored)
    return Scored([p for s in parts for p in s.paths], parts[0].labels,
                  np.concatenate([s.truth for s in parts]), np.concatenate([s.probs for s in parts]),
                  np.concatenate([s.decisions for s in parts]), np.concatenate([s.folds for s in parts]))


def write_oof(path: Path, scored: Scored) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    labels = scored.labels
    writer.writerow(["path", "fold", *(f"true_{n}" for n in labels), *(f"prob_{n}" for n in labels),
                     *(f"decision_{n}" for n in labels)])
    for i, image in enumerate(scored.paths):
        truth = ["" if np.isnan(t) else f"{t:g}" for t in scored.truth[i]]
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
        values = np.array([fold[name] for fold in per_fold.values()])
        result[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max())}
    return result


def oof_thresholds(scored: Scored, recall: float, review_recall: float) -> dict:
    """Thresholds that reach `recall` (review band down to `review_recall`) on
    the pooled out-of-fold scores, with the recall and review they give there:
    what a model of this recipe would need, chosen on every labelled cell."""
    result = {}
    for j, label in enumerate(scored.labels):
        known = ~np.isnan(scored.truth[:, j])
        positive = (scored.truth[known, j] >= 0.5).astype(np.int64)[:, None]
        _, _, details = tune([label], positive, scored.probs[known, j][:, None], [0.5], [0.5],
                             f"recall={recall:g}", f"recall={review_recall:g}")
        result[label] = details[label]
    return result


def write_report(run: Path, config: TrainConfig) -> dict:
    """RUN/oof.csv and RUN/kfold.json from the folds finished so far."""
    folds = _finished(run, config.folds)
    report: dict = {"folds": config.folds, "finished": folds, "recipe": config.recipe, "data": config.data}
    if not folds:
        return report
    scored = gather_oof(run, folds)
    write_oof(run / "oof.csv", scored)
    per_fold = _per_fold(scored, folds)
    report.update(cells=len(scored.paths), labels=scored.labels,
                  unknown={label: int(np.isnan(scored.truth[:, j]).sum()) for j, label in enumerate(scored.labels)},
                  pooled=bootstrap(scored, seed=config.seed), per_fold=per_fold, spread=_spread(per_fold),
                  oof_thresholds=oof_thresholds(scored, config.threshold_recall or 0.95,
                                                config.review_recall or 0.99))
    atomic_write_json(run / "kfold.json", report)
    return report


def format_report(report: dict) -> str:
    """The pooled figures a person reads first, with their intervals."""
    if "pooled" not in report:
        return f"k-fold: no fold of {report['folds']} has finished"
    pooled = report["pooled"]
    lines = [f"k-fold: {len(report['finished'])} of {report['folds']} folds, {report['cells']} cells out of fold "
             "(95 % bootstrap intervals)"]

    def figure(name: str) -> str:
        f = pooled[name]
        return f"{f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"

    lines.append(f"{'label':<12}{'F1 at 0.5':>24}{'ROC-AUC':>24}{'recall own':>24}{'recall+review':>24}")
    for label in report["labels"]:
        lines.append(f"{label:<12}{figure(f'{label}/at_0.5_f1'):>24}{figure(f'{label}/roc_auc'):>24}"
                     f"{figure(f'{label}/own_recall'):>24}{figure(f'{label}/own_recall_with_review'):>24}")
    lines.append(f"mean F1 at 0.5 {figure('mean_f1/at_0.5')}, at the models' own thresholds "
                 f"{figure('mean_f1/own')}")
    lines.append(f"review burden (cells flagged or in review) {figure('review_burden')}, flagged "
                 f"{figure('flagged')}")
    spread = report["spread"]["mean_f1/at_0.5"]
    lines.append(f"per fold mean F1 at 0.5: {spread['mean']:.3f} ± {spread['std']:.3f} "
                 f"(min {spread['min']:.3f}, max {spread['max']:.3f})")
    return "\n".join(lines)


def main(config: TrainConfig) -> int:
    report = run_kfold(config)
    print(format_report(report))
    print(json.dumps({"run": config.out, "oof": str(Path(config.out) / "oof.csv"),
                      "report": str(Path(config.out) / "kfold.json")}, indent=2))
    return 0
