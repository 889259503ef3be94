"""The two data sets of the offline-transfer experiments (docs/accuracy.md,
*Offline ImageNet transfer*), written as labels CSVs with absolute paths and
the ELPV cell type as a group column.

    python experiments/transfer/data_csv.py crack-inactive LABELS.csv runs/data/crack_inactive.csv
    python experiments/transfer/data_csv.py elpv NEVER_TRAIN_ON.txt runs/data/elpv_kept.csv
    python experiments/transfer/data_csv.py all LABELS.csv runs/data/all_cells.csv --exclude NEVER_TRAIN_ON.txt

crack-inactive: the spec's two labels for 1,600 ELPV cells, from a labels file
kept outside this repository (paths relative to the elpv-dataset package's
data folder). elpv: ELPV's own soft `defective` label for every cell except
those named in NEVER_TRAIN_ON.txt, which are kept for an independent check
and never trained, calibrated or chosen on. all: both, as partial labels:
every kept ELPV cell with its `defective` label, and `crack` and `inactive`
where LABELS.csv gives them, empty (unknown) elsewhere. The labels are not
shipped here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elcell.cells.labels import elpv_table, read_labels_csv
from elcell.io import atomic_write_text


def _crack_inactive(labels_csv: Path) -> dict[str, list[float]]:
    """file name -> [crack, inactive] from a labels CSV relative to ELPV's data folder."""
    table = read_labels_csv(labels_csv)
    return {path.name: list(targets) for path, targets in zip(table.paths, table.targets, strict=True)}


def write_all_cells(labels_csv: Path, exclude: Path, out: Path) -> None:
    elpv = elpv_table()
    excluded = {line.strip() for line in exclude.read_text().splitlines() if line.strip()}
    known = _crack_inactive(labels_csv)
    lines = ["path;crack;inactive;defective;type"]
    for path, target, kind in zip(elpv.paths, elpv.targets[:, 0], elpv.groups, strict=True):
        if path.name in excluded:
            continue
        given = known.get(path.name)
        crack_inactive = [f"{t:g}" for t in given] if given else ["", ""]
        lines.append(";".join([str(path), *crack_inactive, f"{target:g}", kind]))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}: {len(lines) - 1} cells, {len(known)} with crack/inactive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["crack-inactive", "elpv", "all"])
    parser.add_argument("source", type=Path, help="the crack/inactive labels CSV, or the never-train-on list")
    parser.add_argument("out", type=Path)
    parser.add_argument("--exclude", type=Path, help="with `all`: the never-train-on list")
    args = parser.parse_args()
    if args.kind == "all":
        if args.exclude is None:
            parser.error("all needs --exclude NEVER_TRAIN_ON.txt")
        write_all_cells(args.source, args.exclude, args.out)
        return
    elpv = elpv_table()
    types = {path.name: kind for path, kind in zip(elpv.paths, elpv.groups, strict=True)}
    if args.kind == "crack-inactive":
        folder = elpv.paths[0].parent.parent  # the package's data/ folder: the CSV's paths start with images/
        text = args.source.read_text().replace("images/", f"{folder}/images/")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        staged = args.out.with_suffix(".staged.csv")
        staged.write_text(text)
        table = read_labels_csv(staged)
        staged.unlink()
        lines = [";".join(["path", *table.names, "type"])] + [
            ";".join([str(path), *(f"{t:g}" for t in targets), types[path.name]])
            for path, targets in zip(table.paths, table.targets, strict=True)]
    else:
        excluded = {line.strip() for line in args.source.read_text().splitlines() if line.strip()}
        lines = ["path;defective;type"] + [
            f"{path};{target:g};{kind}" for path, target, kind in zip(elpv.paths, elpv.targets[:, 0], elpv.groups,
                                                                    strict=True) if path.name not in excluded]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(lines) - 1} cells")


if __name__ == "__main__":
    main()
