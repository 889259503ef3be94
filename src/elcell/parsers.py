"""The parsers of the commands that use a model: predict, evaluate, compare,
explain, inspect, segment, serve (and the options they share). Declared here,
run by their own modules; torch-free, as those commands are.
"""

from __future__ import annotations

import argparse

from elcell.infer.review_order import ORDERS
from elcell.options import (
    MAP_DETAIL,
    MAP_DETAILS,
    MAP_VIEWS,
    RECALL_ESTIMATORS,
    DefaultsHelpFormatter,
    add_options,
    base_values,
    fraction,
    non_negative_int,
    positive_int,
)
from elcell.station.budget import GROUP as BUDGET
from elcell.station.budget import Budget


def share(text: str) -> float:
    """argparse type: a share in [0, 1] (0: none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g}: need a share from 0 (none) to 1 (all)")
    return value


def command(commands, name: str, module: str, help: str, description: str,
             usage: str | None = None) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description, usage=usage,
                                 formatter_class=DefaultsHelpFormatter)
    parser.set_defaults(module=module)
    return parser


# --------------------------------------------------------------------------- using a model
def add_runtime_options(parser: argparse.ArgumentParser, workers: bool = True,
                         threads: bool = True, progress: bool = True) -> None:
    """The ONNX Runtime options that the commands using a model share."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--batch-size", type=positive_int, default=16, help="cells per ONNX Runtime call")
    if workers:
        group.add_argument("--workers", type=non_negative_int, default=None,
                           help="image decoding threads (default: number of CPUs, at most 4; 0 decodes "
                                "in the main thread)")
    if threads:
        group.add_argument("--threads", type=non_negative_int, default=0,
                           help="ONNX Runtime intra-op threads (0: one per physical core)")
    if progress:
        group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                           help="a progress bar on stderr (default: when stderr is a terminal)")


_MODEL_HELP = ("elcell ONNX model (from `elcell train`, `export` or `evaluate --tune-thresholds`), or a "
               "run folder for its best model")
_INPUTS_HELP = ("image files, folders (searched recursively) or CSVs whose first column holds image "
                "paths (relative to the CSV's folder), e.g. a labels CSV")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """--ray and --actors, as predict and inspect take them (elcell.cluster)."""
    group = parser.add_argument_group("cluster (pip install 'elcell[cluster]')")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="score on Ray Data: without ADDRESS a local Ray on this machine; `auto` or "
                            "ray://HOST:10001 an existing cluster (docs/scaling.md). --threads is then "
                            "per actor (default 2)")
    group.add_argument("--actors", type=positive_int, metavar="N",
                       help="with --ray: model actors, each with one ONNX Runtime session (default: the "
                            "cluster's CPUs / --threads)")


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    """--threshold and --review-threshold, as predict, inspect and serve take them
    (applied by runtime.chosen_thresholds)."""
    parser.add_argument("--threshold", action="append", metavar="[LABEL=]P",
                        help="decision threshold overriding the model's: 0.3 for every label or crack=0.3 "
                             "for one (repeatable)")
    parser.add_argument("--review-threshold", action="append", metavar="[LABEL=]P",
                        help="lower edge of the review band (below it a cell is ok), as --threshold")


def _add_map_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map-detail", choices=MAP_DETAILS, default=MAP_DETAIL,
                        help="a flagged cell's heatmap on the module map and its overlay: 'coarse', LayerCAM on "
                             "the last feature map (8 x 8 at 225 px: which part of the cell, not the crack's "
                             "line) from the calls that score the cells, no backward pass; 'fine', the model's "
                             "LayerCAM at stride 8 or 16 (as `explain` draws), a backward pass per view. A model "
                             "exported before coarse maps gives its fine one; the station's overlays of a "
                             "module's cells are drawn fine")
    parser.add_argument("--map-views", type=int, choices=(1, 2, 4, 8), default=MAP_VIEWS,
                        help="symmetric views a flagged cell's fine heatmap averages, on the module map and the "
                             "cell's overlay (more than 1 draws the fine map whatever --map-detail says): each view "
                             "is a pass forward and back through the network; 1 points at the defect nearly as "
                             "well (docs/heatmaps.md), the model's own (4 or 8, as `explain` draws) follows a "
                             "turned cell exactly. More than the model's are not taken; a model exported before "
                             "elcell averaged views at run time always gives all of its own")


