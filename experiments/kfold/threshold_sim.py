"""How well does a recall-first threshold chosen on one run's validation cells
hold on cells it did not see? docs/accuracy.md, *Thresholds from a few
validation cells*.

    python experiments/kfold/threshold_sim.py runs/kfold/K07 [--draws 2000] [--val-cells 160]

Two checks on a k-fold protocol's folder:

- folds: each fold model's thresholds chosen on its own validation cells
  (eval/val/predictions.csv), applied to its held-out fold (eval/test): the
  real case, one draw per fold, with the checkpoint picked on those
  validation cells.
- draws: validation sets of --val-cells drawn from the pooled out-of-fold
  scores (stratified by label), thresholds chosen on each, recall and the
  share of cells at or above the threshold measured on the remaining cells.
  Many draws show the spread a user meets from one run.

Each estimator of `elcell.options.RECALL_ESTIMATORS` is scored side by side.
With --recall 0.99 the same figures are the review band's: the recall counting
review, and the review burden (cells flagged or in review on any label).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from elcell.infer.metrics import threshold_for_recall
from elcell.judging.intervals import read_scored
from elcell.options import RECALL_ESTIMATORS


def _score(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-label recall at `thresholds` (a label's cells at or above it) and the
    share of cells at or above it on any label."""
    known = ~np.isnan(truth)
    flagged = probs >= thresholds
    recall = np.array([flagged[known[:, j] & (truth[:, j] >= 0.5), j].mean() for j in range(truth.shape[1])])
    return recall, float(flagged.any(axis=1).mean())


def _thresholds(truth: np.ndarray, probs: np.ndarray, recall: float, method: str) -> np.ndarray:
    return np.array([threshold_for_recall(truth[~np.isnan(truth[:, j]), j] >= 0.5,
                                          probs[~np.isnan(truth[:, j]), j], recall, method)
                     for j in range(truth.shape[1])])


def folds(run: Path, recall: float) -> None:
    print(f"each fold's own validation cells -> its held-out fold (recall target {recall}; "
          "flagged: the share of cells at or above the threshold on any label):")
    for fold in sorted(f for f in run.glob("fold*") if (f / "summary.json").is_file()):  # finished folds
        val = read_scored(fold / "eval" / "val" / "predictions.csv")
        test = read_scored(fold / "eval" / "test" / "predictions.csv")
        positives = np.nansum(val.truth >= 0.5, axis=0).astype(int)
        for method in RECALL_ESTIMATORS:
            t = _thresholds(val.truth, val.probs, recall, method)
            got, flagged = _score(test.truth, test.probs, t)
            print(f"  {fold.name} ({', '.join(f'{n} {lab}' for n, lab in zip(positives, val.labels))}) "
                  f"{method:10s} thresholds {np.round(t, 3)} recall {np.round(got, 3)} flagged {flagged:.3f}")


def draws(run: Path, recall: float, n_draws: int, val_cells: int, seed: int) -> None:
    scored = read_scored(run / "oof.csv")
    truth, probs = scored.truth, scored.probs
    rng = np.random.default_rng(seed)
    # stratify by label combination, as the protocol splits
    combo = np.array(["".join("u" if np.isnan(v) else str(int(v >= 0.5)) for v in row) for row in truth])
    groups = [np.flatnonzero(combo == c) for c in np.unique(combo)]
    share = val_cells / len(truth)
    results = {m: ([], []) for m in RECALL_ESTIMATORS}
    for _ in range(n_draws):
        val = np.concatenate([rng.choice(g, max(1, round(share * len(g))), replace=False) for g in groups])
        rest = np.setdiff1d(np.arange(len(truth)), val)
        for method in RECALL_ESTIMATORS:
            t = _thresholds(truth[val], probs[val], recall, method)
            got, flagged = _score(truth[rest], probs[rest], t)
            results[method][0].append(got)
            results[method][1].append(flagged)
    print(f"\n{n_draws} draws of {val_cells} validation cells from {run / 'oof.csv'} (recall target {recall}):")
    for method, (got, flagged) in results.items():
        got, flagged = np.array(got), np.array(flagged)
        for j, label in enumerate(scored.labels):
            lo, hi = np.percentile(got[:, j], [5, 95])
            print(f"  {method:10s} {label:9s} held-out recall mean {got[:, j].mean():.3f} "
                  f"(5-95 %: {lo:.3f}-{hi:.3f}), below {recall - 0.05:.2f} in {np.mean(got[:, j] < recall - 0.05):.0%}")
        lo, hi = np.percentile(flagged, [5, 95])
        print(f"  {method:10s} cells flagged on any label: mean {flagged.mean():.3f} (5-95 %: {lo:.3f}-{hi:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a k-fold protocol's folder (oof.csv, fold*/eval)")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--val-cells", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folds(args.run, args.recall)
    if (args.run / "oof.csv").is_file():
        draws(args.run, args.recall, args.draws, args.val_cells, args.seed)


if __name__ == "__main__":
    main()
