"""The `elcell` command. Thin: parse options, call the stage modules.

Each command's module is imported only when the command runs, so `elcell
predict` on an inspection PC never imports PyTorch, and `elcell --help` is quick.
Training options come from their one declaration (elcell.training.config); the other
commands' options are declared here.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from elcell import __version__
from elcell.errors import DataError, ElcellError
from elcell.io import output_mode
from elcell.options import (
    add_options,
    base_values,
    positive_int,
)
from elcell.parsers import (
    add_compare,
    add_evaluate,
    add_explain,
    add_inspect,
    add_predict,
    add_runtime_options,
    add_segment,
    add_serve,
    command,
)
from elcell.training.config import GROUPS, TrainConfig, two_stage_configs
from elcell.training.config import train_defaults as config_defaults
from elcell.training.pretrain_options import PretrainConfig

# what `pip install .` leaves out and training and exporting need (the [train] extra)
TRAINING_PACKAGES = {"torch", "lightning", "kornia", "torchmetrics", "tensorboard", "onnxscript"}


# --------------------------------------------------------------------------- training
def train_defaults(argv: list[str]) -> dict:
    """`elcell train`'s defaults for this command line (config.train_defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    for option in ("--config", "--recipe", "--resume", "--from"):
        pre.add_argument(option)
    known, _ = pre.parse_known_args(argv)
    return config_defaults(known.recipe, known.config, known.resume, getattr(known, "from"))


def two_stage_comment(config: TrainConfig) -> str:
    """How the second stage of a two-stage run differs from the options printed,
    as YAML behind comment marks (so --print-config's output still reads back as
    --config); empty for a one-stage run."""
    if config.finetune_epochs <= 0:
        return ""
    run = config.out or "RUN"  # without --out, runs/<timestamp> when it starts
    given, second = asdict(config), asdict(two_stage_configs(config, Path(run))[1])
    changed = {name: value for name, value in second.items()
               if value != given[name] and name not in ("out", "finetune_epochs")}
    lines = yaml.safe_dump(changed, sort_keys=False).splitlines()
    return (f"# two stages: the first trains with the options above into {run}/pretext, "
            f"the second fine-tunes into {run} with these changed:\n" + "".join(f"#   {line}\n" for line in lines))