def add_predict(commands) -> None:
    parser = command(commands, "predict", "elcell.infer.predict",
                      "classify cell images with an ONNX model (no PyTorch needed)",
                      "Run an elcell ONNX model on cell images with ONNX Runtime and write one CSV row per "
                      "image: path, prob_<label>, decision_<label> (defect/review/ok), error, and the model "
                      "and thresholds that judged it. Rows are appended and synced batch by batch, so an "
                      "interrupted run loses nothing and --resume continues it. Unreadable images are "
                      "listed in the error column and on stderr; the run goes on and exits with status 1.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    parser.add_argument("--out", metavar="FILE.csv", help="output CSV (default: stdout), or FILE.parquet: typed "
                        "columns for pandas, DuckDB or Spark (needs pyarrow)")
    _add_threshold_options(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the flips of each cell (and rotations for a "
                             "model trained with them); prob_<label>_no_tta keeps the plain probabilities")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip images already in --out (failed ones are "
                             "tried again); refused if another model or other thresholds wrote it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--heatmaps", metavar="DIR",
                        help="write a heatmap overlay (<image>_<label>.png) for every cell and label not ok")
    add_runtime_options(parser)
    add_ray_options(parser)


def add_evaluate(commands) -> None:
    parser = command(commands, "evaluate", "elcell.infer.evaluate",
                      "score an ONNX model on labelled cells; tune its thresholds",
                      "Score an elcell ONNX model on labelled cells: per-label precision, recall, F1, "
                      "ROC-AUC and average precision, confusion matrices, PR/ROC curves, predictions.csv "
                      "and metrics.json in --out. With --tune-thresholds and/or --review-band the "
                      "thresholds are tuned on these cells and written into OUT/<model>.tuned.onnx. Tune on "
                      "validation cells (RUN/val.csv), not on the test set. Unreadable images are left out "
                      "and listed; the command then exits with status 1.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="LABELS.csv",
                        help="labels CSV (path;label1;...) or 'elpv'; a cell is positive where its label "
                             "is >= 0.5 (soft labels such as ELPV's are read as they are)")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: <model folder>/<model>-eval)")
    parser.add_argument("--group", metavar="COLUMN",
                        help="also report per group of this CSV column (e.g. cell type; --data elpv: type)")
    parser.add_argument("--tune-thresholds", metavar="f1|recall=R",
                        help="'f1': per label the threshold of maximum F1; 'recall=0.95': a threshold for "
                             "recall 0.95, as --recall-estimator reads it off these cells")
    parser.add_argument("--review-band", metavar="P|recall=R",
                        help="lower threshold below which a cell is ok; between it and the threshold the "
                             "cell is 'review' (for a person): a probability such as 0.2, or recall=0.99")
    parser.add_argument("--recall-estimator", choices=RECALL_ESTIMATORS, default="empirical",
                        help="how recall=R (of --tune-thresholds and --review-band) is read off the positive "
                             "cells: 'empirical', the highest threshold that keeps R of these cells (fewer of "
                             "new positives: recall=0.95 on 10 positives keeps about 10/11); 'expected', one "
                             "that keeps R of new positives on average, as `train`'s recipes do; "
                             "'logit-normal', a normal tail fitted to their logits (docs/training.md)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation; reported with and without")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT/report.html: one self-contained page with the metrics, curves "
                             "and the most confident hits and mistakes with their heatmaps")
    add_runtime_options(parser)


def add_explain(commands) -> None:
    parser = command(commands, "explain", "elcell.infer.explain",
                      "show where the model looked: heatmap overlays and boxes (no PyTorch needed)",
                      "For each image and label write <image>_<label>.png (the cell with the label's "
                      "heatmap on top), <image>_<label>.npy (the raw heatmap) and per image <image>.json "
                      "with probabilities, decisions and a box per label in the image's pixels. "
                      "Unreadable images are skipped and listed; the command then exits with status 1.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays, heatmaps and boxes")
    parser.add_argument("--label", action="append", metavar="LABEL",
                        help="explain only this label (repeatable; default: every label)")
    parser.add_argument("--box-threshold", type=fraction, default=0.5, metavar="F",
                        help="a box surrounds the region where the heatmap is >= F x its peak")
    add_runtime_options(parser, workers=False, progress=False)


