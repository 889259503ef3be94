"""The `elcell` command. Thin: parse options, call the stage modules.

Heavy modules are imported inside each command, so `elcell predict` on an
inspection PC never imports PyTorch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

TRAIN_HELP = {
    "data": "labels CSV (path;label1;label2..., header required) or 'elpv' for the embedded ELPV cells",
    "group": "CSV column holding a group (e.g. cell type): stratifies the split, is not a label",
    "out": "run folder (default runs/<timestamp>)",
    "backbone": "resnet18, resnet34 or resnet50",
    "pretrained": "ImageNet weights: 'imagenet' (torchvision's URL via torch.hub), a URL, a local "
                  "torchvision .pth file, or 'none' to train from scratch",
    "image_size": "cells are resized to this square size in pixels",
    "batch_size": "cells per training batch",
    "epochs": "maximum number of epochs",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "lr_patience": "epochs without val F1 gain before ReduceLROnPlateau cuts the learning rate 10x",
    "patience": "epochs without val F1 gain before early stopping",
    "val_fraction": "share of cells held out for validation (stratified by label combination)",
    "test_fraction": "share of cells held out as a test set, scored once with the best checkpoint",
    "seed": "random seed for the split, initialisation and augmentation",
    "limit": "use only this many cells (a stratified sample): quick trials",
    "flip_p": "probability of each horizontal and vertical flip",
    "brightness": "brightness jitter: factor drawn from [1-b, 1+b]",
    "contrast": "contrast jitter: factor drawn from [1-c, 1+c]",
    "precision": "'auto' (bf16 autocast on GPUs that support it, else 32-true) or a Lightning "
                 "precision such as 32-true, bf16-mixed, 16-mixed",
    "accelerator": "auto, cpu or gpu",
    "devices": "'auto', a number of devices (with no GPU, N > 1 runs N CPU processes), or a list",
    "num_nodes": "number of machines (multi-node DDP under torchrun or SLURM)",
    "workers": "data loader processes (default: 4 with a GPU, 0 on CPU)",
    "cache_dir": "where decoded images are cached (default $ELCELL_CACHE or ~/.cache/elcell)",
    "resume": "continue training from this Lightning checkpoint (e.g. RUN/checkpoints/last.ckpt)",
    "progress": "show progress bars (--no-progress to hide them)",
}


def _add_train_parser(commands) -> None:
    from elcell.config import TrainConfig, option_types

    parser = commands.add_parser(
        "train", help="train a model and export it to ONNX",
        description="Train a ResNet multi-label classifier on labelled EL cells; write checkpoints, "
                    "logs, losses.png and best_model_epoch{N}.onnx to the run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="read options from a YAML file (command-line options win)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit")
    defaults = TrainConfig()
    for name, kind in option_types().items():
        flag, default = "--" + name.replace("_", "-"), getattr(defaults, name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=TRAIN_HELP[name])
        else:
            parser.add_argument(flag, type=kind, default=default, help=TRAIN_HELP[name],
                                metavar=name.upper())
    parser.set_defaults(handler=_train)


def _train(args, parser) -> None:
    from elcell.config import TrainConfig

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    from elcell.train import main  # imports torch: only when really training

    main(config)


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """--config FILE.yaml supplies defaults, so options on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.command != "train" or not known.config:
        return
    import yaml

    from elcell.config import TrainConfig
    from elcell.errors import DataError

    try:
        with open(known.config) as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"--config {known.config}: cannot read ({err})") from None
    if not isinstance(values, dict):
        raise DataError(f"--config {known.config}: expected a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    TrainConfig.from_dict(values, source=f"--config {known.config}")  # rejects unknown keys
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    train_parser.set_defaults(**values)


def _export(args, parser) -> None:
    from elcell.export import export_checkpoint

    out, error = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out} (max |probs diff| vs PyTorch: {error:.2e})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elcell",
        description="Find cracks and inactive regions in electroluminescence images of solar cells.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)

    export = commands.add_parser("export", help="re-export a checkpoint to ONNX",
                                 description="Export a training checkpoint to an elcell ONNX file, "
                                             "checked against PyTorch with ONNX Runtime.")
    export.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) from `elcell train`")
    export.add_argument("--out", help="ONNX file or folder (default: best_model_epoch{N}.onnx "
                                      "beside the checkpoint)")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from elcell.errors import ElcellError

    parser = build_parser()
    try:
        _apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        args.handler(args, parser)
    except ElcellError as err:
        print(f"elcell: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elcell: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
