"""The `elcell` command. Thin: parse options, call the stage modules.

Each command's module is imported only when the command runs, so `elcell
predict` on an inspection PC never imports PyTorch, and `elcell --help` is quick.
Training options come from their one declaration (elcell.config); the other
commands' options are declared here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from elcell import __version__
from elcell.config import GROUPS, PretrainConfig, TrainConfig, two_stage_comment
from elcell.config import train_defaults as config_defaults
from elcell.errors import DataError, ElcellError
from elcell.io import output_mode
from elcell.options import (
    DefaultsHelpFormatter,
    add_options,
    fraction,
    non_negative_int,
    positive_int,
)

# what `pip install .` leaves out and training and exporting need (the [train] extra)
TRAINING_PACKAGES = {"torch", "lightning", "kornia", "torchmetrics", "tensorboard", "onnxscript"}


def _command(commands, name: str, module: str, help: str, description: str,
             usage: str | None = None) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description, usage=usage,
                                 formatter_class=DefaultsHelpFormatter)
    parser.set_defaults(module=module)
    return parser


# --------------------------------------------------------------------------- training
def train_defaults(argv: list[str]) -> dict:
    """`elcell train`'s defaults for this command line (config.train_defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    for option in ("--config", "--recipe", "--resume"):
        pre.add_argument(option)
    known, _ = pre.parse_known_args(argv)
    return config_defaults(known.recipe, known.config, known.resume)


def _add_train(commands, defaults: dict | None) -> None:
    parser = _command(commands, "train", "elcell.train", "train a model and export it to ONNX",
                      "Train a multi-label classifier on labelled EL cells; write checkpoints, logs, "
                      "losses.png and best_model_epoch{N}.onnx to the run folder. Defaults shown are "
                      "those of the recipe chosen (--recipe) and of --config/--resume.",
                      usage="elcell train [--recipe NAME] [--data CSV] [--out DIR] [--config FILE.yaml] "
                            "[OPTIONS]")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="read options from a YAML file (command-line options win); a run's "
                             "RUN/two-stage.yaml or RUN/config.yaml repeats that run from the start")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective options as YAML and exit")
    add_options(parser, TrainConfig, GROUPS, defaults or TrainConfig().__dict__)


def _add_pretrain(commands) -> None:
    parser = _command(commands, "pretrain", "elcell.pretrain",
                      "self-supervised pretraining on unlabelled cells (SimCLR)",
                      "Learn a backbone from unlabelled cells by contrasting two random views of each "
                      "(SimCLR); write RUN/backbone.pth, the starting point of "
                      "`elcell train --pretrained RUN/backbone.pth`.",
                      usage="elcell pretrain [--data CELLS] [--out DIR] [OPTIONS]")
    add_options(parser, PretrainConfig, [g for g in GROUPS if g not in ("two stages", "evaluation")],
                PretrainConfig().__dict__)


def _run_train(args) -> int:
    config = TrainConfig.from_dict({k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    if args.print_config:
        print(config.to_yaml() + two_stage_comment(config), end="")
        return 0
    if config.folds:
        from elcell.kfold import main  # the protocol: K trainings, then out-of-fold figures
    else:
        from elcell.train import main  # imports torch: only when really training
    return main(config)


def _run_pretrain(args) -> int:
    from elcell.pretrain import main  # imports torch

    return main(PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__}))


