"""The accuracy table of docs/accuracy.md from finished protocol runs.

    python experiments/accuracy/table.py runs/accuracy/E*            # markdown rows
    python experiments/accuracy/table.py runs/accuracy/E04-affine --tta

Reads each run's summary.json (written by `elcell train` with --test-fraction:
the exported model scored on the val and test splits) and config.yaml. With
--tta it also scores the run's test split with test-time augmentation (the mean
over flips, as `elcell evaluate --tta`) into RUN/eval/test-tta and adds those
figures. Binary ELPV: a cell is defective when its expert probability is >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from elcell.infer.metrics import fmt


def score_test_with_tta(run: Path, summary: dict, config: dict) -> dict:
    from elcell.cells.labels import load_table
    from elcell.infer.evaluate import evaluate, headline
    from elcell.infer.runtime import open_model

    table = load_table(config["data"], group=config.get("group"))
    parts = {line.split(";")[0]: line.split(";")[1] for line in (run / "split.csv").read_text().splitlines()[1:]}
    rows = np.flatnonzero([parts.get(str(path)) == "test" for path in table.paths])
    test = replace(table.subset(rows), source=f"{config['data']} (test split)")
    return headline(evaluate(open_model(run / summary["onnx"]), test, run / "eval" / "test-tta", tta=True,
                             progress=False))


def describe(run: Path) -> str:
    """The first comment line of the experiment's config, written next to it."""
    config = Path(__file__).with_name(f"{run.name}.yaml")
    if config.is_file():
        first = config.read_text().splitlines()[0]
        return first.split(":", 1)[1].strip().rstrip(".")
    return run.name


def short_name(run: Path) -> str:
    """The experiment's id: E03-rot90 -> E03, a repeat E29-R1-... -> E29-R1."""
    match = re.match(r"[A-Z]+\d*(-R\d+)?(?=-|$)", run.name)
    return match.group(0) if match else run.name


def cells(block: dict, label: str = "defective") -> tuple[str, str]:
    return fmt(block[label]["accuracy"]), fmt(block[label]["f1"])


def row(run: Path, tta: bool) -> str:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    val, test = summary["val"], summary.get("test")  # a pretraining run may have no test split
    groups = test.get("groups", {}) if test else {}
    columns = [
        f"**{short_name(run)}** {describe(run)}",
        *cells(val), *(cells(test) if test else ("-", "-")),
        f"{test['defective']['roc_auc']:.3f}" if test else "-",
        *(f"{fmt(groups[g]['defective']['accuracy'])} / {fmt(groups[g]['defective']['f1'])}" if g in groups else "-"
          for g in ("mono", "poly")),
    ]
    if tta:
        columns += cells(score_test_with_tta(run, summary, config)) if test else ("-", "-")
    best_epoch = summary["onnx"].removeprefix("best_model_epoch").removesuffix(".onnx")
    minutes = summary["train_seconds"] / 60
    columns += [f"{int(best_epoch) + 1} / {summary['epochs_run']}", f"{minutes:.1f}",
                f"{config['backbone'].removeprefix('resnet')}, {config['image_size']} px"]
    return "| " + " | ".join(columns) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tta", action="store_true", help="also score the test split with TTA")
    args = parser.parse_args()
    header = ["run: recipe change", "val acc", "val F1", "test acc", "test F1", "test AUC",
              "test mono acc / F1", "test poly acc / F1"]
    if args.tta:
        header += ["test acc TTA", "test F1 TTA"]
    header += ["best epoch / run", "train min", "ResNet, size"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    machines = set()
    for run in args.runs:
        if not (run / "summary.json").is_file():
            print(f"| {run.name}: not finished (no summary.json) |")
            continue
        print(row(run, args.tta))
        m = json.loads((run / "summary.json").read_text()).get("machine")
        machines.add(json.dumps(m, sort_keys=True) if m else "not recorded")
    print("\nmachines: " + "; ".join(sorted(machines)))


if __name__ == "__main__":
    main()
