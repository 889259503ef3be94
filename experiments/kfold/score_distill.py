"""Single fold models, their ensemble and the distilled student on the same
held-out cells (docs/accuracy.md, K03), with bootstrap intervals and paired
differences.

    python experiments/kfold/score_distill.py runs/kfold/K03-teacher runs/kfold/K03-student \
        runs/data/distill/test.csv --out runs/kfold/K03-scores.json

The teacher is a k-fold folder (its fold models) or, as `--teacher` takes it,
run folders and ONNX files separated by commas (K19: one fold's models of
several recipes); the first model is the single model the others are
compared with. The ensemble averages the models' probabilities; its
thresholds are a protocol's `oof_thresholds` (the teacher folder's, or
`--thresholds-from KFOLD`): chosen for that protocol's probabilities, and
on these cells too where the protocol's folds hold them (K19), so read the
ensemble's own-threshold figures with care. The student and each single
model use their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from elcell.cells.labels import read_labels_csv
from elcell.infer.metrics import fmt
from elcell.infer.runtime import decide, open_model
from elcell.io import atomic_write_json
from elcell.judging.intervals import Scored, bootstrap, paired_difference
from elcell.judging.scoring import score_table
from elcell.training.distill import teacher_models, teacher_probs

SHOWN = ("mean_f1/at_0.5", "mean_f1/own", "crack/roc_auc", "inactive/roc_auc", "crack/own_recall_with_review",
         "inactive/own_recall_with_review", "review_burden")


def ensemble(models: list[Path], table, oof: dict, labels: list[str]) -> Scored:
    probs = teacher_probs(models, table)[:, [table.names.index(label) for label in labels]]
    decisions = decide(probs, [oof[label]["threshold"] for label in labels],
                       [oof[label]["review_threshold"] for label in labels])
    truth = table.targets[:, [table.names.index(label) for label in labels]].astype(np.float64)
    return Scored([str(p) for p in table.paths], labels, truth, probs, np.asarray(decisions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a k-fold folder, or models separated by commas")
    parser.add_argument("student", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--thresholds-from", type=Path, help="the k-fold folder whose oof_thresholds the "
                        "ensemble decides at (default: the teacher's)")
    args = parser.parse_args()
    protocol = args.thresholds_from or Path(args.teacher)
    if not (protocol / "kfold.json").is_file():
        parser.error(f"{protocol}: no kfold.json to take the ensemble's thresholds from; name a k-fold "
                     "folder with --thresholds-from")
    table = read_labels_csv(args.test, group="type")
    models = teacher_models(args.teacher)
    scored = {f"{m.parent.parent.name}/{m.parent.name}": score_table(open_model(m), table, progress=False)
              for m in models}
    single = next(iter(scored))
    labels = scored[single].labels
    oof = json.loads((protocol / "kfold.json").read_text())["oof_thresholds"]
    scored["ensemble"] = ensemble(models, table, oof, labels)
    scored["student"] = score_table(open_model(args.student), table, progress=False)
    report = {"cells": len(table), "figures": {name: bootstrap(s) for name, s in scored.items()},
              "differences": {f"{b} - {a}": paired_difference(scored[a], scored[b])["figures"]
                              for a, b in ((single, "ensemble"), (single, "student"), ("ensemble", "student"))}}
    atomic_write_json(args.out, report)
    print(f"{'model':<20}" + "".join(f"{name:>24}" for name in SHOWN))
    for name, figures in report["figures"].items():
        print(f"{name:<20}" + "".join(f"{fmt(figures[k]['value']) + ' [' + fmt(figures[k]['low']) + ',' + fmt(figures[k]['high']) + ']':>24}"
                                      for k in SHOWN))
    for pair, figures in report["differences"].items():
        print(f"{pair:<24}" + "  ".join(f"{k} {fmt(figures[k]['difference'], '+.3f')} [{fmt(figures[k]['low'], '+.3f')}, "
                                        f"{fmt(figures[k]['high'], '+.3f')}] {figures[k]['verdict']}" for k in SHOWN[:4]))


if __name__ == "__main__":
    main()
