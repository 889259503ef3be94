"""Are cells cut from module photos judged as the same cells given as files?

    python benchmarks/module_path.py MODEL.onnx LABELS.csv --out DIR [--seeds 3] [--layouts 6x10,6x24] \
        [--camera all|clean|warp|light|noise]

LABELS.csv: cells the model never trained on (a k-fold run's held-out fold:
RUN/foldK/test.csv). For each seed the cells are shuffled and assembled
(elcell.pvmodules.synthetic) into 6x10 modules and, for 6x24, half-cut modules
of 72 cells cut in halves; each module is turned up to 3 degrees, its corners
moved by up to 3 % of its size, lit with a smooth falloff of 10-30 % and given
noise of 1-3 % of the cells' brightness (--camera keeps one of these alone, or
none: `clean`, to tell which costs the module path what). Each module is inspected as
`elcell inspect` does (elcell.pvmodules.judge.inspect_module, no map) and each
cell compared with the same cell scored as a file (score_files, as `predict`):

* cells found: centre within 5 % of a cell's width of where it was put;
* per label, recall and F1 at the model's own thresholds (and F1 at 0.5) on both
  paths, and module minus file with a paired 95 % bootstrap interval that
  resamples cells (a cell in modules of several seeds counts once);
* decision agreement: the share of cell x label decisions (ok/review/defect) alike,
  and of decisions at 0.5 (defect or not), which a fold's low own thresholds do not sway;
* grades: each module graded (elcell.pvmodules.grading, the default rules) from
  its cells' true labels (dark area measured on the cells as files), from the
  file decisions, and by inspect: share given the true grade, confusion.

A half-cut module's cell is judged by its two halves (the worse decision, the
higher probability); its grade is inspect's, on the 144 halves, against the
rules on the 72 whole cells' labels. Modules done are appended to
DIR/modules.jsonl, so an interrupted run continues where it stopped; the
figures go to DIR/module_path.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from elcell.cells.images import read_pixels
from elcell.cells.labels import read_labels_csv
from elcell.infer.cpuinfo import cpu_model
from elcell.infer.metrics import fmt
from elcell.infer.runtime import DEFECT, OK, REVIEW, open_model, score_files
from elcell.io import atomic_write_json
from elcell.judging.intervals import Scored, paired_difference
from elcell.pvmodules.geometry import parse_grid
from elcell.pvmodules.grading import grade, load_rules
from elcell.pvmodules.judge import dark_areas, inspect_module, module_counts
from elcell.pvmodules.synthetic import assemble_module

SEVERITY = {OK: 0, REVIEW: 1, DEFECT: 2}
FIGURES = ("own_recall", "own_f1", "at_0.5_f1", "roc_auc")


CAMERAS = {"all": ("rotation_deg", "perspective", "illumination", "noise"), "clean": (),
           "warp": ("rotation_deg", "perspective"), "light": ("illumination",), "noise": ("noise",)}


def camera(seed: int, module: int, effects: str = "all") -> dict:
    """The warp, light and noise of one module, drawn from its own seed (those
    CAMERAS[effects] leaves out set to none, the others drawn as with all)."""
    rng = np.random.default_rng([seed, module])
    drawn = dict(rotation_deg=float(rng.uniform(-3, 3)), perspective=float(rng.uniform(0, 0.03)),
                 illumination=float(rng.uniform(0.1, 0.3)), noise=float(rng.uniform(0.01, 0.03)))
    return {name: value if name in CAMERAS[effects] else 0.0 for name, value in drawn.items()}


def plan(cells: int, layouts: list[str], seeds: int, effects: str = "all") -> list[dict]:
    """Every module to build: layout, family (the layout), seed, its cells (indices into the table), camera."""
    modules = []
    for layout in layouts:
        rows, cols = parse_grid(layout)
        per = rows * cols // (2 if half_cut(layout) else 1)
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(cells)
            for k in range(cells // per):
                modules.append(dict(key=f"{layout}/s{seed}/m{k}", layout=layout, family=layout, seed=seed,
                                    cells=order[k * per:(k + 1) * per].tolist(), camera=camera(seed, k, effects)))
    return modules


def line_like(defective: np.ndarray, intact: np.ndarray, count: int, effects: str = "all") -> list[dict]:
    """6x10 modules as a line sees them, 0 to 4 defective cells among intact ones (shuffled
    ELPV cells hold a third defective: every such module is a C), for the grades."""
    modules = []
    for k in range(count):
        rng = np.random.default_rng([99, k])
        bad = rng.choice(defective, k % 5, replace=False)
        cells = rng.permutation(np.concatenate([bad, rng.choice(intact, 60 - len(bad), replace=False)]))
        modules.append(dict(key=f"line/m{k}", layout="6x10", family="6x10 line-like", seed=100 + k,
                            cells=cells.tolist(), camera=camera(100, k, effects)))
    return modules


def half_cut(layout: str) -> bool:
    return parse_grid(layout)[1] >= 20  # 6x20, 6x24: cells cut in half, as assemble_module's split_gap


def inspect_one(model, rules, pixels: list[np.ndarray], module: dict) -> dict:
    """Assemble one module, inspect it; per whole cell its probabilities, decisions and whether it was found."""
    rows, cols = parse_grid(module["layout"])
    halves = half_cut(module["layout"])
    image, truth = assemble_module([pixels[i] for i in module["cells"]], rows, cols, split_gap=halves,
                                   seed=module["seed"], **module["camera"])
    started = time.perf_counter()
    found = inspect_module(model, image, rows, cols, rules, want_map=False)
    seconds = time.perf_counter() - started
    width = np.linalg.norm(truth.corners[..., 1, :] - truth.corners[..., 0, :], axis=-1)
    near = np.linalg.norm(found.corners.mean(axis=2) - truth.centres, axis=-1) < 0.05 * width
    probs, decisions = found.probs.reshape(rows * cols, -1), found.decisions.reshape(rows * cols, -1)
    near = near.reshape(-1)
    if halves:  # tiles 2k and 2k + 1 are cell k's halves, side by side in one row
        probs = probs.reshape(-1, 2, probs.shape[1]).max(axis=1)
        worse = np.vectorize(SEVERITY.get)(decisions).reshape(-1, 2, decisions.shape[1]).max(axis=1)
        decisions = np.array([OK, REVIEW, DEFECT])[worse]
        near = near.reshape(-1, 2).all(axis=1)
    return dict(key=module["key"], probs=probs.tolist(), decisions=decisions.tolist(), found=near.tolist(),
                grade=found.grade, seconds=seconds)


def load_done(path: Path) -> dict[str, dict]:
    """Modules of an earlier, interrupted run (a half-written last line is dropped)."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def true_grade(rules, labels: list[str], truth: np.ndarray, dark: np.ndarray) -> str:
    """The grade the rules give a module whose cells are exactly as labelled (unknown counted ok)."""
    decisions = np.where(np.nan_to_num(truth, nan=0.0) >= 0.5, DEFECT, OK)
    return grade(rules, module_counts(labels, decisions, dark))[0]


