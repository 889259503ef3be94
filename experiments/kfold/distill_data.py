"""The data of the distillation experiment (docs/accuracy.md, K03): a test set
of a quarter of the 1,600 crack/inactive cells that neither teacher nor
student ever sees, and every other kept ELPV cell to train both on.

    python experiments/kfold/distill_data.py runs/data/all_cells.csv runs/data/distill

writes runs/data/distill/train.csv (all_cells.csv without the test cells) and
runs/data/distill/test.csv (path;crack;inactive;type). The test cells are
fold 0 of a 4-fold assignment of the labelled cells (stratified by label
combination and cell type, seed 1), or with `--test RUN/foldK/test.csv` the
held-out cells of a k-fold protocol's fold, so that protocol's fold models
(which never saw them) can teach (K19).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from elcell.cells.labels import read_labels_csv
from elcell.io import atomic_write_text
from elcell.judging.folds import assign_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("all_cells", type=Path, help="data_csv.py all's output")
    parser.add_argument("out", type=Path, help="folder for train.csv and test.csv")
    parser.add_argument("--test", type=Path, help="a fold's test.csv: its cells are the test cells")
    args = parser.parse_args()
    table = read_labels_csv(args.all_cells, group="type")
    if args.test:
        held_out = {p.resolve() for p in read_labels_csv(args.test).paths}
        test = {i for i, p in enumerate(table.paths) if p.resolve() in held_out}
        if len(test) != len(held_out):
            parser.error(f"{args.test}: {len(held_out) - len(test)} of its cells are not in {args.all_cells}")
    else:
        crack_inactive = [table.names.index("crack"), table.names.index("inactive")]
        labelled = np.flatnonzero(~np.isnan(table.targets[:, crack_inactive]).any(axis=1))
        folds = assign_folds(table.subset(labelled), 4, seed=1)
        test = set(labelled[folds == 0].tolist())
    lines = args.all_cells.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    train_rows = [row for i, row in enumerate(rows) if i not in test]
    test_rows = [";".join(row.split(";")[i] for i in (0, 1, 2, 4)) for i, row in enumerate(rows) if i in test]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "train.csv", "\n".join([header, *train_rows]) + "\n")
    atomic_write_text(args.out / "test.csv", "\n".join(["path;crack;inactive;type", *test_rows]) + "\n")
    print(f"wrote {args.out}: {len(train_rows)} train cells, {len(test_rows)} test cells")


if __name__ == "__main__":
    main()
