"""Each fold model of a k-fold protocol with thresholds read off the pooled
out-of-fold scores, instead of its own ~106 validation cells: what the fold
models judge at thresholds that 1,600 cells, not 20 cracked ones, chose.
docs/module-path.md uses them to tell the module path's own cost from the
noise of a fold's thresholds.

    python experiments/kfold/pooled_thresholds.py runs/kfold/K16 [--recall 0.95] [--review 0.99]

Writes foldK/pooled.onnx (--name) beside each fold's model (the same weights, the
pooled thresholds in its metadata) and prints the thresholds and what they
flag on the pooled scores.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from elcell.infer.metrics import tune
from elcell.infer.modelinfo import read_info, write_info
from elcell.infer.runtime import resolve_model_path
from elcell.judging.intervals import read_scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kfold", type=Path, help="a k-fold protocol's folder (its oof.csv)")
    parser.add_argument("--recall", type=float, default=0.95, help="recall the thresholds are set for")
    parser.add_argument("--review", type=float, default=0.99,
                        help="recall the review band reaches down to (0: no band, so decisions are defect or "
                             "ok; a band that holds most cells would make any two judgements agree)")
    parser.add_argument("--name", default="pooled.onnx", help="file name of the copies in each fold folder")
    args = parser.parse_args()
    scored = read_scored(args.kfold / "oof.csv")
    options = yaml.safe_load((args.kfold / "kfold.yaml").read_text())
    estimator = options.get("threshold_estimator", "empirical")  # as the fold models chose theirs
    known = ~np.isnan(scored.truth)
    positives = (np.nan_to_num(scored.truth) >= 0.5).astype(np.int64)
    n = len(scored.labels)
    band = f"recall={args.review:g}" if args.review > 0 else None  # None: the band's width stays 0
    high, low, _ = tune(scored.labels, positives, scored.probs, [0.5] * n, [0.5] * n, f"recall={args.recall:g}",
                        band, known, estimator)
    flagged = (scored.probs >= np.array(high)).any(axis=1).mean()
    looked_at = (scored.probs >= np.array(low)).any(axis=1).mean()
    print(f"{args.kfold}: {len(scored.paths)} cells, estimator {estimator}")
    for label, h, lo in zip(scored.labels, high, low, strict=True):
        print(f"  {label}: threshold {h:.4f} (recall {args.recall:g}), review from {lo:.4f} ({args.review:g})")
    print(f"  on the pooled scores: {flagged:.3f} of cells flagged, {looked_at:.3f} flagged or in review")
    for fold in sorted(args.kfold.glob("fold[0-9]*")):
        model = resolve_model_path(str(fold))
        info = read_info(model)
        order = [scored.labels.index(label) for label in info.labels]
        write_info(model, fold / args.name, replace(info, thresholds=[high[j] for j in order],
                                                        review_thresholds=[low[j] for j in order]))
        print(f"  wrote {fold / args.name} (from {model.name})")


if __name__ == "__main__":
    main()
