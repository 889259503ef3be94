"""Two recipes' fold models judged on the same assembled modules, pooled over the
folds: is the line (cells cut from module photos) better with B than with A?
docs/module-path.md, K16 against K12.

    python experiments/kfold/module_pair.py runs/kfold/K12 runs/kfold/K16 \\
        --benchmarks 'runs/mp2-{recipe}-f{fold}-all' [--seeds 2] [--layout 6x10] [--camera all]

Each --benchmarks folder is `benchmarks/module_path.py`'s --out for one fold
model of one recipe (modules.jsonl: every module's cell probabilities and
decisions). Both recipes share folds and seed, so fold K's modules are the same
cells under the same camera for both: B - A on the module path with a paired
95 % bootstrap interval that resamples cells (a cell in modules of both seeds
counts once), the files' figures beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from module_path import load_done, plan  # noqa: E402  (the benchmark's own module plan)

from elcell.cells.labels import read_labels_csv  # noqa: E402
from elcell.judging.intervals import Scored, paired_difference, read_scored  # noqa: E402

FIGURES = ("crack/roc_auc", "crack/at_0.5_f1", "inactive/roc_auc", "inactive/at_0.5_f1", "mean_f1/at_0.5")


def module_scored(kfold: Path, benchmarks: str, fold: int, args) -> Scored:
    """Fold `fold`'s module-path judgements of one recipe as Scored rows."""
    table = read_labels_csv(kfold / f"fold{fold}" / "test.csv")
    modules = [m for m in plan(len(table), [args.layout], args.seeds, args.camera) if m["family"] == args.layout]
    done = load_done(Path(benchmarks.format(recipe=kfold.name, fold=fold)) / "modules.jsonl")
    labels = list(table.names)
    keys, truth, probs, decisions = [], [], [], []
    for module in modules:
        row = done[module["key"]]
        keys += [f"{fold}/{module['key']}/{i}|{table.paths[i]}" for i in module["cells"]]
        truth.append(table.targets[module["cells"]])
        probs.append(np.asarray(row["probs"], dtype=np.float64))
        decisions.append(np.asarray(row["decisions"]))
    return Scored(keys, labels, np.concatenate(truth), np.concatenate(probs), np.concatenate(decisions))


def pooled(parts: list[Scored]) -> Scored:
    return Scored([k for p in parts for k in p.paths], parts[0].labels, np.concatenate([p.truth for p in parts]),
                  np.concatenate([p.probs for p in parts]), np.concatenate([p.decisions for p in parts]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="k-fold folder of recipe A")
    parser.add_argument("b", type=Path, help="k-fold folder of recipe B (same folds and seed)")
    parser.add_argument("--benchmarks", required=True, help="module_path --out of each fold model, with "
                                                            "{recipe} (the k-fold folder's name) and {fold}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--layout", default="6x10")
    parser.add_argument("--camera", default="all")
    args = parser.parse_args()
    folds = sorted(int(p.name[4:]) for p in args.a.glob("fold[0-9]*"))
    a = pooled([module_scored(args.a, args.benchmarks, f, args) for f in folds])
    b = pooled([module_scored(args.b, args.benchmarks, f, args) for f in folds])
    cells = {key: key.split("|", 1)[1] for key in a.paths}  # resample cells, not module copies
    modules = paired_difference(a, b, groups=cells)["figures"]
    files = paired_difference(read_scored(args.a / "oof.csv"), read_scored(args.b / "oof.csv"))["figures"]
    print(f"{args.b.name} - {args.a.name}, folds {folds}: {len(a.paths)} module cells "
          f"({len(set(cells.values()))} distinct), camera {args.camera}; paired 95 % intervals")
    print(f"  {'figure':22s} {'modules: A':>10s} {'B':>6s} {'B - A':>7s}  interval          "
          f"{'files: A':>8s} {'B':>6s} {'B - A':>7s}  interval")
    for name in FIGURES:
        m, f = modules[name], files[name]
        print(f"  {name:22s} {m['a']:10.3f} {m['b']:6.3f} {m['difference']:+7.3f}  "
              f"[{m['low']:+.3f}, {m['high']:+.3f}] {m['verdict']:5s} {f['a']:8.3f} {f['b']:6.3f} "
              f"{f['difference']:+7.3f}  [{f['low']:+.3f}, {f['high']:+.3f}] {f['verdict']}")


if __name__ == "__main__":
    main()
