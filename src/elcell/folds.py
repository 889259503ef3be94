"""K-fold assignment: which cells each model of a k-fold protocol holds out.

Torch-free, so `evaluate`, `compare` and the k-fold report can recompute a
protocol's folds without the training stack. The assignment depends on the
table, K and the seed alone, so every fold of a protocol (run in one session
or spread over several) agrees on it.
"""

from __future__ import annotations

import numpy as np

from elcell.errors import DataError
from elcell.labels import LabelTable


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


def fold_split(table: LabelTable, k: int, fold: int, val_fraction: float, seed: int) -> np.ndarray:
    """The split of fold `fold`: its cells are `test`, and of the others a
    stratified `val_fraction` is `val` (early stopping, the best checkpoint and
    the thresholds are chosen on those), the rest `train`."""
    if not 0 <= fold < k:
        raise DataError(f"--fold {fold}: must be in 0..{k - 1} for --folds {k}")
    # imported here: elcell.data needs torch, and evaluate/compare import this module without it
    from elcell.data import stratified_split

    folds = assign_folds(table, k, seed)
    split = np.full(len(table), "test", dtype=object)
    rest = np.flatnonzero(folds != fold)
    split[rest] = stratified_split(table.subset(rest), val_fraction, seed + fold)
    return split.astype(str)
