"""`elcell compare A B`: is B better than A, beyond chance, on the same cells?

A and B are k-fold protocol folders (their oof.csv), scored-cell CSVs
(oof.csv, evaluate's predictions.csv), or, with --data, two models (ONNX
files or run folders) scored here on the same labelled cells. Every figure is
given for both with the paired 95 % bootstrap interval of B - A
(elcell.judging.intervals); `--require` turns chosen figures into an exit status a
script can gate a model's promotion on. Torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from elcell.cells.labels import LabelTable, file_key, label_fields, load_table
from elcell.errors import DataError
from elcell.infer.metrics import fmt
from elcell.infer.modelinfo import read_info
from elcell.infer.runtime import resolve_model_path
from elcell.io import atomic_write_json, atomic_write_text, check_out_folder
from elcell.judging.folds import OOF, PROTOCOL
from elcell.judging.intervals import Scored, align, paired_difference, read_scored
from elcell.judging.overlays import INDEX, OVERLAY_FOLDER
from elcell.options import show_progress

# --require METRIC=LABEL: the figure each metric names, at the model's own thresholds
REQUIRE = {"recall": "own_recall", "recall_with_review": "own_recall_with_review", "f1": "own_f1",
           "precision": "own_precision", "roc_auc": "roc_auc", "f1_at_0.5": "at_0.5_f1"}
OVERLAYS = 50  # disagreements drawn by default with --out
SHOWN = ("roc_auc", "at_0.5_f1", "own_f1", "own_recall", "own_recall_with_review")


def parse_require(text: str, labels: list[str] | None) -> list[str]:
    """`recall=crack`, `f1=crack,inactive`, `mean_f1`, `review_burden` -> figure
    names (labels None: check the syntax alone)."""
    if text in ("mean_f1", "review_burden"):
        return [f"{text}/own" if text == "mean_f1" else text]
    match = re.fullmatch(r"([a-z_.0-9]+)=([^=]+)", text)
    if not match or match.group(1) not in REQUIRE:
        raise DataError(f"--require {text}: use METRIC=LABEL[,LABEL] with METRIC one of {sorted(REQUIRE)}, "
                        "or mean_f1, or review_burden")
    wanted = [label.strip() for label in match.group(2).split(",")]
    unknown = [label for label in wanted if labels is not None and label not in labels]
    if unknown:
        raise DataError(f"--require {text}: no label {unknown[0]!r}; the labels compared are {labels}")
    return [f"{label}/{REQUIRE[match.group(1)]}" for label in wanted]


def is_model(source: str) -> bool:
    """Whether `source` is a model (scored here on --data), not scored cells."""
    path = Path(source)
    return not (path.is_dir() and (path / PROTOCOL).is_file()) and path.suffix.lower() != ".csv"


def load_scored(source: str, data: str | None, table: LabelTable | None, tta: bool, progress: bool) -> Scored:
    """Scored cells from a k-fold folder, a scored CSV (limited to --data's cells,
    `table`, when given), or a model scored on them."""
    path = Path(source)
    if path.is_dir() and (path / PROTOCOL).is_file():
        if not (path / OOF).is_file():
            raise DataError(f"{path}: no fold of this k-fold protocol has finished yet")
        return _within(read_scored(path / OOF), source, data, table)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return _within(read_scored(path), source, data, table)
    if table is None:
        raise DataError(f"{source}: a model is compared on labelled cells: give --data LABELS.csv "
                        "(or compare k-fold folders or scored CSVs)")
    from elcell.judging.scoring import score_model  # ONNX Runtime: only when models are compared

    return score_model(source, table, tta=tta, progress=progress)


def _within(scored: Scored, source: str, data: str | None, table: LabelTable | None) -> Scored:
    """Scored cells limited to those --data lists (matched as files): --data then
    means the same for scored cells as for models, the cells compared on."""
    if table is None:
        return scored
    listed = {file_key(p): str(p) for p in table.paths}
    keys = [file_key(p) for p in scored.paths]  # realpath: a few system calls a cell, once
    keep = [i for i, key in enumerate(keys) if key in listed]
    if not keep:
        raise DataError(f"{source}: none of its scored cells is in --data {data} (matched as files: its "
                        f"{scored.paths[0]!r} against {next(iter(listed.values()), 'nothing')!r})")
    rows = np.array(keep)
    # --data's spelling of each path, so that a model scored on --data pairs with these rows
    return Scored([listed[keys[i]] for i in keep], scored.labels, scored.truth[rows],
                  scored.probs[rows], scored.decisions[rows])


def unread(source: str, scored: Scored, table: LabelTable | None) -> int:
    """How many of --data's cells a model scored here could not read (0 for scored cells)."""
    if table is None or not is_model(source):
        return 0
    return len(table.paths) - len(scored.paths)


