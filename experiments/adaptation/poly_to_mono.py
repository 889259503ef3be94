"""Issue 36 item 4: a model trained on one ELPV cell type (poly) meets the other
(mono). How much of the gap to a model trained on both do 50, 100 and 200
reviewed mono cells recover, chosen by the station's uncertainty, by the
`teach` order or at random, fine-tuned
with `elcell train --from` and replay; and how much poly does it forget?

    python experiments/transfer/data_csv.py crack-inactive \
        /work/shared/data/crack_inactive/train.csv runs/data/crack_inactive.csv
    python experiments/adaptation/poly_to_mono.py runs/data/crack_inactive.csv --out runs/adaptation
    python experiments/adaptation/poly_to_mono.py runs/data/crack_inactive.csv --out runs/adaptation --summary

Steps (docs/adaptation.md): the 1,600 crack/inactive cells (never the
never-train-on cells: that CSV holds none) split by type, each into a part to
learn from and a held-out test part (--test-share); `poly` trains on poly's
part, `all` on both parts (the reference); mono's part is the pool a station
would review. The pool is ordered by `poly`'s scores once in each of the two
orders of elcell.infer.review_order, and drawn at random --draws times; the
first N cells of each order, with their labels (the operator's answers),
fine-tune `poly` with --from. Every model is scored on both test parts.

Resumable: a finished training has summary.json (a folder without it is
trained again from the start); results.csv gets one row per model, test part
and label as each lands, and rows already there are not scored again.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from elcell.cells.labels import LabelTable, label_fields, read_labels_csv
from elcell.infer.evaluate import evaluate
from elcell.infer.metrics import fmt
from elcell.infer.review_order import review_order
from elcell.infer.runtime import open_model, score_files
from elcell.io import atomic_write_text
from elcell.judging.intervals import Scored, paired_difference, read_scored

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "A00-lite0-129-6ep.yaml"
FIELDS = ("model", "strategy", "reviewed", "draw", "test", "label", "f1", "recall", "precision", "roc_auc",
          "recall_with_review", "f1_at_0.5", "test_cells")


def write_csv(path: Path, table: LabelTable, rows: np.ndarray) -> Path:
    lines = [";".join(["path", *table.names])] + [
        ";".join([str(table.paths[i]), *label_fields(table.targets[i])]) for i in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def split_by_type(data: Path, out: Path, test_share: float, per_type: int | None, seed: int) -> dict[str, Path]:
    """poly/mono learning and test parts as labels CSVs (deterministic for `seed`)."""
    table = read_labels_csv(data, group="type")
    rng = np.random.default_rng(seed)
    parts = {}
    for kind in ("poly", "mono"):
        members = rng.permutation(np.flatnonzero(np.asarray(table.groups) == kind))[:per_type]
        n_test = int(round(len(members) * test_share))
        parts[f"{kind}_test"] = np.sort(members[:n_test])
        parts[f"{kind}_learn"] = np.sort(members[n_test:])
    parts["all_learn"] = np.sort(np.concatenate([parts["poly_learn"], parts["mono_learn"]]))
    return {name: write_csv(out / "data" / f"{name}.csv", table, rows) for name, rows in parts.items()}


def train(argv: list[str], run: Path, kept: str | None = None) -> Path:
    """`elcell train ... --out run` unless run finished (and, if `kept` is given,
    kept that checkpoint: a fine-tuning from before adapt kept its last is
    trained again); an unfinished one starts again."""
    summary = run / "summary.json"
    if summary.is_file() and (kept is None or json.loads(summary.read_text()).get("kept") == kept):
        return run
    if run.exists():
        shutil.rmtree(run)
    subprocess.run([sys.executable, "-m", "elcell.cli", "train", *argv, "--out", str(run), "--no-progress"],
                   check=True)
    return run


def orders(run: Path, pool: LabelTable, draws: int, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """The pool's review orders: the station's (`check`: uncertainty about the
    thresholds), `teach` (likely defects and cells near 0.5 in turn), and
    `draws` random ones."""
    model = open_model(run)
    probs = np.concatenate([batch.probs for batch in score_files(model, pool.paths)])
    columns = [model.info.labels.index(name) for name in pool.names]
    # the station's order without its random share: the experiment draws random cells apart
    ok = np.zeros(len(pool), dtype=bool)
    thresholds = [model.info.thresholds[c] for c in columns]
    result = {(strategy, 0): np.array([c.index for c in review_order(probs[:, columns], thresholds, ok, pool.names,
                                                                     order=order)])
              for strategy, order in (("uncertainty", "check"), ("teach", "teach"))}
    for draw in range(1, draws + 1):
        result[("random", draw)] = np.random.default_rng(seed + draw).permutation(len(pool))
    return result


def done(results: Path) -> set[tuple[str, str]]:
    if not results.is_file():
        return set()
    with open(results, newline="") as handle:
        return {(row["model"], row["test"]) for row in csv.DictReader(handle, delimiter=";")}


def score(run: Path, key: dict, tests: dict[str, Path], results: Path) -> None:
    """Append `run`'s per-label figures on each test part to results.csv (flushed row by row)."""
    finished = done(results)
    new_file = not results.is_file()
    with open(results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS, delimiter=";")
        if new_file:
            writer.writeheader()
        for test, data in tests.items():
            if (run.name, test) in finished:
                continue
            folder = run / "eval-adaptation" / test
            metrics = evaluate(open_model(run), read_labels_csv(data), folder, progress=False)
            scored = read_scored(folder / "predictions.csv")
            for label, m in metrics["per_label"].items():
                writer.writerow({**key, "model": run.name, "test": test, "label": label, "test_cells": metrics["cells"],
                                 "f1_at_0.5": f1_at_half(scored, label), **{k: m.get(k) for k in FIELDS if k in m}})
            handle.flush()


