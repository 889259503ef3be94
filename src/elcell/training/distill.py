"""Distillation targets: many models' judgement as one student's labels.

`elcell train --teacher KFOLD_RUN` scores every training cell with each
model of the teacher (the K fold models of a k-fold protocol, or any list of
run folders and ONNX files), averages their probabilities, and trains the
student on those soft targets, blended with the cell's own label where it has
one:

    target = w * teacher + (1 - w) * label      (w = --teacher-weight)

With BCE, training against this blend is the same as w x (loss against the
teacher) + (1 - w) x (loss against the label), Hinton's distillation loss at
temperature 1. A cell whose label is unknown learns the teacher's probability
alone, so cells without crack/inactive labels teach the student too. The
student is one network of the usual size: an ensemble's judgement at one
model's inference cost. Torch-free (ONNX Runtime scores the teacher).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from elcell.cells.labels import LabelTable
from elcell.errors import DataError
from elcell.infer.runtime import default_workers, open_model, resolve_model_path, score_files
from elcell.judging.folds import PROTOCOL, finished_folds, fold_folder


def teacher_models(teacher: str) -> list[Path]:
    """The ONNX files a --teacher names: a k-fold folder (its finished folds'
    models), run folders and ONNX files, comma-separated."""
    models = []
    for part in (p.strip() for p in teacher.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir() and (path / PROTOCOL).is_file():
            planned = int(yaml.safe_load((path / PROTOCOL).read_text()).get("folds") or 0)
            folds = finished_folds(path, planned)
            if not folds:
                raise DataError(f"--teacher {path}: no fold of this k-fold protocol has finished")
            if len(folds) < planned:
                print(f"elcell: warning: --teacher {path}: {len(folds)} of its {planned} folds have "
                      "finished; the others are left out", file=sys.stderr)
            models += [resolve_model_path(fold_folder(path, f)) for f in folds]
        elif path.exists():
            models.append(resolve_model_path(path))
        else:
            raise DataError(f"--teacher {part}: no such file or folder")
    if not models:
        raise DataError("--teacher: name a k-fold folder, run folders or ONNX files")
    return models


def teacher_probs(models: list[Path], table: LabelTable, batch_size: int = 32) -> np.ndarray:
    """float [N, L]: the models' mean probability per cell for each label of
    `table`; NaN for a label no model has."""
    total = np.zeros(table.targets.shape, dtype=np.float64)
    count = np.zeros(len(table.names), dtype=np.int64)
    for i, path in enumerate(models):
        model = open_model(path)
        print(f"elcell: teacher {i + 1} of {len(models)}: scoring {len(table)} cells with {path}",
              file=sys.stderr)
        shared = [(j, model.info.labels.index(name)) for j, name in enumerate(table.names)
                  if name in model.info.labels]
        row = 0
        for scored in score_files(model, table.paths, batch_size, default_workers()):
            bad = [f"{p}: {e}" for p, e in zip(scored.paths, scored.errors) if e is not None]
            if bad:
                raise DataError(f"--teacher: cannot score {bad[0]}")
            for j, c in shared:
                total[row:row + len(scored.paths), j] += scored.probs[:, c]
            row += len(scored.paths)
        for j, _ in shared:
            count[j] += 1
    if not count.any():
        raise DataError(f"--teacher: no model has any of the labels {table.names}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def blend(table: LabelTable, probs: np.ndarray, weight: float) -> np.ndarray:
    """float32 [N, L]: weight x teacher + (1 - weight) x label where both are
    known, the teacher's alone where the label is unknown, the label alone
    where no teacher model has that label."""
    known, taught_here = ~np.isnan(table.targets), ~np.isnan(probs)
    labels = np.nan_to_num(table.targets)
    targets = np.where(taught_here & known, weight * probs + (1 - weight) * labels,
                       np.where(taught_here, probs, table.targets))
    return targets.astype(np.float32)


def warn_if_teacher_saw(models: list[Path], held_out: list[Path]) -> None:
    """A teacher trained on the student's validation or test cells makes the
    student's scores there, and the thresholds chosen there, optimistic: say so."""
    held = {str(Path(p).resolve()) for p in held_out}
    seen = set()
    for model in models:
        split = model.parent / "split.csv"
        if split.is_file():
            rows = (line.split(";")[:2] for line in split.read_text().splitlines()[1:] if line)
            seen |= {path for path, part in rows if part == "train" and path in held}
    if seen:
        print(f"elcell: warning: the teacher trained on {len(seen)} of the student's {len(held)} validation "
              "and test cells: the student's scores and thresholds there are optimistic. For an honest "
              "student, give it cells its teacher never trained on as --data, or judge it on other cells",
              file=sys.stderr)


def taught(config, table: LabelTable, split: np.ndarray) -> LabelTable:
    """With --teacher, the train cells learn the teacher's blended targets;
    val and test cells keep their own labels, so checkpoints, thresholds and
    scores are judged on the truth."""
    if not config.teacher:
        return table
    train = np.flatnonzero(split == "train")
    models = teacher_models(config.teacher)
    warn_if_teacher_saw(models, [p for p, part in zip(table.paths, split) if part != "train"])
    targets = table.targets.copy()
    targets[train] = blend(table.subset(train), teacher_probs(models, table.subset(train)), config.teacher_weight)
    return replace(table, targets=targets)