def add_inspect(commands) -> None:
    parser = command(commands, "inspect", "elcell.pvmodules.inspect",
                      "inspect whole module photos: cells, a map and a grade per module (no PyTorch needed)",
                      "Find the module in each EL photo (dark surround, rotation, perspective), rectify it, find "
                      "its cell grid from the dark gaps, cut and score every cell, and grade the module by "
                      "rules. Writes OUT/cells.csv (per cell: module, row, col from 1, its corners in the photo, "
                      "probabilities, decisions, dark area), OUT/modules.csv (per module: counts, dark area, "
                      "grade and the rule that gave it), OUT/maps/<module>.png, the flagged cells' overlays "
                      "and OUT/report.html. Rows are written module by module: --resume continues an "
                      "interrupted run. A photo that cannot be used is named and the others go on; the "
                      "command then exits with status 1.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("inputs", nargs="+", metavar="MODULE_IMAGE",
                        help="module photos, folders of them or CSVs whose first column lists them")
    parser.add_argument("--grid", required=True, metavar="ROWSxCOLS",
                        help="cells as the module appears in the photo, e.g. 6x10 (landscape 60 cells), 10x6, "
                             "6x24 (144 half-cells)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the CSVs, maps and report; or FILE.parquet: one row per cell with its "
                             "module's grade (no maps; needs pyarrow)")
    parser.add_argument("--rules", metavar="FILE.yaml",
                        help="grading rules (default: elcell's grading.yaml; copy and edit it)")
    _add_threshold_options(parser)
    parser.add_argument("--map", action=argparse.BooleanOptionalAction, default=True,
                        help="draw each module's map and the flagged cells' overlays (heatmaps cost time)")
    _add_map_options(parser)
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="write OUT/report.html for the whole folder at the end")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    add_runtime_options(parser, workers=False, progress=False)
    add_ray_options(parser)


def add_segment(commands) -> None:
    parser = command(commands, "segment", "elcell.pvmodules.segment",
                      "cut module photos into cell images and a labels CSV to fill in",
                      "Cut every module photo into its cells (found as `inspect` finds them) at the photo's "
                      "resolution and depth (16-bit stays 16-bit), named <module>_r<row>_c<col>.png, and "
                      "write OUT/labels.csv in the training format: label columns empty, or with --model "
                      "filled with its decisions (defect 1, ok 0, review empty), for `elcell train --data`; "
                      "with --model its rows come in the order to label them (--review-order), with a "
                      "`reason` column saying why.")
    parser.add_argument("inputs", nargs="+", metavar="MODULE_IMAGE", help="module photos, folders or CSVs")
    parser.add_argument("--grid", required=True, metavar="ROWSxCOLS", help="as inspect's, e.g. 6x10")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the cells and labels.csv")
    parser.add_argument("--model", metavar="MODEL", help="fill the labels with this model's decisions")
    parser.add_argument("--labels", default="crack,inactive", metavar="A,B",
                        help="label columns of labels.csv without --model")
    parser.add_argument("--review-random", type=share, default=0.1, metavar="SHARE",
                        help="with --model: share of the rows, spread evenly, that are random ok cells")
    parser.add_argument("--review-order", choices=ORDERS, default="teach",
                        help="with --model: teach (likely defects and cells near 0.5 in turn: what a "
                             "fine-tuning learns most from) or check (nearest the thresholds first: "
                             "checking the model's decisions)")
    parser.add_argument("--seed", type=int, default=0, help="for the random ok cells")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/labels.csv")