def f1_at_half(scored: Scored, label: str) -> float:
    """F1 at 0.5: a model's own (recall-first) thresholds move with its validation cells."""
    j = scored.labels.index(label)
    known = ~np.isnan(scored.truth[:, j])
    truth, predicted = scored.truth[known, j] >= 0.5, scored.probs[known, j] >= 0.5
    tp = int((truth & predicted).sum())
    return 2 * tp / max(1, int(truth.sum() + predicted.sum()))


def run_experiment(args) -> None:
    out = Path(args.out)
    if args.never_train_on:
        banned = {line.strip() for line in args.never_train_on.read_text().splitlines() if line.strip()}
        found = sorted(banned & {p.name for p in read_labels_csv(args.data, group="type").paths})
        if found:
            sys.exit(f"{args.data}: holds {len(found)} cells of {args.never_train_on} (e.g. {found[0]}): "
                     "never train on them")
    parts = split_by_type(Path(args.data), out, args.test_share, args.cells_per_type, args.seed)
    tests = {"poly": parts["poly_test"], "mono": parts["mono_test"]}
    results = out / "results.csv"
    extra = args.train_option or []
    base = train(["--config", str(BASE_CONFIG), "--data", str(parts["poly_learn"]), *extra], out / "poly")
    score(base, {"strategy": "before", "reviewed": 0, "draw": 0}, tests, results)
    reference = train(["--config", str(BASE_CONFIG), "--data", str(parts["all_learn"]), *extra], out / "all")
    score(reference, {"strategy": "all", "reviewed": 0, "draw": 0}, tests, results)
    pool = read_labels_csv(parts["mono_learn"])
    for (strategy, draw), order in orders(base, pool, args.draws, args.seed).items():
        for n in args.sizes:
            name = f"{strategy}{draw or ''}-{n}"
            reviewed = write_csv(out / "reviewed" / f"{name}.csv", pool, order[:n])
            run = train(["--from", str(base), "--data", str(reviewed), "--replay", str(args.replay),
                         *extra], out / name, kept="last")
            score(run, {"strategy": strategy, "reviewed": n, "draw": draw}, tests, results)


