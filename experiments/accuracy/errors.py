"""Where a protocol run's exported model errs, by ELPV expert defect probability.

    python experiments/accuracy/errors.py runs/accuracy/E03-rot90              # test split
    python experiments/accuracy/errors.py runs/accuracy/E03-rot90 --split train
    python experiments/accuracy/errors.py runs/accuracy/E03-rot90 --missed missed.png
    python experiments/accuracy/errors.py runs/accuracy/E03-rot90 runs/accuracy/R1-E03-init-seed1  # ensemble

Scores the run's ONNX model (ONNX Runtime, no augmentation) on one split of its
split.csv and prints, for each expert probability (0, 1/3, 2/3, 1), how many
cells there are and the share the model calls defective (probability >= 0.5),
plus the binary accuracy and ROC-AUC. On the train split this tells underfitting (the model
misses defects it was trained on) from overfitting (it fits them but not the
test cells). The best accuracy any one threshold reaches on the split is an
upper bound, not a protocol figure (the threshold is picked on the very cells
scored): if it is close to the accuracy at 0.5, the errors come from how the
model ranks the cells, not from where the threshold sits. The accuracy at the
threshold that is best on the run's validation cells (for an ensemble, on its
mean there; not printed with --split val) is one the protocol could have
reached without looking at the scored cells.

--missed writes a contact sheet of the clear defects (expert
probability 1) that the model calls ok, to see what it fails to notice.
Several runs on the same split (the same cells in each part; the first run's
targets are scored) are scored as an ensemble (mean probability):
if it errs as often as its members, their errors are shared, not chance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from elcell.cells.images import Decoding, load_cell
from elcell.infer.runtime import open_model, score_files
from elcell.io import atomic_path

EXPERT_PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)


def cells_and_parts(run: Path) -> list[list[str]]:
    return [line.split(";")[:2] for line in (run / "split.csv").read_text().splitlines()[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--missed", type=Path, metavar="PNG",
                        help="write up to 24 missed clear defects as one image, 6 per row")
    args = parser.parse_args()

    first = args.runs[0]
    rows = [line.split(";") for line in (first / "split.csv").read_text().splitlines()[1:]]
    # the same cells in the same parts; the targets may differ (E23 trains on hard 0/1
    # ones), and the first run's are the ones scored and broken down
    cells = [row[:2] for row in rows]
    if any(cells_and_parts(run) != cells for run in args.runs[1:]):
        parser.error("an ensemble needs runs on the same split (the same cells in split.csv)")
    chosen = [(Path(path), float(target)) for path, part, target, *_ in rows if part == args.split]
    if not chosen:
        parser.error(f"{first / 'split.csv'} has no {args.split} cells")
    probs = np.mean([run_probabilities(run, [p for p, _ in chosen]) for run in args.runs], axis=0)
    targets = np.array([t for _, t in chosen])
    called = probs >= 0.5

    names = " + ".join(run.name for run in args.runs)
    print(f"{names}, {args.split} split, {len(chosen)} cells")
    for expert in EXPERT_PROBABILITIES:
        these = np.isclose(targets, expert, atol=0.01)
        if these.any():
            print(f"  expert probability {expert:.2f}: {these.sum():4d} cells, "
                  f"called defective {called[these].mean():.3f}")
    print(f"  binary accuracy {np.mean(called == (targets >= 0.5)):.3f}")
    if 0 < np.mean(targets >= 0.5) < 1:  # the ranking, whatever the threshold
        print(f"  ROC-AUC {roc_auc_score(targets >= 0.5, probs):.3f}")
    best, threshold = best_threshold_accuracy(probs, targets >= 0.5)
    print(f"  best accuracy at any threshold {best:.3f} (at {threshold:.3f}; picked on these cells)")
    if args.split != "val":  # a threshold the protocol could have picked: on the val cells
        val = [(Path(path), float(target) >= 0.5) for path, part, target, *_ in rows if part == "val"]
        val_probs = np.mean([run_probabilities(run, [p for p, _ in val]) for run in args.runs], axis=0)
        _, val_threshold = best_threshold_accuracy(val_probs, np.array([hit for _, hit in val]))
        accuracy = np.mean((probs >= val_threshold) == (targets >= 0.5))
        print(f"  accuracy at the best threshold on the val cells {accuracy:.3f} (at {val_threshold:.3f})")
    if args.missed:
        missed = [path for (path, target), hit in zip(chosen, called) if target == 1.0 and not hit]
        write_contact_sheet(args.missed, missed[:24])
        print(f"  {len(missed)} missed clear defects; the first {min(len(missed), 24)} are in {args.missed}")


def best_threshold_accuracy(probs: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The highest accuracy of `probs >= t` over every threshold t, and that t."""
    thresholds = np.append(np.unique(probs), np.inf)  # inf: every cell called ok
    accuracies = [np.mean((probs >= t) == positive) for t in thresholds]
    best = int(np.argmax(accuracies))
    return float(accuracies[best]), float(thresholds[best])


def run_probabilities(run: Path, paths: list[Path]) -> np.ndarray:
    """The defect probability of each cell from the run's exported ONNX model."""
    model = open_model(run / json.loads((run / "summary.json").read_text())["onnx"])
    return np.concatenate([s.probs[:, 0] for s in score_files(model, paths, batch_size=64)])


def write_contact_sheet(out: Path, paths: list[Path], size: int = 150, columns: int = 6) -> None:
    rows = max(1, -(-len(paths) // columns))
    sheet = Image.new("L", (columns * size, rows * size))
    for i, path in enumerate(paths):
        sheet.paste(Image.fromarray(load_cell(path, Decoding(size))), ((i % columns) * size, (i // columns) * size))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


if __name__ == "__main__":
    main()