def file_grade(rules, labels: list[str], decisions: np.ndarray, dark: np.ndarray) -> str:
    return grade(rules, module_counts(labels, decisions, dark))[0]


def grades(modules: list[dict], results: dict, table, files: dict, rules, labels: list[str],
           pixels: list[np.ndarray]) -> dict:
    """Per layout: the share of modules given their true grade by inspect and by the files, and confusions."""
    out = {}
    for family in sorted({m["family"] for m in modules}):
        rows = []
        for module in (m for m in modules if m["family"] == family):
            index = module["cells"]
            dark = dark_areas([[pixels[i] for i in index]])
            truth = true_grade(rules, labels, table.targets[index][:, files["columns"]], dark)
            rows.append((truth, results[module["key"]]["grade"],
                         file_grade(rules, labels, files["decisions"][index], dark)))
        out[family] = dict(
            modules=len(rows), inspect_right=float(np.mean([t == m for t, m, _ in rows])),
            files_right=float(np.mean([t == f for t, _, f in rows])),
            inspect_as_files=float(np.mean([m == f for _, m, f in rows])),
            confusion={f"{t}->{m}": n for (t, m), n in sorted(Counter((t, m) for t, m, _ in rows).items())},
            confusion_files={f"{t}->{f}": n for (t, f), n in sorted(Counter((t, f) for t, _, f in rows).items())})
    return out


def compare(modules: list[dict], results: dict, table, files: dict, labels: list[str],
            replicates: int) -> dict:
    """Per layout: module path against file path, per label with paired intervals."""
    out = {}
    for layout in sorted({m["layout"] for m in modules if m["family"] == m["layout"]}):
        chosen = [m for m in modules if m["family"] == layout]
        index = np.concatenate([m["cells"] for m in chosen])
        keys = [f"{m['key']}/{i}" for m in chosen for i in m["cells"]]
        truth = table.targets[index][:, files["columns"]].astype(np.float64)
        module_probs = np.concatenate([results[m["key"]]["probs"] for m in chosen])
        module_decisions = np.concatenate([results[m["key"]]["decisions"] for m in chosen])
        found = np.concatenate([results[m["key"]]["found"] for m in chosen])
        a = Scored(keys, labels, truth, files["probs"][index].astype(np.float64), files["decisions"][index])
        b = Scored(keys, labels, truth, module_probs.astype(np.float64), module_decisions)
        groups = {key: str(table.paths[i]) for key, i in zip(keys, index, strict=True)}
        diff = paired_difference(a, b, replicates=replicates, groups=groups)["figures"]
        out[layout] = dict(
            modules=len(chosen), cells=len(index), distinct_cells=len(set(index.tolist())),
            found=float(found.mean()), agreement=float((module_decisions == a.decisions).mean()),
            agreement_per_label={label: float((module_decisions[:, j] == a.decisions[:, j]).mean())
                                 for j, label in enumerate(labels)},
            # at 0.5: a threshold away from the dense low scores, where a fold's own may not be
            agreement_at_half=float(((module_probs >= 0.5) == (a.probs >= 0.5)).mean()),
            positives={label: int(np.nansum(truth[:, j] >= 0.5)) for j, label in enumerate(labels)},
            figures={f"{label}/{name}": diff[f"{label}/{name}"] for label in labels for name in FIGURES},
            mean_f1=diff["mean_f1/own"], flagged=diff["flagged"],
            seconds_per_module=float(np.median([results[m["key"]]["seconds"] for m in chosen])))
    return out


