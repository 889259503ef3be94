"""Write ELPV cells as a seed-format labels CSV (path;defective;type).

Labels are binary as in the seed format: defective when the expert
probability is >= 0.5. The pretraining experiment (docs/accuracy.md, P1-P3)
pretrains on one cell type and fine-tunes on the other, so no cell of the
fine-tuning set, test split included, is ever seen in pretraining. `all`
keeps every cell in ELPV's order, so `--group type` gives exactly the split
of `--data elpv` with hard 0/1 targets instead of the soft ones (E23).

    python experiments/accuracy/elpv_csv.py mono runs/accuracy/elpv_mono.csv
    python experiments/accuracy/elpv_csv.py poly runs/accuracy/elpv_poly.csv
    python experiments/accuracy/elpv_csv.py all runs/accuracy/elpv_all.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elcell.cells.labels import elpv_table
from elcell.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("type", choices=["mono", "poly", "all"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    table = elpv_table()
    lines = ["path;defective;type"]
    for path, positive, kind in zip(table.paths, table.positives[:, 0], table.groups, strict=True):
        if args.type in (kind, "all"):
            lines.append(f"{path};{int(positive)};{kind}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(lines) - 1} cells ({args.type})")


if __name__ == "__main__":
    main()