def summarise(results: Path, figure: str = "f1") -> None:
    """Per model the mean over labels of `figure` on each test part, and on mono
    the share of the gap between `poly` (before) and `all` recovered."""
    with open(results, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=";"))
    mean: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        mean.setdefault((row["model"], row["test"]), []).append(float(row[figure] or "nan"))
    value = {key: float(np.mean(v)) for key, v in mean.items()}
    before, after_all = value.get(("poly", "mono"), np.nan), value.get(("all", "mono"), np.nan)
    print(f"mean {figure} over labels; gap recovered = (mono - before) / (all - before) on mono")
    print(f"{'model':<18}{'mono':>8}{'poly':>8}{'gap recovered':>15}")
    for model in dict.fromkeys(row["model"] for row in rows):
        mono = value.get((model, "mono"), np.nan)
        recovered = (mono - before) / (after_all - before) if after_all != before else np.nan
        print(f"{model:<18}{mono:>8.3f}{value.get((model, 'poly'), np.nan):>8.3f}{recovered:>15.2f}")


PAIRED = ("mean_f1/at_0.5", "crack/roc_auc", "inactive/roc_auc")


def paired(out: Path) -> None:
    """Each order's fine-tuning against each random draw of the same size, on
    the same mono test cells: the difference (order - random) with its paired
    95 % bootstrap interval, which covers the test cells' chance only; then,
    per figure, the differences' mean and range over the draws and how many
    draws the order beats or loses to beyond their interval (the draws'
    spread is the chance of which cells were reviewed)."""
    runs = sorted(p.parent.parent.parent.name for p in out.glob("*/eval-adaptation/mono/predictions.csv"))
    print("order minus random draw on mono's test cells, paired 95 % interval")
    for name in (r for r in runs if not r.startswith(("random", "poly", "all"))):
        size = name.rpartition("-")[2]
        ours = read_scored(out / name / "eval-adaptation" / "mono" / "predictions.csv")
        against = {figure: [] for figure in PAIRED}
        for other in (r for r in runs if r.startswith("random") and r.endswith(f"-{size}")):
            theirs = read_scored(out / other / "eval-adaptation" / "mono" / "predictions.csv")
            result = paired_difference(theirs, ours)["figures"]
            for figure in PAIRED:
                against[figure].append(result[figure])
            print(f"{name:<16}- {other:<13}" + "  ".join(
                f"{figure} {fmt(result[figure]['difference'], '+.3f')} [{fmt(result[figure]['low'], '+.3f')}, "
                f"{fmt(result[figure]['high'], '+.3f')}] {result[figure]['verdict']}" for figure in PAIRED))
        for figure, results in against.items():
            differences = [r["difference"] for r in results if r["difference"] is not None]
            verdicts = [r["verdict"] for r in results]
            if differences:
                print(f"{name:<16}  {figure}: mean {np.mean(differences):+.3f} over {len(differences)} draws "
                      f"(from {min(differences):+.3f} to {max(differences):+.3f}); better than "
                      f"{verdicts.count('better')}, worse than {verdicts.count('worse')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="crack/inactive labels CSV with a `type` column (data_csv.py crack-inactive)")
    parser.add_argument("--out", required=True, help="experiment folder (resumable)")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[50, 100, 200])
    parser.add_argument("--draws", type=int, default=3, help="random orders")
    parser.add_argument("--replay", type=float, default=0.5)
    parser.add_argument("--test-share", type=float, default=0.3, help="of each type, held out for testing")
    parser.add_argument("--cells-per-type", type=int, help="use only this many cells of each type (dry runs)")
    parser.add_argument("--never-train-on", type=Path, metavar="TXT",
                        help="cell file names that must not be in DATA (refused if any is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-option", action="append", metavar="OPTION",
                        help="passed to every `elcell train` (repeat; e.g. --train-option=--epochs=1)")
    parser.add_argument("--summary", action="store_true", help="print the table from results.csv and stop")
    args = parser.parse_args()
    if not args.summary:
        run_experiment(args)
    for figure in ("f1", "f1_at_0.5", "roc_auc"):
        summarise(Path(args.out) / "results.csv", figure)
    paired(Path(args.out))


if __name__ == "__main__":
    main()
