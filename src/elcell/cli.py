"""The `elcell` command. Thin: parse options, call the stage modules.

Heavy modules are imported inside each command, so `elcell predict` on an
inspection PC never imports PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

TRAIN_HELP = {
    "recipe": "named set of defaults (docs/accuracy.md): 'full' (from scratch in two stages, drawn cracks "
              "then fine-tuning; a GPU, or about 15 minutes on 2 CPU cores), 'quick' (one stage cut down to "
              "minutes on a laptop CPU) or 'seed' (the original spec: "
              "resnet50, ImageNet weights, 300 px, Adam 1e-4, ReduceLROnPlateau)",
    "data": "labels CSV (path;label1;label2..., header required) or 'elpv' for the embedded ELPV cells",
    "group": "CSV column holding a group (e.g. cell type): stratifies the split, is not a label",
    "out": "run folder (default runs/<timestamp>)",
    "backbone": "resnet18, resnet34 or resnet50",
    "pretrained": "starting weights: 'imagenet' (torchvision's URL via torch.hub), a URL, a local "
                  "torchvision .pth file, an elcell checkpoint (its backbone; e.g. a model trained "
                  "on ELPV), or 'none' to train from scratch",
    "image_size": "cells are resized to this square size in pixels",
    "shrink": "how a cell larger than --image-size is shrunk: 'bilinear', or 'min' (a minimum filter as "
              "wide as the shrink factor first, so that cracks one pixel wide stay dark; cells less than "
              "twice the size are not filtered); stored in the model, so predict, evaluate, explain and "
              "export --int8 (its calibration cells) decode the same way",
    "bit_depth": "how many bits of a 16-bit image hold the camera's values: 16 (0..65535), or e.g. 12 "
                 "for a camera that stores 0..4095 in 16-bit files (read as 0..65535 they would keep 17 "
                 "grey levels); 8-bit images are read as they are; stored in the model, like --shrink",
    "pooling": "how the last feature map becomes one vector: 'avg' (torchvision's) or 'max' "
               "(a small defect is not averaged away)",
    "input_norm": "'dataset' (the train split's pixel mean/std, the seed's) or 'cell' (each cell also "
                  "standardised by its own mean/std inside the model: blind to a cell's overall gain and "
                  "offset, which also makes --brightness/--contrast jitter nearly a no-op)",
    "batch_size": "cells per training batch",
    "epochs": "maximum number of epochs",
    "optimizer": "'adam' (the seed's; weight decay as an L2 term), 'adamw' (decoupled weight decay) or "
                 "'sgd' (Nesterov momentum 0.9, cycled 0.85-0.95 by onecycle; weight decay as an L2 term; "
                 "needs a far larger --lr than Adam, e.g. 0.05)",
    "lr": "learning rate (the peak one with --schedule cosine or onecycle)",
    "backbone_lr_scale": "the backbone learns at --lr times this, the fresh head at --lr: below 1 keeps "
                         "pretrained features (--pretrained), 0 freezes the backbone's weights (its BatchNorm "
                         "statistics still follow the new cells)",
    "weight_decay": "weight decay of the optimiser",
    "ema_decay": "keep an exponential moving average of the weights and BatchNorm statistics, with this "
                 "decay per optimiser step (e.g. 0.995 averages over about 200 steps; 0 = off): validation, "
                 "checkpoints and the exported model use the average",
    "schedule": "learning-rate schedule: 'plateau' (ReduceLROnPlateau on val F1, the seed's), "
                "'cosine' (linear warm-up, cosine decay to 0 over --epochs) or 'onecycle'",
    "warmup_epochs": "linear warm-up epochs of --schedule cosine (at most half the run)",
    "lr_patience": "epochs without val F1 gain before ReduceLROnPlateau cuts the learning rate 10x",
    "patience": "epochs without val F1 gain before early stopping",
    "val_fraction": "share of cells held out for validation (stratified by label combination)",
    "test_fraction": "share of cells held out as a test set, scored once with the best checkpoint",
    "seed": "random seed for the split, initialisation and augmentation",
    "init_seed": "a different seed for initialisation and augmentation only, keeping --seed's split "
                 "(run-to-run spread of a recipe)",
    "limit": "use only this many cells (a stratified sample): quick trials",
    "flip_p": "probability of each horizontal and vertical flip",
    "brightness": "brightness jitter: factor drawn from [1-b, 1+b]",
    "contrast": "contrast jitter: factor drawn from [1-c, 1+c]",
    "rotate90": "rotate each training cell by a random multiple of 90 degrees",
    "affine_degrees": "small affine augmentation: rotation drawn from [-d, d] degrees",
    "affine_translate": "small affine augmentation: shift up to this fraction of the size",
    "affine_scale": "small affine augmentation: zoom factor drawn from [1-s, 1+s]",
    "synthetic_cracks": "probability that a clean training cell gets drawn cracks and is labelled "
                        "defective (its 'crack' label, or its only label); on ELPV it helps as the first "
                        "stage of a two-stage run (--finetune-epochs), not in the final model",
    "synthetic_crack_shape": "'line' (one thin curve from edge to edge), 'realistic' (one to three jagged, "
                             "mostly diagonal cracks; in 40 %% of the cracked cells the smaller part one cuts "
                             "off is darkened and the 'inactive' label, if any, set), 'realistic+branches' "
                             "(as realistic, with half the cells drawn on getting a crack network instead: "
                             "branches off a crack in V, Y and tree shapes), or 'realistic+fingers' "
                             "(as realistic, with a third of the cells drawn on getting short dark streaks along "
                             "their fingers instead, for a single defect label, not 'crack')",
    "finetune_epochs": "two stages: train as configured into RUN/pretext, then fine-tune that backbone, "
                       "with a fresh head, on the real labels alone (no drawn cracks) for this many epochs "
                       "into RUN, with the same other options and a warm-up of at most 1 epoch; --epochs and "
                       "--lr are the first stage's (0: one stage)",
    "finetune_lr": "peak learning rate of the fine-tuning stage (--finetune-epochs)",
    "loss_weighting": "'balanced' (BCE pos_weight = negatives/positives per label, the seed's) or 'none'",
    "tta": "score the final val/test evaluation with test-time augmentation (as predict --tta)",
    "precision": "'auto' (bf16 autocast + channels-last on GPUs and CPUs with native bf16, "
                 "else 32-true) or a Lightning precision such as 32-true, bf16-mixed, 16-mixed",
    "accelerator": "auto, cpu or gpu",
    "devices": "'auto', a number of devices (N > 1 runs N CPU processes with no GPU or with "
               "--accelerator cpu), or a list of GPU indices",
    "num_nodes": "number of machines (multi-node DDP under torchrun or SLURM)",
    "workers": "data loader processes (default: 4 with a GPU, 0 on CPU)",
    "cache_dir": "where decoded images are cached (default $ELCELL_CACHE or ~/.cache/elcell)",
    "resume": "continue training from this Lightning checkpoint (e.g. RUN/checkpoints/last.ckpt) "
              "with that run's options (RUN/config.yaml); options given here win (e.g. --epochs)",
    "progress": "show progress bars (--no-progress to hide them)",
}


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, but not an unset one ('None')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _add_train_parser(commands) -> None:
    from elcell.config import TrainConfig

    parser = commands.add_parser(
        "train", help="train a model and export it to ONNX",
        description="Train a ResNet multi-label classifier on labelled EL cells; write checkpoints, "
                    "logs, losses.png and best_model_epoch{N}.onnx to the run folder.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="read options from a YAML file (command-line options win); a run's "
                             "RUN/two-stage.yaml (two stages) or RUN/config.yaml repeats that run from the "
                             "start (give a new --out), even if the recipe has changed since")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit (for a two-stage run, "
                             "what the second stage changes follows as comments)")
    _add_config_options(parser, TrainConfig, TRAIN_HELP)
    parser.set_defaults(handler=_train)


def _add_config_options(parser: argparse.ArgumentParser, config_class: type, help_texts: dict) -> None:
    """One --option per field of a config dataclass, with its default and type."""
    from elcell.config import option_types

    defaults = config_class()
    for name, kind in option_types(config_class).items():
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_texts[name])
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_texts[name],
                                metavar=name.upper())


PRETRAIN_HELP = {
    **{name: TRAIN_HELP[name] for name in ("backbone", "image_size", "limit", "precision",
                                           "accelerator", "workers", "cache_dir", "progress")},
    "shrink": "how a cell larger than --image-size is shrunk: 'bilinear' or 'min' (see train --shrink; "
              "give the training that starts from this backbone the same value)",
    "bit_depth": "how many bits of a 16-bit image hold the camera's values (see train --bit-depth; give "
                 "the training that starts from this backbone the same value)",
    "data": "unlabelled cells: a folder of images (searched recursively), a CSV whose first column "
            "lists them, or 'elpv' (labels, if any, are not used)",
    "group": "with a labels CSV and --test-fraction: the group column that stratifies the split",
    "out": "run folder (default runs/pretrain-<timestamp>)",
    "batch_size": "cells per batch (each gives two views; every other view in the batch is a negative)",
    "epochs": "number of epochs",
    "lr": "peak learning rate of AdamW (linear warm-up, then cosine to 0)",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear warm-up epochs",
    "temperature": "temperature of the contrastive (NT-Xent) loss",
    "crop_scale": "each view is a random crop of at least this share of the cell, resized back",
    "brightness": "brightness jitter between the views: factor drawn from [1-b, 1+b]",
    "contrast": "contrast jitter between the views: factor drawn from [1-c, 1+c]",
    "val_fraction": "with --test-fraction: the --val-fraction of the `elcell train` run to come",
    "test_fraction": "leave out the cells that `elcell train` with the same --seed, --val-fraction and "
                     "--test-fraction holds out as its test set, so pretraining never sees them",
    "seed": "random seed for the split, initialisation and augmentation",
}


def _add_pretrain_parser(commands) -> None:
    from elcell.config import PretrainConfig

    parser = commands.add_parser(
        "pretrain", help="self-supervised pretraining on unlabelled cells (SimCLR)",
        description="Learn a backbone from unlabelled cells by contrasting two random views of each "
                    "(SimCLR); write RUN/backbone.pth, the starting point of "
                    "`elcell train --pretrained RUN/backbone.pth`.",
        formatter_class=_DefaultsHelpFormatter,
    )
    _add_config_options(parser, PretrainConfig, PRETRAIN_HELP)
    parser.set_defaults(handler=_pretrain)


def _pretrain(args, parser) -> None:
    from elcell.config import PretrainConfig
    from elcell.pretrain import main

    main(PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)}))


def _train(args, parser) -> None:
    from elcell.config import TrainConfig

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if args.print_config:
        print(config.to_yaml(), end="")
        if config.finetune_epochs > 0:  # as comments, so the output still works as --config
            print(_second_stage_comment(config), end="")
        return
    from elcell.train import main  # imports torch: only when really training

    main(config)


def _second_stage_comment(config) -> str:
    """How the second stage of a two-stage run differs from the options printed,
    as YAML behind comment marks."""
    import yaml

    from elcell.config import two_stage_configs

    run = config.out or "RUN"  # without --out, runs/<timestamp> when it starts
    given, second = asdict(config), asdict(two_stage_configs(config, Path(run))[1])
    changed = {name: value for name, value in second.items()
               if value != given[name] and name not in ("out", "finetune_epochs")}
    lines = yaml.safe_dump(changed, sort_keys=False).splitlines()
    return (f"# two stages: the first trains with the options above into {run}/pretext, "
            f"the second fine-tunes into {run} with these changed:\n" + "".join(f"#   {line}\n" for line in lines))


def _read_config(path: str, source: str) -> dict:
    import yaml

    from elcell.config import TrainConfig
    from elcell.errors import DataError

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{source}: cannot read ({err})") from None
    if not isinstance(values, dict):
        raise DataError(f"{source}: expected a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    TrainConfig.from_dict(values, source=source)  # rejects unknown keys
    return values


def _apply_train_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Defaults, weakest first: the recipe; with --resume the options of the run
    being continued (its config.yaml), so it goes on as it started; --config
    FILE.yaml, where a run's config.yaml stands for the whole run, as with
    --resume. Options on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    pre.add_argument("--resume", nargs="?")  # predict's --resume is a flag: this runs for every command
    known, _ = pre.parse_known_args(argv)
    if known.command != "train":
        return
    from elcell.config import (
        DEFAULT_RECIPE,
        checkpoint_run,
        complete_run_record,
        is_run_record,
        recipe_defaults,
    )

    values = {}
    if known.resume:
        run_config = checkpoint_run(known.resume) / "config.yaml"
        if run_config.is_file():
            values = {k: v for k, v in complete_run_record(_read_config(run_config, str(run_config))).items()
                      if k not in ("resume", "out")}
    if known.config:
        config = _read_config(known.config, f"--config {known.config}")
        if is_run_record(config):  # repeat that run from the start, not from where it resumed
            config = {k: v for k, v in complete_run_record(config).items() if k != "resume"}
        values.update(config)
    recipe = known.recipe or values.get("recipe") or DEFAULT_RECIPE
    defaults = {**recipe_defaults(recipe), **values, "recipe": recipe}
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    train_parser.set_defaults(**defaults)


def _export(args, parser) -> None:
    from elcell.errors import DataError

    if args.int8 and not args.calibration:
        raise DataError("--int8 needs --calibration LABELS.csv (real cells to calibrate on)")
    if args.int8_out and Path(args.int8_out).exists() and not args.overwrite:  # before any work
        raise DataError(f"{args.int8_out} exists: pass --overwrite to replace it, or choose another --int8-out")
    if args.checkpoint.lower().endswith(".onnx"):
        if not args.int8:
            raise DataError(f"{args.checkpoint} is already ONNX; pass --int8 --calibration to quantise "
                            "it, or give a .ckpt checkpoint to re-export")
        if args.out:
            raise DataError(f"--out is where a checkpoint is exported to; {args.checkpoint} is already "
                            "ONNX: name its int8 model with --int8-out")
        out = Path(args.checkpoint)
    else:
        from elcell.export import export_checkpoint  # imports torch

        out, error = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
        print(f"wrote {out} (batch of 4 checked against PyTorch: max |probs diff| {error:.2e})")
    if args.int8:
        from elcell.errors import ExportError
        from elcell.quantize import format_comparison, quantize_checked

        int8_out = Path(args.int8_out) if args.int8_out else out.with_name(f"{out.stem}.int8.onnx")
        if int8_out.exists() and not args.overwrite:
            raise DataError(f"{int8_out} exists: pass --overwrite to replace it, or choose another --int8-out")
        comparison = quantize_checked(
            out, int8_out, args.calibration, eval_data=args.eval_data, count=args.calibration_count,
            allow_recall_drop=args.allow_recall_drop, batch_size=args.batch_size,
            progress=args.progress, group=args.group)
        print(format_comparison(comparison))
        if comparison["refused"]:
            raise ExportError(comparison["refusal"])
        print(f"wrote {int8_out}")


def _add_runtime_options(parser: argparse.ArgumentParser, workers: bool = True,
                         threads: bool = True, progress: bool = True) -> None:
    """The ONNX Runtime options that predict, evaluate, explain and export share."""
    parser.add_argument("--batch-size", type=int, default=16,
                        help="cells per ONNX Runtime call (default: 16)")
    if workers:
        parser.add_argument("--workers", type=int, default=None,
                            help="image decoding threads (default: number of CPUs, at most 4; "
                                 "0 decodes in the main thread)")
    if threads:
        parser.add_argument("--threads", type=int, default=0,
                            help="ONNX Runtime intra-op threads (0: one per physical core)")
    if progress:
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                            help="show a progress bar on stderr (default: on)")


def _add_predict_parser(commands) -> None:
    parser = commands.add_parser(
        "predict", help="classify cell images with an ONNX model (no PyTorch needed)",
        description="Run an elcell ONNX model on cell images with ONNX Runtime and write one CSV row "
                    "per image: path, prob_<label>, decision_<label> (defect/review/ok), error. "
                    "Images are decoded in parallel and streamed in batches; rows are appended and "
                    "synced batch by batch, so an interrupted run loses nothing and --resume continues "
                    "it. Unreadable images are listed in the error column and on stderr; the run goes "
                    "on and exits with status 1 at the end if any failed.",
    )
    parser.add_argument("model", metavar="MODEL.onnx",
                        help="elcell ONNX model (from `elcell train`, `export` or `evaluate --tune-thresholds`)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or CSVs whose first column "
                             "holds image paths (relative to the CSV's folder), e.g. a labels CSV")
    parser.add_argument("--out", metavar="FILE.csv", help="output CSV (default: stdout)")
    parser.add_argument("--threshold", action="append", metavar="[LABEL=]P",
                        help="decision threshold overriding the model's: 0.3 for every label or "
                             "crack=0.3 for one (repeatable)")
    parser.add_argument("--review-threshold", action="append", metavar="[LABEL=]P",
                        help="lower edge of the review band (below it a cell is ok), as --threshold")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the four flips of each cell (4x the "
                             "work), or all eight symmetries for a model trained with --rotate90; "
                             "prob_<label>_no_tta columns keep the plain probabilities")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip images already in --out (images that "
                             "failed are tried again; a half-written last line is dropped)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--heatmaps", metavar="DIR",
                        help="write a heatmap overlay (<image>_<label>.png) for every cell and label "
                             "not judged ok")
    _add_runtime_options(parser)
    parser.set_defaults(handler=_predict)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items())


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def _predict(args, parser) -> int:
    from elcell.infer import collect_inputs, open_model, parse_thresholds, predict

    model = open_model(args.model, threads=args.threads)
    info = model.info
    thresholds = parse_thresholds(args.threshold, info.labels, info.thresholds)
    review = parse_thresholds(args.review_threshold, info.labels, info.review_thresholds,
                              option="--review-threshold")
    paths = collect_inputs(args.inputs)
    for label, high, low in zip(info.labels, thresholds, review, strict=True):
        if low > high:
            print(f"elcell: note: {label}: review threshold {low:g} is above the threshold {high:g}, "
                  "so there is no review band", file=sys.stderr)
    bands = ", ".join(f"{label} defect >= {t:.4g}, review >= {min(r, t):.4g}"
                      for label, t, r in zip(info.labels, thresholds, review, strict=True))
    print(f"elcell: {model.path.name} on {model.provider}; {len(paths)} images; {bands}", file=sys.stderr)
    try:
        result = predict(model, paths, args.out, batch_size=args.batch_size, workers=args.workers,
                         tta=args.tta, thresholds=thresholds, review_thresholds=review,
                         resume=args.resume, overwrite=args.overwrite, progress=args.progress,
                         heatmaps_dir=args.heatmaps)
    except BrokenPipeError:
        if args.out not in (None, "-"):
            raise
        # `elcell predict ... | head`: the reader has all it wants; stdout goes to
        # /dev/null so that Python's flush at exit does not fail a second time
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if args.heatmaps:
        print(f"elcell: {result.overlays} heatmap overlays in {args.heatmaps}", file=sys.stderr)
    if result.dropped_partial_line:
        print(f"elcell: {args.out}: dropped a partially written last line", file=sys.stderr)
    rate = result.predicted / result.seconds if result.seconds > 0 else 0.0
    # after --resume the counts are of this run's cells, not of the whole file
    skipped = f" ({result.skipped} were already in {args.out}); among the new ones," if result.skipped else ";"
    print(f"elcell: predicted {_cells(result.predicted)} in {result.seconds:.1f} s ({rate:.1f} cells/s)"
          f"{skipped} defect: {_counts(result.defect)}; review: {_counts(result.review)}; "
          f"{_cells(result.cells_in_review)} for a person to review", file=sys.stderr)
    if result.failed:
        print(f"elcell: {len(result.failed)} of {len(paths) - result.skipped} images failed "
              "(see the error column)", file=sys.stderr)
        return 1
    return 0


def _add_evaluate_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="score an ONNX model on labelled cells; tune its thresholds",
        description="Score an elcell ONNX model on labelled cells with ONNX Runtime: per-label "
                    "precision, recall, F1, ROC-AUC and average precision, the weighted and mean F1, "
                    "confusion matrices, PR/ROC curves (PNG), predictions.csv and metrics.json in "
                    "--out. With --tune-thresholds and/or --review-band the thresholds are tuned on "
                    "these cells and written into OUT/<model>.tuned.onnx, a copy of the model that "
                    "`elcell predict` then uses as is. Tune on validation cells, not on the test set. "
                    "Unreadable images are left out of the metrics and listed; the command then "
                    "exits with status 1.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="elcell ONNX model")
    parser.add_argument("--data", required=True, metavar="LABELS.csv",
                        help="labels CSV (path;label1;...; header required) or 'elpv' for the embedded "
                             "ELPV cells; a cell is positive where its label is >= 0.5")
    parser.add_argument("--out", metavar="DIR",
                        help="report folder (default: <model folder>/<model name>-eval)")
    parser.add_argument("--group", metavar="COLUMN",
                        help="also report per group of this CSV column (e.g. cell type; "
                             "--data elpv has 'type': mono/poly)")
    parser.add_argument("--tune-thresholds", metavar="f1|recall=R",
                        help="'f1': per label the threshold of maximum F1; 'recall=0.95': the highest "
                             "threshold that keeps recall >= 0.95 (its precision is reported)")
    parser.add_argument("--review-band", metavar="P|recall=R",
                        help="lower threshold below which a cell is ok; between it and the threshold "
                             "the cell is 'review' (for a person): a probability such as 0.2, or "
                             "recall=0.99 for the highest one that keeps recall (with review) >= 0.99")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation (mean of the 4 flips, or 8 symmetries with a --rotate90 "
                             "model); reported with and without")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT/report.html: one self-contained page with the metrics, "
                             "curves and, per label, the most confident true positives, false "
                             "positives and false negatives with their heatmap overlays")
    _add_runtime_options(parser)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args, parser) -> int:
    from elcell.evaluate import evaluate, format_report
    from elcell.infer import open_model

    model = open_model(args.model, threads=args.threads)
    out = Path(args.out) if args.out else model.path.parent / f"{model.path.stem}-eval"
    print(f"elcell: {model.path.name} on {model.provider}; data {args.data}", file=sys.stderr)
    metrics = evaluate(model, args.data, out, group=args.group, tta=args.tta,
                       tune_thresholds=args.tune_thresholds, review_band=args.review_band,
                       batch_size=args.batch_size, workers=args.workers, progress=args.progress,
                       html_report=args.report)
    print(format_report(metrics))
    print(f"wrote {out / 'metrics.json'}, predictions.csv and {len(metrics['plots'])} plots to {out}"
          + (f"; report: {out / 'report.html'}" if args.report else ""))
    if metrics["failed"]:  # as predict and explain: a script must not take partial metrics for whole ones
        print(f"elcell: {len(metrics['failed'])} of {metrics['images']} images could not be read "
              "(listed above) and are not in the metrics", file=sys.stderr)
        return 1
    return 0


def _add_explain_parser(commands) -> None:
    parser = commands.add_parser(
        "explain", help="show where the model looked: heatmap overlays and boxes (no PyTorch needed)",
        description="Run an elcell ONNX model on cell images with ONNX Runtime and write, for each "
                    "image and label, <image>_<label>.png (the cell in gray with the label's Grad-CAM "
                    "heatmap on top and its probability in the corner; colours are relative to each "
                    "map's peak) and <image>_<label>.npy (the raw heatmap), and per image "
                    "<image>.json with probabilities, decisions and a rough box per label (in the "
                    "image's pixels) around the hottest region. Unreadable images are skipped and "
                    "listed; the command then exits with status 1.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="elcell ONNX model")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or CSVs whose first column "
                             "holds image paths")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays, "
                                                                     ".npy heatmaps and .json boxes")
    parser.add_argument("--label", action="append", metavar="LABEL",
                        help="explain only this label (repeatable; default: every label)")
    parser.add_argument("--box-threshold", type=float, default=0.5, metavar="F",
                        help="a box surrounds the region where the heatmap is >= F x its peak")
    _add_runtime_options(parser, workers=False, progress=False)
    parser.set_defaults(handler=_explain)


def _explain(args, parser) -> int:
    from elcell.errors import DataError
    from elcell.explain import label_indices, write_explanations
    from elcell.infer import collect_inputs, open_model

    if not 0 < args.box_threshold <= 1:
        raise DataError(f"--box-threshold {args.box_threshold}: need a fraction in (0, 1]")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: need at least 1")
    model = open_model(args.model, threads=args.threads)
    labels = [model.info.labels[i] for i in label_indices(model.info.labels, args.label)]
    paths = collect_inputs(args.inputs)
    print(f"elcell: {model.path.name} on {model.provider}; {len(paths)} images; labels {labels}",
          file=sys.stderr)
    result = write_explanations(
        model, paths, args.out, labels, batch_size=args.batch_size, threshold=args.box_threshold,
        on_skip=lambda path, error: print(f"elcell: {error} (skipped)", file=sys.stderr))
    print(f"elcell: explained {len(result.records)} images x {len(labels)} labels in {args.out}",
          file=sys.stderr)
    if result.skipped:
        print(f"elcell: {len(result.skipped)} of {len(paths)} images could not be read (listed above)",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elcell",
        description="Find cracks and inactive regions in electroluminescence images of solar cells.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    _add_pretrain_parser(commands)

    export = commands.add_parser("export", help="re-export a checkpoint to ONNX",
                                 description="Export a training checkpoint to an elcell ONNX file, "
                                             "checked against PyTorch with ONNX Runtime.")
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="Lightning checkpoint (.ckpt) from `elcell train` (or, with --int8, a "
                             "float elcell .onnx file to quantise)")
    export.add_argument("--out", help="ONNX file or folder (a path ending in / is a folder, created if "
                                      "need be; default: best_model_epoch{N}.onnx beside the checkpoint)")
    export.add_argument("--int8", action="store_true",
                        help="also write a statically quantised int8 model (QDQ, per-channel weights, "
                             "ONNX Runtime), calibrated on real cells; its F1 and recall are printed "
                             "next to the float model's. CHECKPOINT may then be a float .onnx file "
                             "(no PyTorch needed)")
    export.add_argument("--calibration", metavar="LABELS.csv",
                        help="labelled cells for --int8 (CSV or 'elpv'): calibration and comparison")
    export.add_argument("--calibration-count", type=int, default=200,
                        help="cells drawn from --calibration to calibrate on")
    export.add_argument("--eval-data", metavar="LABELS.csv",
                        help="compare float and int8 on these cells (default: all --calibration cells)")
    export.add_argument("--group", metavar="COLUMN",
                        help="a column of those CSVs that is a group (e.g. cell type), not a label")
    export.add_argument("--int8-out", metavar="FILE.onnx",
                        help="int8 model path (default: <float model>.int8.onnx beside it)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (otherwise refused)")
    export.add_argument("--allow-recall-drop", action="store_true",
                        help="write the int8 model even if a label's recall drops by more than 0.02")
    _add_runtime_options(export, workers=False, threads=False)
    export.set_defaults(handler=_export)
    _add_predict_parser(commands)
    _add_evaluate_parser(commands)
    _add_explain_parser(commands)
    return parser


# what `pip install .` leaves out and training and exporting need (the [train] extra)
TRAINING_PACKAGES = {"torch", "lightning", "kornia", "torchmetrics", "tensorboard", "onnxscript"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from elcell.errors import ElcellError

    parser = build_parser()
    try:
        _apply_train_defaults(parser, argv)
        args = parser.parse_args(argv)
        status = args.handler(args, parser)
    except ElcellError as err:
        print(f"elcell: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elcell: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAINING_PACKAGES:
            raise
        print("elcell: error: this command trains or exports, which needs PyTorch (pip install -r "
              "requirements.txt); predict, evaluate, explain and export --int8 of an .onnx file do not",
              file=sys.stderr)
        return 2
    return int(status or 0)  # a handler returns 1 when a batch job finished with failures


if __name__ == "__main__":
    sys.exit(main())