def _add_export(commands) -> None:
    parser = _command(commands, "export", "", "re-export a checkpoint to ONNX; quantise to int8",
                      "Export a training checkpoint to an elcell ONNX file, checked against PyTorch with "
                      "ONNX Runtime; with --int8 also a quantised model (no PyTorch needed for an .onnx).")
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="Lightning checkpoint (.ckpt) from `elcell train` (or, with --int8, a float "
                             "elcell .onnx file, or a run folder for its best model, to quantise)")
    parser.add_argument("--out", help="ONNX file or folder (a path ending in / is a folder; default: "
                                      "best_model_epoch{N}.onnx beside the checkpoint)")
    parser.add_argument("--parity-tolerance", type=float, default=1e-4, metavar="T",
                        help="largest |probability difference| allowed between PyTorch and ONNX Runtime "
                             "on the check batch (heatmaps: at least 1e-3 of their peak)")
    parser.add_argument("--int8", action="store_true",
                        help="also write a statically quantised int8 model (QDQ, per-channel 7-bit "
                             "weights, which hold on CPUs with and without VNNI), calibrated on real cells; "
                             "its F1 and recall are printed beside the float model's, and it is refused if "
                             "a label's recall drops by more than 0.02 beyond chance")
    parser.add_argument("--calibration", metavar="LABELS.csv",
                        help="labelled cells for --int8 (CSV or 'elpv'): calibration and comparison "
                             "(default: the run's own val.csv)")
    parser.add_argument("--calibration-count", type=positive_int, default=200,
                        help="cells drawn from --calibration to calibrate on")
    parser.add_argument("--eval-data", metavar="LABELS.csv",
                        help="compare float and int8 on these cells (default: all --calibration cells)")
    parser.add_argument("--group", metavar="COLUMN",
                        help="a column of those CSVs that is a group (e.g. cell type), not a label")
    parser.add_argument("--int8-out", metavar="FILE.onnx",
                        help="int8 model path (default: <float model>.int8.onnx beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--allow-recall-drop", action="store_true",
                        help="write the int8 model even if a label's recall drops by more than 0.02 "
                             "beyond chance")
    _add_runtime_options(parser, workers=False, threads=False)
    parser.set_defaults(run=_run_export)


def _run_validation_cells(source: str) -> str | None:
    """RUN/val.csv of the run a run folder, its model or its checkpoint belongs to."""
    path = Path(source)
    run = path if path.is_dir() else path.parent.parent if path.suffix == ".ckpt" else path.parent
    return str(run / "val.csv") if (run / "val.csv").is_file() else None


def _run_export(args) -> int:
    if args.int8 and not args.calibration:
        # the run's own validation cells: never its test cells, and decoded as it trained
        args.calibration = _run_validation_cells(args.checkpoint)
        if not args.calibration:
            raise DataError("--int8 needs --calibration LABELS.csv (real cells to calibrate on); a run "
                            "folder's val.csv is taken by default, and none was found beside "
                            f"{args.checkpoint}")
    if args.int8_out:  # before any work
        output_mode(args.int8_out, "--int8-out", overwrite=args.overwrite)
    source = args.checkpoint
    if Path(source).is_dir():  # a run folder stands for its best model, as in predict
        from elcell.runtime import resolve_model_path

        source = str(resolve_model_path(source))
    if source.lower().endswith(".onnx"):
        if not args.int8:
            raise DataError(f"{source} is already ONNX; pass --int8 --calibration to quantise "
                            "it, or give a .ckpt checkpoint to re-export")
        if args.out:
            raise DataError(f"--out is where a checkpoint is exported to; {source} is already "
                            "ONNX: name its int8 model with --int8-out")
        out = Path(source)
    else:
        from elcell.export import export_checkpoint  # imports torch

        out, error = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                                       tolerance=args.parity_tolerance)
        print(f"wrote {out} (batch of 4 checked against PyTorch: max |probs diff| {error:.2e})")
    if args.int8:
        from elcell.quantize import main  # ONNX Runtime's quantiser: only when asked for

        return main(args, out)
    return 0


