"""`elcell train --from RUN`: fine-tune a trained network, backbone and head,
on a new line's cells, with the run's own training cells replayed.

A run records the cells it saw (RUN/split.csv) and its options (config.yaml,
the defaults here: fromrun, config.train_defaults). The new cells are split as
any training's; old train and val cells are drawn into train and val at
--replay's share, so early stopping, the best checkpoint and the thresholds
are chosen on both lines. The network starts as the run left it: every
weight is copied, and the head's last layer row by row for the labels the run
knew; a label new to it starts from a fresh row. A label the new cells lack is
unknown (NaN) on them, never a negative, so the masked loss learns it from the
replayed cells alone.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from elcell.cells.labels import load_table
from elcell.errors import DataError
from elcell.options import show_progress
from elcell.training.config import TrainConfig, checkpoint_run, train_defaults
from elcell.training.data import build_cache, check_labels, limit_table, stratified_split
from elcell.training.fromrun import find_checkpoint, replay_cells, run_folder, with_replay
from elcell.training.resume import resume_checkpoint

HEAD_OUT = "fc.4"  # the head's last layer: one row per label (nets.cellnet.seed_head)
MUST_MATCH = (("backbone", "resnet50"), ("pooling", "avg"), ("input_norm", "dataset"))


def adapt_config(source: str, **options) -> TrainConfig:
    """The options `elcell train --from SOURCE` starts with (the run's, the
    `adapt` recipe's), `options` winning: for scripts and tests."""
    return TrainConfig.from_dict({**train_defaults(options.pop("recipe", None), None, None, source),
                                  "from_run": source, **options})


def starting_checkpoint(config: TrainConfig) -> dict:
    """The checkpoint --from stands for, refused where this training cannot go on from it."""
    path = find_checkpoint(config.from_run)
    checkpoint = resume_checkpoint(str(path))  # names a file that is not a checkpoint
    trained = checkpoint["hyper_parameters"]
    for option, default in MUST_MATCH:
        if trained.get(option, default) != getattr(config, option):
            flag = "--" + option.replace("_", "-")
            raise DataError(f"--from {config.from_run}: the run trained a {flag} {trained.get(option, default)} "
                            f"network, and --from fine-tunes that network: leave {flag} out (asked for "
                            f"{getattr(config, option)})")
    if config.pretrained != "none":
        raise DataError(f"--from {config.from_run} starts from the run's weights: leave out --pretrained "
                        f"{config.pretrained}")
    for option, value in (("folds", 0), ("finetune_epochs", 0), ("teacher", None), ("synthetic_cracks", 0)):
        if getattr(config, option) not in (value, 0.0):
            raise DataError(f"--from fine-tunes one model on real labels: leave out "
                            f"--{option.replace('_', '-')}")
    checkpoint["path"] = path
    return checkpoint


def check_adapt_options(config: TrainConfig) -> None:
    if config.recipe == "adapt" and not config.from_run:
        raise DataError("--recipe adapt is the schedule of `elcell train --from RUN`: give --from")
    if config.from_run and config.resume and not _resumes_from(config.resume, config.from_run):
        raise DataError(f"--resume {config.resume} goes on with its own run's options, and --from "
                        f"{config.from_run} starts a new fine-tuning: give one of them")
    if config.from_run and not config.data:
        raise DataError(f"--from {config.from_run} needs --data LABELS.csv: the new cells to fine-tune on "
                        "(e.g. the station's reviewed/labels.csv)")


def _resumes_from(resume: str, source: str) -> bool:
    """Whether --from SOURCE may go with --resume: the resumed run is a fine-tuning,
    from that run (spelt as its folder or a checkpoint), or from one no longer
    there (moved: SOURCE is where it went, and names its cells for replay)."""
    record = checkpoint_run(resume) / "config.yaml"
    try:
        options = yaml.safe_load(record.read_text(encoding="utf-8")) if record.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # no readable record: not known to be a fine-tuning
        options = None
    started = options.get("from_run") if isinstance(options, dict) else None
    if not started:
        return False
    if not Path(started).exists():
        return True
    source_run = run_folder(find_checkpoint(source))  # a --from that names no run says so itself
    try:
        return run_folder(find_checkpoint(started)).resolve() == source_run.resolve()
    except DataError:  # the run it started from no longer holds a checkpoint: not that run
        return False


def prepare_adapted(config: TrainConfig):
    """prepare()'s counterpart under --from: the new cells split, the replayed
    ones added, the labels widened to the run's and the new ones."""
    checkpoint = starting_checkpoint(config)
    old_names = list(checkpoint["hyper_parameters"]["label_names"])
    new = load_table(config.data, group=config.group)
    _check_new_labels(new, old_names, config.from_run)
    if config.limit:
        new = limit_table(new, config.limit, config.seed)
    split = stratified_split(new, config.val_fraction, config.seed, config.test_fraction)
    old = replay_cells(run_folder(checkpoint["path"]), config.from_run) if config.replay > 0 else None
    table, split = with_replay(new, split, old, old_names, config.replay, config.seed)
    _check_adapted_labels(table, split, new.names)
    images = build_cache(table.paths, config.decoding, config.cache_dir, progress=show_progress(config.progress))
    return table, split, images


def _check_new_labels(new, old_names: list[str], source: str) -> None:
    """A column the run does not know becomes a new output, so say so; one that
    differs from a known label only in case is a typo, not a new defect."""
    added = [name for name in new.names if name not in old_names]
    for name in added:
        near = [old for old in old_names if old.casefold() == name.casefold()]
        if near:
            raise DataError(f"{new.source}: column {name!r} differs from {source}'s label {near[0]!r} only in "
                            "case; rename the column (a new column would become a new output)")
    if added:
        print(f"elcell: {new.source}: new label column(s) {added}: new outputs beside {source}'s {old_names}",
              file=sys.stderr)


def _check_adapted_labels(table, split: np.ndarray, new_names: list[str]) -> None:
    """Every label taught here needs positives and negatives among the train
    cells; a label of the run that no train cell knows (--replay 0 and the new
    cells lack it) keeps the run's head row as it was."""
    train = split == "train"
    taught = [j for j, name in enumerate(table.names) if table.known[train, j].any() or name in new_names]
    kept = [name for j, name in enumerate(table.names) if j not in taught]
    if kept:
        print(f"elcell: note: no training cell knows {kept}: those outputs keep the run's head rows, shifted "
              "only by the backbone's fine-tuning", file=sys.stderr)
    try:
        check_labels(replace(table, names=[table.names[j] for j in taught], targets=table.targets[:, taught]), split)
    except DataError as err:
        raise DataError(f"{err} (with --from: label more new cells, or replay more of the run's with a higher "
                        "--replay)") from None


def start_from_run(module, checkpoint: dict) -> None:
    """Load the run's network into `module`: every weight as it was, the head's
    last layer row by row for the labels the run knew (new labels keep their
    fresh rows), and the run's pixel mean/std, which its features were trained on."""
    trained = checkpoint["hyper_parameters"]
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    own = module.model.state_dict()
    wrong = sorted(k for k in own if k not in state or (own[k].shape != state[k].shape
                                                         and not k.startswith(HEAD_OUT)))
    if wrong:
        raise DataError(f"--from {checkpoint['path']}: the checkpoint does not fit a {trained.get('backbone')} "
                        f"network ({len(wrong)} weights differ, e.g. {wrong[0]})")
    names = list(module.hparams.label_names)
    for part in ("weight", "bias"):
        key = f"{HEAD_OUT}.{part}"
        rows = own[key].clone()  # new labels keep their fresh initialisation
        for j, name in enumerate(trained["label_names"]):
            rows[names.index(name)] = state[key][j]
        state[key] = rows
    with torch.no_grad():
        module.model.load_state_dict(state)
    module.hparams.mean, module.hparams.std = trained["mean"], trained["std"]