def score_as_files(model, table) -> dict:
    """The cells as `predict` scores them: decoded from their files."""
    labels = [label for label in model.info.labels if label in table.names]
    columns = [table.names.index(label) for label in labels]
    keep = [model.info.labels.index(label) for label in labels]
    probs, decisions = [], []
    for batch in score_files(model, table.paths, batch_size=32):
        if not batch.ok.all():
            bad = [f"{p}: {e}" for p, e in zip(batch.paths, batch.errors, strict=True) if e]
            sys.exit(f"module_path: cells that cannot be read: {bad[:3]}")
        probs.append(batch.probs[:, keep])
        decisions.append(batch.scores.decisions[:, keep])
    return dict(labels=labels, columns=columns, probs=np.concatenate(probs), decisions=np.concatenate(decisions))


def show(report: dict) -> None:
    for layout, c in report["paths"].items():
        print(f"\n{layout}: {c['modules']} modules, {c['cells']} cells ({c['distinct_cells']} distinct); "
              f"found {c['found']:.1%}; decisions agree {c['agreement']:.1%} "
              f"({', '.join(f'{k} {v:.1%}' for k, v in c['agreement_per_label'].items())}), "
              f"at 0.5 {c['agreement_at_half']:.1%}; inspect {c['seconds_per_module']:.2f} s per module (median)")
        print(f"  {'figure':28s} {'files':>6s} {'module':>7s} {'diff':>7s}  95 % interval")
        for name, f in [*c["figures"].items(), ("mean_f1 (own)", c["mean_f1"]), ("flagged share", c["flagged"])]:
            print(f"  {name:28s} {fmt(f['a']):>6s} {fmt(f['b']):>7s} {fmt(f['difference'], '+.3f'):>7s}  "
                  f"[{fmt(f['low'], '+.3f')}, {fmt(f['high'], '+.3f')}] {f['verdict']}")
    for family, g in report["grades"].items():
        print(f"\n{family} grades ({g['modules']} modules): inspect gives the true grade to {g['inspect_right']:.0%}, "
              f"the files' decisions to {g['files_right']:.0%}; inspect = files {g['inspect_as_files']:.0%}")
        print(f"  true->inspect {g['confusion']}; true->files {g['confusion_files']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("labels", type=Path, help="labels CSV of cells the model never trained on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layouts", default="6x10,6x24")
    parser.add_argument("--line-like", type=int, default=10, help="6x10 modules with 0-4 defective cells")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--camera", choices=CAMERAS, default="all",
                        help="the camera's effects on the modules: all, none (clean) or one alone")
    args = parser.parse_args()
    print(" ".join(sys.argv), "|", platform.processor() or platform.machine(), file=sys.stderr)
    model, table, rules = open_model(args.model), read_labels_csv(args.labels), load_rules()
    layouts = [text.strip() for text in args.layouts.split(",")]
    modules = plan(len(table), layouts, args.seeds, args.camera)
    defective = np.flatnonzero((np.nan_to_num(table.targets) >= 0.5).any(axis=1))
    intact = np.flatnonzero((table.targets < 0.5).all(axis=1))  # known intact for every label
    modules += line_like(defective, intact, args.line_like, args.camera)
    started = time.perf_counter()
    files = score_as_files(model, table)
    pixels = [read_pixels(p) for p in table.paths]
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "modules.jsonl"
    # another model's, cells' or camera's modules are not reused
    run = f"{args.model.resolve()}|{args.labels.resolve()}" + ("" if args.camera == "all" else f"|{args.camera}")
    results = {key: row for key, row in load_done(journal).items() if row.get("run") == run}
    with open(journal, "a", encoding="utf-8") as handle:
        for module in (m for m in modules if m["key"] not in results):
            results[module["key"]] = inspect_one(model, rules, pixels, module) | {"run": run}
            handle.write(json.dumps(results[module["key"]]) + "\n")
            handle.flush()
    labels = files["labels"]
    report = dict(model=str(args.model), labels_csv=str(args.labels), cells=len(table), seeds=args.seeds,
                  camera=args.camera,
                  cpu=cpu_name(), paths=compare(modules, results, table, files, labels, args.replicates),
                  grades=grades(modules, results, table, files, rules, labels, pixels),
                  seconds=time.perf_counter() - started)
    atomic_write_json(args.out / "module_path.json", report)
    show(report)
    print(f"\nwrote {args.out / 'module_path.json'} ({report['seconds']:.0f} s)")


def cpu_name() -> str:
    return cpu_model() or platform.processor()


if __name__ == "__main__":
    cv2.setNumThreads(2)
    main()
