"""What an ensemble of k-fold protocols would give, read off their out-of-fold
scores: the mean of the protocols' probabilities on the cells all of them
scored, against one protocol, with paired 95 % bootstrap intervals
(docs/accuracy.md, *Ensembles of protocols*).

    python experiments/kfold/ensemble_oof.py runs/kfold/K12 runs/kfold/K18 [--against runs/kfold/K12]

Every cell is still scored only by models that did not train on it (each
protocol's fold model for that cell), so the ensemble's figures are out of
fold too, even where the protocols drew their folds differently. Decisions
are taken at 0.5: thresholds chosen on these same cells would flatter the
ensemble, so only the rankings (ROC-AUC) and F1 at 0.5 are printed. An
ensemble costs one inference per member; its figures are what a distilled
student (`elcell train --teacher`) could at best carry into one model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from elcell.infer.metrics import fmt
from elcell.judging.folds import OOF
from elcell.judging.intervals import Scored, align, bootstrap, paired_difference, read_scored

PER_LABEL = ("at_0.5_f1", "at_0.5_accuracy", "roc_auc")


def at_half(scored: Scored) -> Scored:
    """The same cells decided at 0.5 for every label."""
    decisions = np.where(scored.probs >= 0.5, "defect", "ok")
    return Scored(scored.paths, scored.labels, scored.truth, scored.probs, decisions)


def mean_of(against: Scored, members: list[Scored]) -> list[Scored]:
    """`against`, then each member, on the cells and labels all of them scored,
    and last the members' mean."""
    shared = against
    for other in members:
        shared, _ = align(shared, other)
    aligned = [align(shared, m)[1] for m in [against, *members]]
    probs = np.mean([m.probs for m in aligned[1:]], axis=0)
    return [at_half(m) for m in aligned] + [at_half(Scored(shared.paths, shared.labels, shared.truth, probs,
                                                          shared.decisions))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="k-fold folders (each with its oof.csv)")
    parser.add_argument("--against", type=Path, help="the protocol the ensemble is compared with "
                        "(default: the first of runs)")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("name at least two k-fold folders to average")
    against = args.against or args.runs[0]
    scored = mean_of(read_scored(against / OOF), [read_scored(run / OOF) for run in args.runs])
    base, ensemble = scored[0], scored[-1]
    print(f"{len(base.paths)} cells scored out of fold by every protocol; labels {', '.join(base.labels)}")
    shown = ["mean_f1/at_0.5", *(f"{label}/{name}" for label in base.labels for name in PER_LABEL)]
    print(f"{'':<28}" + "".join(f"{name:>26}" for name in shown))
    for name, s in [*zip(map(str, args.runs), scored[1:-1], strict=True), ("ensemble (mean)", ensemble)]:
        figures = bootstrap(s)
        print(f"{name:<28}" + "".join(f"{fmt(figures[k]['value'])} [{fmt(figures[k]['low'])}, "
                                      f"{fmt(figures[k]['high'])}]".rjust(26) for k in shown))
    diff = paired_difference(base, ensemble)["figures"]
    print(f"ensemble - {against}, paired 95 %:")
    for k in shown:
        d = diff[k]
        print(f"  {k:<22} {fmt(d['difference'], '+.3f')} [{fmt(d['low'], '+.3f')}, {fmt(d['high'], '+.3f')}]"
              f"  {d['verdict']}")


if __name__ == "__main__":
    main()