def _add_train(commands, defaults: dict | None) -> None:
    parser = command(commands, "train", "elcell.training.train", "train a model and export it to ONNX",
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
    # another command only needs the parser to exist: the base values spare it reading
    # (and type-checking) the recipes on every start
    add_options(parser, TrainConfig, GROUPS, defaults or base_values(TrainConfig))


def _add_pretrain(commands) -> None:
    parser = command(commands, "pretrain", "elcell.training.pretrain",
                      "self-supervised pretraining on unlabelled cells (SimCLR)",
                      "Learn a backbone from unlabelled cells by contrasting two random views of each "
                      "(SimCLR); write RUN/backbone.pth, the starting point of "
                      "`elcell train --pretrained RUN/backbone.pth`.",
                      usage="elcell pretrain [--data CELLS] [--out DIR] [OPTIONS]")
    add_options(parser, PretrainConfig, [g for g in GROUPS if g not in ("adaptation", "two stages", "evaluation")],
                PretrainConfig().__dict__)


def _run_train(args) -> int:
    config = TrainConfig.from_dict({k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    if args.print_config:
        print(config.to_yaml() + two_stage_comment(config), end="")
        return 0
    if config.folds:
        from elcell.training.kfold import (
            main,  # the protocol: K trainings, then out-of-fold figures
        )
    else:
        from elcell.training.train import main  # imports torch: only when really training
    return main(config)


def _run_pretrain(args) -> int:
    from elcell.training.pretrain import main  # imports torch

    return main(PretrainConfig(**{k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__}))


def _add_export(commands) -> None:
    parser = command(commands, "export", "", "re-export a checkpoint to ONNX; quantise to int8",
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
                             "(default: the run's own val.csv); unreadable ones are named and left out, "
                             "and the command then exits with status 1")
    parser.add_argument("--calibration-count", type=positive_int, default=200,
                        help="cells drawn from --calibration to calibrate on")
    parser.add_argument("--eval-data", metavar="LABELS.csv",
                        help="compare float and int8 on these cells (default: all --calibration cells); "
                             "unreadable ones are named and left out, and the command then exits with status 1")
    parser.add_argument("--group", metavar="COLUMN",
                        help="a column of those CSVs that is a group (e.g. cell type), not a label")
    parser.add_argument("--int8-out", metavar="FILE.onnx",
                        help="int8 model path (default: <float model>.int8.onnx beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--allow-recall-drop", action="store_true",
                        help="write the int8 model even if a label's recall drops by more than 0.02 "
                             "beyond chance")
    add_runtime_options(parser, workers=False, threads=False)
    parser.set_defaults(run=_run_export)


def _run_of(source: str) -> Path:
    """The run folder a run folder, its model or its checkpoint belongs to."""
    path = Path(source)
    return path if path.is_dir() else path.parent.parent if path.suffix == ".ckpt" else path.parent


def _run_validation_cells(source: str) -> str | None:
    """RUN/val.csv of the run `source` belongs to."""
    run = _run_of(source)
    return str(run / "val.csv") if (run / "val.csv").is_file() else None


def _kept_checkpoint(source: str) -> Path | None:
    """The checkpoint the model of the run `source` belongs to was exported from
    (summary.json's), if it is there."""
    run = _run_of(source)
    try:
        kept = run / json.loads((run / "summary.json").read_text(encoding="utf-8"))["best_checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kept if kept.is_file() else None


def _run_export(args) -> int:
    if args.int8 and not args.calibration:
        # the run's own validation cells: never its test cells, and decoded as it trained
        args.calibration = _run_validation_cells(args.checkpoint)
        if not args.calibration:
            raise DataError("--int8 needs --calibration LABELS.csv (real cells to calibrate on); a run "
                            "folder's val.csv is taken by default, and none was found beside "
                            f"{args.checkpoint}")
    if args.int8_out:  # before any work
        output_mode(args.int8_out, "--int8-out", overwrite=args.overwrite, file=True)
    source = args.checkpoint
    if Path(source).is_dir():  # a run folder stands for its best model, as in predict
        from elcell.infer.runtime import resolve_model_path

        source = str(resolve_model_path(source))
    if source.lower().endswith(".onnx"):
        if not args.int8:
            kept = _kept_checkpoint(args.checkpoint)
            again = f"give {kept} to export it again" if kept else "give a .ckpt checkpoint to export again"
            calibrate = "" if _run_validation_cells(args.checkpoint) else " --calibration LABELS.csv"
            raise DataError(f"{source} is already ONNX: pass --int8{calibrate} to quantise it, or {again}")
        if args.out:
            raise DataError(f"--out is where a checkpoint is exported to; {source} is already "
                            "ONNX: name its int8 model with --int8-out")
        out = Path(source)
    else:
        from elcell.training.export import export_checkpoint  # imports torch

        out, error = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                                       tolerance=args.parity_tolerance)
        print(f"wrote {out} (batch of 4 checked against PyTorch: max |probs diff| {error:.2e})")
    if args.int8:
        from elcell.infer.quantize import main  # ONNX Runtime's quantiser: only when asked for

        return main(args, out)
    return 0


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
    add_predict(commands)
    add_evaluate(commands)
    add_compare(commands)
    add_explain(commands)
    add_inspect(commands)
    add_segment(commands)
    add_serve(commands)
    return parser


def _dispatch(args) -> int:
    if args.command == "train":
        return _run_train(args)
    if args.command == "pretrain":
        return _run_pretrain(args)
    if getattr(args, "run", None):
        return args.run(args)
    if getattr(args, "ray", None):  # Ray is imported only here, and only when asked for
        return importlib.import_module("elcell.cluster.command").main(args)
    return importlib.import_module(args.module).main(args)


# What a path a user gave can do to a command that writes there (a missing input is named
# by the commands themselves; a file missing anywhere else is a fault, shown whole)
PATH_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST}


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
    except OSError as err:
        if err.filename is None or err.errno not in PATH_ERRORS:  # a fault to see whole, not a user's path
            raise
        # a path that could not be written (read-only, a file where a folder should be, disk
        # full) where the command got to it: one line naming it, not a traceback
        # (output_mode refuses most such paths before any work)
        print(f"elcell: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
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