# --------------------------------------------------------------------------- using a model
def _add_runtime_options(parser: argparse.ArgumentParser, workers: bool = True,
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


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    """--threshold and --review-threshold, as predict, inspect and serve take them
    (applied by runtime.chosen_thresholds)."""
    parser.add_argument("--threshold", action="append", metavar="[LABEL=]P",
                        help="decision threshold overriding the model's: 0.3 for every label or crack=0.3 "
                             "for one (repeatable)")
    parser.add_argument("--review-threshold", action="append", metavar="[LABEL=]P",
                        help="lower edge of the review band (below it a cell is ok), as --threshold")


def _add_predict(commands) -> None:
    parser = _command(commands, "predict", "elcell.predict",
                      "classify cell images with an ONNX model (no PyTorch needed)",
                      "Run an elcell ONNX model on cell images with ONNX Runtime and write one CSV row per "
                      "image: path, prob_<label>, decision_<label> (defect/review/ok), error, and the model "
                      "and thresholds that judged it. Rows are appended and synced batch by batch, so an "
                      "interrupted run loses nothing and --resume continues it. Unreadable images are "
                      "listed in the error column and on stderr; the run goes on and exits with status 1.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    parser.add_argument("--out", metavar="FILE.csv", help="output CSV (default: stdout)")
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
    _add_runtime_options(parser)


def _add_evaluate(commands) -> None:
    parser = _command(commands, "evaluate", "elcell.evaluate",
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
                        help="'f1': per label the threshold of maximum F1; 'recall=0.95': the highest "
                             "threshold that keeps recall >= 0.95")
    parser.add_argument("--review-band", metavar="P|recall=R",
                        help="lower threshold below which a cell is ok; between it and the threshold the "
                             "cell is 'review' (for a person): a probability such as 0.2, or recall=0.99")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation; reported with and without")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT/report.html: one self-contained page with the metrics, curves "
                             "and the most confident hits and mistakes with their heatmaps")
    _add_runtime_options(parser)


def _add_explain(commands) -> None:
    parser = _command(commands, "explain", "elcell.explain",
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
    _add_runtime_options(parser, workers=False, progress=False)


def _add_inspect(commands) -> None:
    parser = _command(commands, "inspect", "elcell.inspection",
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
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the CSVs, maps and report")
    parser.add_argument("--rules", metavar="FILE.yaml",
                        help="grading rules (default: elcell's grading.yaml; copy and edit it)")
    _add_threshold_options(parser)
    parser.add_argument("--map", action=argparse.BooleanOptionalAction, default=True,
                        help="draw each module's map and the flagged cells' overlays (heatmaps cost time)")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="write OUT/report.html for the whole folder at the end")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    _add_runtime_options(parser, workers=False, progress=False)


def _add_segment(commands) -> None:
    parser = _command(commands, "segment", "elcell.segment",
                      "cut module photos into cell images and a labels CSV to fill in",
                      "Cut every module photo into its cells (found as `inspect` finds them) at the photo's "
                      "resolution and depth (16-bit stays 16-bit), named <module>_r<row>_c<col>.png, and "
                      "write OUT/labels.csv in the training format: label columns empty, or with --model "
                      "filled with its decisions (defect 1, ok 0, review empty), for `elcell train --data`.")
    parser.add_argument("inputs", nargs="+", metavar="MODULE_IMAGE", help="module photos, folders or CSVs")
    parser.add_argument("--grid", required=True, metavar="ROWSxCOLS", help="as inspect's, e.g. 6x10")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the cells and labels.csv")
    parser.add_argument("--model", metavar="MODEL", help="fill the labels with this model's decisions")
    parser.add_argument("--labels", default="crack,inactive", metavar="A,B",
                        help="label columns of labels.csv without --model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/labels.csv")


def _add_compare(commands) -> None:
    parser = _command(commands, "compare", "elcell.compare",
                      "is B better than A beyond chance? paired intervals on the same cells",
                      "Compare two judgements of the same cells: k-fold folders (their oof.csv), scored "
                      "CSVs (oof.csv, evaluate's predictions.csv), or two models scored here on --data. "
                      "Per label ROC-AUC, F1, recall and recall counting review, and the review burden, "
                      "each for A and B with the paired 95 % bootstrap interval of B - A: 'better' or "
                      "'worse' only where the interval excludes 0. The interval covers the choice of "
                      "cells, not of training seeds. Exits with 1 when B is worse on a --require "
                      "figure, so a script can gate a model's promotion on it.",
                      usage="elcell compare A B [--data LABELS.csv] [--require recall=crack] [--out DIR]")
    parser.add_argument("a", metavar="A", help="the reference: a k-fold folder, a scored CSV, or a model")
    parser.add_argument("b", metavar="B", help="the challenger: any of the same kinds (compared on the cells "
                                               "both scored)")
    parser.add_argument("--data", metavar="LABELS.csv", help="labelled cells to score two models on")
    parser.add_argument("--group", metavar="COLUMN", help="with --data: a group column that is not a label")
    parser.add_argument("--require", action="append", metavar="METRIC=LABEL",
                        help="fail (exit 1) if B is worse than A beyond the interval on this figure "
                             "(repeatable): METRIC=LABEL[,LABEL] with METRIC recall, recall_with_review, f1, "
                             "precision (at each model's own thresholds), roc_auc or f1_at_0.5; or mean_f1, "
                             "review_burden. Choose it beforehand: of dozens of figures shown, a few exclude "
                             "0 by chance")
    parser.add_argument("--out", metavar="DIR", help="write compare.json and disagreements.csv (the cells "
                                                     "decided differently) here")
    parser.add_argument("--tta", action="store_true", help="with --data: test-time augmentation")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr while scoring models (default: on a terminal)")


def _add_serve(commands) -> None:
    parser = _command(commands, "serve", "elcell.serve", "an inspection station: web page and HTTP API",
                      "Serve a model over HTTP (FastAPI on uvicorn, no PyTorch): the page at / scores cells and "
                      "modules; the JSON API is documented at /docs. With --labels-out an operator labels the "
                      "flagged cells on the page, into DIR/labels.csv for `elcell train --data`.")
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network)")
    parser.add_argument("--port", type=positive_int, default=8000, help="TCP port")
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on the API (default: $ELCELL_TOKEN)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest request body accepted")
    parser.add_argument("--labels-out", metavar="DIR", help="review loop: answers to DIR/labels.csv, cells to DIR/cells/")
    _add_threshold_options(parser)
    parser.add_argument("--rules", metavar="FILE.yaml", help="module grading rules (default: elcell's)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a cell waits for others to batch with")
    parser.add_argument("--max-queue", type=positive_int, default=512, help="cells queued before 503 Busy")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_runtime_options(parser, workers=False, progress=False)


# --------------------------------------------------------------------------- main
def build_parser(train: dict | None = None) -> argparse.ArgumentParser:
    """The whole command line; `train` holds the defaults `elcell train` shows and uses."""
    parser = argparse.ArgumentParser(
        prog="elcell", description="Find cracks and inactive regions in electroluminescence images of "
                                   "solar cells and modules.")
    parser.add_argument("--version", action="version", version=f"elcell {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands, train)
    _add_pretrain(commands)
    _add_export(commands)
    _add_predict(commands)
    _add_evaluate(commands)
    _add_compare(commands)
    _add_explain(commands)
    _add_inspect(commands)
    _add_segment(commands)
    _add_serve(commands)
    return parser


def _dispatch(args) -> int:
    if args.command == "train":
        return _run_train(args)
    if args.command == "pretrain":
        return _run_pretrain(args)
    if getattr(args, "run", None):
        return args.run(args)
    return importlib.import_module(args.module).main(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(train_defaults(argv) if command == "train" else None)
        args = parser.parse_args(argv)
        return int(_dispatch(args) or 0)  # a command returns 1 when a batch job finished with failures
    except ElcellError as err:
        print(f"elcell: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elcell: interrupted" + _resume_hint(argv), file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAINING_PACKAGES:
            raise
        print("elcell: error: this command trains or exports, which needs PyTorch (pip install -r "
              "requirements.txt); predict, evaluate, explain, inspect, serve and export --int8 of an .onnx "
              "file do not", file=sys.stderr)
        return 2


def _resume_hint(argv: list[str]) -> str:
    """After Ctrl-C: how to go on from where the command stopped."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("predict", "inspect") and "--out" in argv:
        return "; continue with the same command and --resume"
    run = argv[argv.index("--out") + 1] if "--out" in argv[:-1] else os.environ.get("ELCELL_RUN_DIR", "")
    if command != "train" or not run:
        return ""
    for stage, after in (("", ""), ("pretext/", "; then run the first command again for the second stage")):
        checkpoint = Path(run) / stage / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            return f"; continue with: elcell train --resume {checkpoint}{after}"
    return "; no epoch had finished, so there is nothing to resume: start it again"


if __name__ == "__main__":
    sys.exit(main())