def _read_by(a: Scored, a_source: str, table: LabelTable | None) -> LabelTable | None:
    """--data's cells less those model A could not read: they were reported once
    already, and B would meet the same file. (B's unread count still counts them.)"""
    if table is None or not is_model(a_source) or len(a.paths) == len(table.paths):
        return table
    read = set(a.paths)
    return table.subset(np.array([i for i, p in enumerate(table.paths) if str(p) in read], dtype=np.int64))


def same_model(a_source: str, b_source: str) -> str | None:
    """'model' when two model sources are the same model (a copy, or a folder and its
    ONNX file), 'weights' when only their thresholds or decoding differ (a tuned copy)."""
    if not (is_model(a_source) and is_model(b_source)):
        return None
    a, b = (read_info(resolve_model_path(source)) for source in (a_source, b_source))
    if a.identity != b.identity:
        return None
    same = (a.thresholds, a.review_thresholds, a.decoding) == (b.thresholds, b.review_thresholds, b.decoding)
    return "model" if same else "weights"


def disagreements(a: Scored, b: Scored) -> list[int]:
    """Rows where the two models decide differently for some label."""
    return [int(i) for i in np.flatnonzero((a.decisions != b.decisions).any(axis=1))]


def write_disagreements(path: Path, a: Scored, b: Scored, rows: list[int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    labels = a.labels
    writer.writerow(["path", *(f"true_{n}" for n in labels), *(f"prob_a_{n}" for n in labels),
                     *(f"prob_b_{n}" for n in labels), *(f"decision_a_{n}" for n in labels),
                     *(f"decision_b_{n}" for n in labels)])
    for i in rows:
        truth = label_fields(a.truth[i])
        writer.writerow([a.paths[i], *truth, *(f"{p:.6f}" for p in a.probs[i]), *(f"{p:.6f}" for p in b.probs[i]),
                         *a.decisions[i], *b.decisions[i]])
    atomic_write_text(path, buffer.getvalue())


def format_comparison(result: dict, names: tuple[str, str]) -> str:
    figures = result["figures"]
    lines = [f"A = {names[0]} ({result['cells_a']} cells)", f"B = {names[1]} ({result['cells_b']} cells)",
             f"{result['cells']} cells both scored; B - A with its paired 95 % bootstrap interval over cells",
             f"{'figure':<34}{'A':>8}{'B':>8}{'B - A':>9}  {'interval':<19}verdict"]
    order = [f"{label}/{name}" for label in result["labels"] for name in SHOWN]
    order += ["mean_f1/at_0.5", "mean_f1/own", "review_burden"]
    for name in order:
        f = figures[name]
        lines.append(f"{name:<34}{fmt(f['a']):>8}{fmt(f['b']):>8}{fmt(f['difference'], '+.3f'):>9}  "
                     f"[{fmt(f['low'], '+.3f')}, {fmt(f['high'], '+.3f')}]  {f['verdict']}")
    lines.append(f"{result['disagreements']} cells decided differently")
    return "\n".join(lines)


def compare(a_source: str, b_source: str, data: str | None = None, group: str | None = None,
            out: str | None = None, require: list[str] | None = None, tta: bool = False,
            progress: bool = True, seed: int = 0, overlays: int = 50) -> tuple[dict, list[str]]:
    """The comparison and the --require figures on which B is worse than A or that
    these cells cannot measure (a gate needs evidence); with
    `out`, and two models, the first `overlays` disagreements drawn."""
    for text in require or []:  # a mistyped --require is named before any model is scored
        parse_require(text, None)
    folder = _out_folder(out)
    table = load_table(data, group=group) if data else None
    a = load_scored(a_source, data, table, tta, progress)
    b = load_scored(b_source, data, _read_by(a, a_source, table), tta, progress)
    cells = {"cells_a": len(a.paths), "cells_b": len(b.paths), "same_model": same_model(a_source, b_source),
             "unread": max(unread(a_source, a, table), unread(b_source, b, table))}
    a, b = align(a, b)
    result = {**paired_difference(a, b, seed=seed), **cells}
    rows = disagreements(a, b)
    result.update(a=a_source, b=b_source, disagreements=len(rows))
    required = [name for text in require or [] for name in parse_require(text, result["labels"])]
    # a gate passed without evidence is no gate: a figure these cells cannot measure refuses too
    failed = [name for name in required if result["figures"][name]["verdict"] in ("worse", "n/a")]
    result["required"] = {name: result["figures"][name]["verdict"] for name in required}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "compare.json").is_file():  # an earlier comparison's folder: its drawings go
            for stale in (folder / OVERLAY_FOLDER, folder / INDEX):
                shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
        atomic_write_json(folder / "compare.json", result)
        write_disagreements(folder / "disagreements.csv", a, b, rows)
        if overlays and rows and data and is_model(a_source) and is_model(b_source):
            from elcell.judging.overlays import write_overlays  # draws: only when asked

            result["overlays"] = len(write_overlays(folder, (a_source, b_source), a, b, rows, overlays))
            atomic_write_json(folder / "compare.json", result)
    return result, failed


def _needs(figure: str) -> str:
    """What a figure that came out unmeasurable needs among the cells."""
    if figure.startswith("mean_f1"):
        return "some label with a cell that has its defect"
    if figure.endswith("roc_auc"):
        return "cells with and without the label's defect"
    if figure.endswith("precision"):
        return "a cell called positive"
    if figure.endswith("recall") or figure.endswith("recall_with_review"):
        return "a cell with the label's defect"
    return "a cell with the label's defect"  # F1: 0/0 only when there is none and none is called


def _out_folder(out: str | None) -> Path | None:
    """--out, refused before any model is scored if it cannot be the folder."""
    if out is None:
        return None
    return check_out_folder(out)


def main(args) -> int:
    if args.overlays is not None and not args.out:
        print("elcell: note: --overlays draws into --out DIR; without it none are drawn", file=sys.stderr)
    result, failed = compare(args.a, args.b, data=args.data, group=args.group, out=args.out,
                             require=args.require, tta=args.tta, progress=show_progress(args.progress),
                             overlays=OVERLAYS if args.overlays is None else args.overlays)
    print(format_comparison(result, (args.a, args.b)))
    if result["same_model"] == "model":
        print("elcell: note: A and B are the same model (weights, thresholds, decoding): every difference is 0")
    elif result["same_model"] == "weights":
        print("elcell: note: A and B hold the same weights with other thresholds or decoding: only the figures "
              "at their own thresholds can differ")
    if args.out:
        drawn = f" and {Path(args.out) / 'disagreements.html'}" if result.get("overlays") else ""
        print(f"wrote {Path(args.out) / 'compare.json'}, {Path(args.out) / 'disagreements.csv'}{drawn}")
    worse = [name for name in failed if result["figures"][name]["verdict"] == "worse"]
    unmeasured = [name for name in failed if name not in worse]
    if worse:
        print(f"elcell: B is worse than A beyond the interval on {', '.join(worse)}: not promoted")
    if unmeasured:
        needs = "; ".join(f"{name} needs {_needs(name)}" for name in unmeasured)
        print(f"elcell: cannot be measured on these {result['cells']} cells ({needs}): not promoted; compare "
              "on cells that hold the label's defects and cells without them")
    if result["unread"]:
        n = result["unread"]
        print(f"elcell: {n} cell{'s' if n != 1 else ''} of {args.data} could not be read (named above), and "
              f"{'are' if n != 1 else 'is'} left out of the comparison: not promoted on incomplete cells",
              file=sys.stderr)
    if failed:
        return 1
    if result["unread"]:
        return 1  # no verdicts line: a script reading it would promote on incomplete cells
    if result["required"]:
        print(json.dumps({"required": result["required"]}))
    return 0