def add_compare(commands) -> None:
    parser = command(commands, "compare", "elcell.judging.compare",
                      "is B better than A beyond chance? paired intervals on the same cells",
                      "Compare two judgements of the same cells: k-fold folders (their oof.csv), scored "
                      "CSVs (oof.csv, evaluate's predictions.csv), or two models scored here on --data. "
                      "Per label ROC-AUC, F1, recall and recall counting review, and the review burden, "
                      "each for A and B with the paired 95 % bootstrap interval of B - A: 'better' or "
                      "'worse' only where the interval excludes 0. The interval covers the choice of "
                      "cells, not of training seeds. Exits with 1 when B is worse on a --require "
                      "figure, when these cells cannot measure one, or when a --data cell could not be "
                      "read (and then prints no verdicts line), so a script can gate a model's promotion "
                      "on it; 2 on bad input.",
                      usage="elcell compare A B [--data LABELS.csv [--group COLUMN]] [--require METRIC=LABEL] "
                            "[--out DIR [--overlays N]] [--tta]")
    parser.add_argument("a", metavar="A", help="the reference: a k-fold folder, a scored CSV, or a model")
    parser.add_argument("b", metavar="B", help="the challenger: any of the same kinds (compared on the cells "
                                               "both scored)")
    parser.add_argument("--data", metavar="LABELS.csv", help="labelled cells to score two models on; for "
                                                              "k-fold folders and scored CSVs, the cells to "
                                                              "compare them on (the others are left out)")
    parser.add_argument("--group", metavar="COLUMN", help="with --data: a group column that is not a label")
    parser.add_argument("--require", action="append", metavar="METRIC=LABEL",
                        help="fail (exit 1) if B is worse than A beyond the interval on this figure "
                             "(repeatable): METRIC=LABEL[,LABEL] with METRIC recall, recall_with_review, f1, "
                             "precision (at each model's own thresholds), roc_auc or f1_at_0.5; or mean_f1, "
                             "review_burden. Choose it beforehand: of dozens of figures shown, a few exclude "
                             "0 by chance")
    parser.add_argument("--out", metavar="DIR", help="write compare.json and disagreements.csv (the cells "
                                                     "decided differently) here")
    parser.add_argument("--overlays", type=non_negative_int, default=None, metavar="N",
                        help="with two models, --data and --out: draw the N cells whose probability changed "
                             "most among those decided differently, A's heatmap beside B's, into "
                             "OUT/overlays/ with OUT/disagreements.html (default 50; 0: none)")
    parser.add_argument("--tta", action="store_true", help="with --data: test-time augmentation")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr while scoring models (default: on a terminal)")


def add_serve(commands) -> None:
    parser = command(commands, "serve", "elcell.station.app", "an inspection station: web page and HTTP API",
                      "Serve a model over HTTP (FastAPI on uvicorn, no PyTorch): the page at / scores cells and "
                      "modules; the JSON API is documented at /docs. With --labels-out an operator labels the "
                      "flagged cells on the page, into DIR/labels.csv for `elcell train --data`. A token "
                      "(--token-file FILE, or $ELCELL_TOKEN) is required on the API when set; listening beyond "
                      "this machine (--host 0.0.0.0) with --labels-out needs one. Requests are answered only "
                      "when their Host header names localhost, 127.0.0.1, [::1], --host or an --allowed-host "
                      "(others get 400, so a web page elsewhere cannot reach the station through DNS "
                      "rebinding).")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network)")
    parser.add_argument("--port", type=positive_int, default=8000, help="TCP port")
    parser.add_argument("--allowed-host", action="append", metavar="NAME",
                        help="a host name or address clients use to reach the station, e.g. inspection-pc or "
                             "10.0.4.17 (repeatable); requests naming other hosts get 400. Loopback names and "
                             "--host are always allowed")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--token-file", metavar="FILE",
                        help="require 'Authorization: Bearer TOKEN' on the API, TOKEN read from FILE (stripped); "
                             "keeps it off the command line, which other users of the machine can see")
    secret.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on the API; visible in the process "
                                        "list, prefer --token-file or $ELCELL_TOKEN (the default)")
    parser.add_argument("--labels-out", metavar="DIR", help="review loop: answers to DIR/labels.csv, cells to DIR/cells/; "
                                                            "the waiting cells in DIR/queue/ (a restart resumes them)")
    parser.add_argument("--review-random", type=share, default=0.1, metavar="SHARE",
                        help="share of the cells handed out for review drawn at random among those the model "
                             "decided ok (finds misses, estimates the error rate); the rest in --review-order")
    parser.add_argument("--review-order", choices=ORDERS, default="check",
                        help="check: nearest the thresholds first, to check the line's decisions; teach: likely "
                             "defects and cells near 0.5 in turn, when the answers are to fine-tune on "
                             "(`train --from`)")
    _add_threshold_options(parser)
    parser.add_argument("--rules", metavar="FILE.yaml", help="module grading rules (default: elcell's)")
    _add_map_options(parser)
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a cell waits for others to batch with")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_options(parser, Budget, [BUDGET], base_values(Budget))  # elcell.station.budget: what each bounds
    add_runtime_options(parser, workers=False, progress=False)
