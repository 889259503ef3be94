"""K-fold assignment, and where a k-fold protocol keeps what it writes.

Torch-free, so `compare` and `--teacher` read a protocol's folder without the
training stack. The assignment depends on the table, K and the seed alone, so
every fold of a protocol (run in one session or spread over several) agrees
on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from elcell.cells.labels import LabelTable
from elcell.errors import DataError

PROTOCOL = "kfold.yaml"  # the options the protocol was started with
OOF = "oof.csv"  # every cell scored by the fold model that did not train on it
ASSIGNMENT = "folds.csv"  # each cell's fold: a later session must find the same


def fold_folder(run: Path, fold: int) -> Path:
    return run / f"fold{fold}"


def finished_folds(run: Path, folds: int) -> list[int]:
    """The folds with a summary.json: trained, exported and scored."""
    return [i for i in range(folds) if (fold_folder(run, i) / "summary.json").is_file()]


def strata(table: LabelTable) -> list[tuple]:
    """One key per cell: its label combination (unknown apart from 0) and group."""
    keys = [tuple(int(s) for s in row) for row in table.strata]
    if table.groups is not None:
        keys = [key + (group,) for key, group in zip(keys, table.groups)]
    return keys


def assign_folds(table: LabelTable, k: int, seed: int) -> np.ndarray:
    """int [N]: each cell's fold in 0..k-1, stratified by `strata`.

    Within each stratum the cells are shuffled and dealt out in turn; the dealer
    carries on where the last stratum stopped, so folds differ in size by at
    most one cell and a rare stratum (say inactive poly cells) is spread over
    the folds instead of landing in the first ones.
    """
    if k < 2:
        raise DataError(f"--folds {k}: a k-fold protocol needs at least 2 folds")
    if k > len(table):
        raise DataError(f"--folds {k}: {table.source} has only {len(table)} cells")
    keys = strata(table)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(table), dtype=np.int64)
    dealer = 0
    for key in sorted(set(keys), key=str):
        members = rng.permutation(np.flatnonzero([other == key for other in keys]))
        folds[members] = (dealer + np.arange(len(members))) % k
        dealer = (dealer + len(members)) % k
    return folds
