"""`elcell train`: assemble data, model and Lightning Trainer; write the run folder.

Everything that can be wrong with the input (labels, images, split, weights)
is checked before the run folder is created, so a bad input never leaves a
folder behind. A run that finishes writes summary.json last: a folder without
it did not succeed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from elcell.cells.labels import LabelTable, load_table
from elcell.errors import DataError
from elcell.infer.evaluate import evaluate
from elcell.infer.metrics import burden_note, headline
from elcell.infer.runtime import open_model
from elcell.io import atomic_write_json, atomic_write_text, check_out_folder
from elcell.options import show_progress, validate
from elcell.training import adapt
from elcell.training.augment import crack_label, label_index
from elcell.training.config import (
    PRETEXT_STAGE,
    TrainConfig,
    checkpoint_run,
    recipe_name,
    two_stage_configs,
)
from elcell.training.data import (
    CellDataModule,
    build_cache,
    check_labels,
    fold_split,
    limit_table,
    pixel_stats,
    pos_weights,
    stratified_split,
    write_split_csv,
)
from elcell.training.distill import taught
from elcell.training.export import export_checkpoint
from elcell.training.hardware import (
    check_devices,
    gpu_available,
    machine,
    note_busy_machine,
    resolve_precision,
)
from elcell.training.history import EpochLines, merge_session_logs, next_session, plot_losses
from elcell.training.lightning_module import ELCellModule
from elcell.training.nets.build import load_pretrained
from elcell.training.resume import RunCheckpoint, best_score, check_resumable, resume_checkpoint


def check_options(config: TrainConfig) -> None:
    """Every option within its declared bounds (elcell.options), and the
    combinations no single declaration can see."""
    recipe_name(config.recipe)
    validate(config)
    adapt.check_adapt_options(config)
    if config.fold is not None and config.folds < 2:
        raise DataError(f"--fold {config.fold} needs --folds K (the protocol the fold belongs to)")
    if config.folds and config.test_fraction > 0:
        raise DataError(f"--folds {config.folds} holds out each fold as a test set in turn: leave "
                        "--test-fraction at 0")
    if config.backbone_lr_scale == 0 and config.pretrained == "none":
        warnings.warn("--backbone-lr-scale 0 with --pretrained none: the backbone stays at its random "
                      "initialisation and only the head learns", stacklevel=3)


def prepare(config: TrainConfig):
    """Read, split and decode the data; all input errors surface here."""
    check_options(config)
    if config.from_run:  # the new cells and the run's replayed ones
        return adapt.prepare_adapted(config)
    table = load_table(config.data, group=config.group)
    # refuses a label set it cannot mark
    crack_label(table.names, config.synthetic_cracks, shape=config.synthetic_crack_shape)
    if config.limit:
        table = limit_table(table, config.limit, config.seed)
    if config.fold is not None:  # one model of a k-fold protocol: its fold is the test set
        split = fold_split(table, config.folds, config.fold, config.val_fraction, config.seed)
    else:
        split = stratified_split(table, config.val_fraction, config.seed, config.test_fraction)
    check_labels(table, split)
    images = build_cache(table.paths, config.decoding, config.cache_dir,
                         progress=show_progress(config.progress) and rank_zero_only.rank == 0)
    return table, split, images


RUN_DIR_ENV = "ELCELL_RUN_DIR"


def _run_folder(config: TrainConfig) -> Path:
    """The run folder, the same on every rank.

    Lightning's launcher re-runs this program for ranks 1..N-1 with rank 0's
    environment, so rank 0 publishes its choice in ELCELL_RUN_DIR. Under
    torchrun/SLURM the ranks start independently and must be told --out.
    """
    if config.out:
        return Path(config.out)
    if config.resume:  # continue in the run the checkpoint came from
        return checkpoint_run(config.resume)
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise DataError("multi-process launches (torchrun, srun) need --out so that all ranks share one run folder")
    run = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_DIR_ENV] = str(run.resolve())
    return run


TWO_STAGE_CONFIG = "two-stage.yaml"  # the options a two-stage run was started with


def train(config: TrainConfig, callbacks: list[L.Callback] | None = None) -> dict:
    """Train, export the best checkpoint to ONNX, and return the run summary
    (empty on ranks other than 0). With --finetune-epochs, in two stages
    (`two_stage_configs`). `callbacks` are added to the (final stage's) Trainer."""
    check_devices(config)
    config = with_absolute_paths(config)
    # a wrong file is named before anything else, a wrong option before decoding
    # (a wrong --shrink would decode the whole data set first)
    checkpoint = resume_checkpoint(config.resume) if config.resume else None
    if config.out:
        check_out_folder(config.out)
    if config.finetune_epochs > 0:
        return _train_two_stages(config, callbacks)
    if checkpoint is not None:
        check_resumable(config, checkpoint)
    return _train_stage(config, callbacks)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """The data, weights and cache paths made absolute, so the run's record
    (config.yaml) repeats or resumes it from any folder."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    teacher = ",".join(absolute(part.strip()) for part in config.teacher.split(",")) if config.teacher else None
    return replace(config, data=config.data if config.data == "elpv" else absolute(config.data),
                   pretrained=absolute(config.pretrained), cache_dir=absolute(config.cache_dir), teacher=teacher,
                   from_run=absolute(config.from_run))


def build_module(config: TrainConfig, table: LabelTable, split: np.ndarray, images: np.ndarray) -> ELCellModule:
    """The LightningModule for `config`, normalised by the train cells' pixel
    statistics, its loss weighted by their label counts, and starting from
    --pretrained weights unless the run resumes."""
    train_index = np.flatnonzero(split == "train")
    mean, std = pixel_stats(images, train_index)
    module = ELCellModule(
        backbone=config.backbone, label_names=table.names, mean=mean, std=std,
        pos_weight=pos_weights(table.targets[train_index], config.loss_weighting), lr=config.lr,
        backbone_lr_scale=config.backbone_lr_scale,
        weight_decay=config.weight_decay, lr_patience=config.lr_patience, flip_p=config.flip_p,
        brightness=config.brightness, contrast=config.contrast, optimizer=config.optimizer,
        schedule=config.schedule, warmup_epochs=config.warmup_epochs, rotate90=config.rotate90,
        affine_degrees=config.affine_degrees, affine_translate=config.affine_translate,
        affine_scale=config.affine_scale, module_path=config.module_path, pooling=config.pooling,
        input_norm=config.input_norm,
        synthetic_cracks=config.synthetic_cracks, synthetic_crack_shape=config.synthetic_crack_shape,
        crack_label=crack_label(table.names, config.synthetic_cracks, shape=config.synthetic_crack_shape),
        inactive_label=label_index(table.names, "inactive"),
        # channels-last pays on GPUs and with bf16 on CPUs (oneDNN's preferred layout)
        channels_last=gpu_available(config) or resolve_precision(config) == "bf16-mixed",
        image_size=config.image_size, shrink=config.shrink, bit_depth=config.bit_depth,
    )
    if config.from_run and not config.resume:
        adapt.start_from_run(module, adapt.starting_checkpoint(config))
    elif config.pretrained != "none" and not config.resume:
        load_pretrained(module.model, config.pretrained)
    return module


def _claim_run_folder(config: TrainConfig, may_hold: tuple[str, ...]) -> Path:
    run = _run_folder(config)
    if rank_zero_only.rank == 0 and not config.resume and run.exists() and \
            any(p.name not in may_hold for p in run.iterdir()):
        raise DataError(f"{run}: run folder exists and is not empty; choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    return run


def _train_stage(config: TrainConfig, callbacks: list[L.Callback] | None,
                 may_hold: tuple[str, ...] = ()) -> dict:
    """One run into its folder, which must be new or empty but for `may_hold`."""
    table, split, images = prepare(config)  # the split depends on config.seed alone
    note_busy_machine()
    L.seed_everything(config.seed if config.init_seed is None else config.init_seed, workers=True,
                      verbose=False)
    training_table = taught(config, table, split)
    module = build_module(config, training_table, split, images)
    run = _claim_run_folder(config, may_hold)
    gpu = gpu_available(config)
    trainer = _trainer(config, run, gpu, callbacks or [])
    if trainer.is_global_zero:
        atomic_write_text(run / "config.yaml", config.to_yaml())
        write_split_csv(run, table, split)
    workers = config.workers if config.workers is not None else (4 if gpu else 0)
    datamodule = CellDataModule(images, training_table, split, config.batch_size, workers, pin_memory=gpu)
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=config.resume)
    if not trainer.is_global_zero:
        return {}
    summary = _export_and_score(config, run, trainer, table, split, images)
    summary.update(train_seconds=round(time.time() - started, 1), machine=machine(config),
                   mean=module.hparams.mean, std=module.hparams.std)
    atomic_write_json(run / "summary.json", summary)
    return {"run": str(run), **summary}


def _export_and_score(config: TrainConfig, run: Path, trainer: L.Trainer, table: LabelTable,
                      split: np.ndarray, images: np.ndarray) -> dict:
    """Plot the run, export the checkpoint --keep names and score that ONNX model,
    as an inspection PC runs it, on the held-out cells: full reports in
    eval/val and eval/test, headline figures in the summary returned."""
    checkpoint = trainer.checkpoint_callback
    kept = checkpoint.best_model_path if config.keep == "best" else str(run / "checkpoints" / "last.ckpt")
    if config.resume and not Path(kept).is_file():  # the resumed run moved, and this run trained no better
        beside = checkpoint_run(config.resume) / "checkpoints" / Path(kept).name
        if not beside.is_file():
            raise DataError(f"--resume {config.resume}: its kept checkpoint {kept} is gone; export the one "
                            "you want with `elcell export CHECKPOINT`")
        kept = str(beside)
    best_f1 = best_score(checkpoint, config.resume)
    kept_f1 = best_f1 if config.keep == "best" else trainer.callback_metrics.get("val_f1")
    kept_epoch = int(torch.load(kept, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    plot_losses(merge_session_logs(run), run / "losses.png", kept_epoch)
    onnx_path, parity = export_checkpoint(kept, out=run, check_images=images[np.flatnonzero(split == "val")[:4]])
    if config.resume:  # the earlier best of the run resumed: one model per run, not an int8 copy
        for older in run.glob("best_model_epoch*.onnx"):
            if re.fullmatch(r"best_model_epoch\d+\.onnx", older.name) and older != onnx_path:
                older.unlink()
    summary = {
        "best_checkpoint": os.path.relpath(kept, run),  # the model's, --keep last's included
        "best_val_f1": float("nan") if best_f1 is None else float(best_f1),
        "kept": config.keep, "kept_val_f1": float("nan") if kept_f1 is None else float(kept_f1),
        "onnx": onnx_path.name, "onnx_max_abs_diff": parity,
        "epochs_run": trainer.current_epoch,
        "labels": table.names,
        "cells": {part: int((split == part).sum()) for part in ("train", "val", "test")},
    }
    for part in ("val", "test"):  # val first: it may set the thresholds test is scored at
        if (split == part).any():
            held_out = replace(table.subset(np.flatnonzero(split == part)), source=f"{table.source} ({part} split)")
            tuning = recall_first_tuning(config) if part == "val" else {}
            # thresholds are tuned on plain probabilities: predict, inspect and serve run without TTA
            metrics = evaluate(open_model(run / onnx_path.name), held_out, run / "eval" / part,
                               tta=config.tta and not tuning, progress=show_progress(config.progress), **tuning)
            if "tuning" in metrics:  # the model carries the thresholds chosen on its validation cells
                os.replace(metrics["tuning"]["model"], run / onnx_path.name)
                metrics["tuning"]["model"] = str(run / onnx_path.name)
                atomic_write_json(run / "eval" / part / "metrics.json", metrics)  # names the file that exists
                summary["thresholds"] = {label: {k: d[k] for k in ("threshold", "review_threshold")}
                                         for label, d in metrics["tuning"]["per_label"].items()}
            summary[part] = headline(metrics)
            retune = " ".join(f"--{option.replace('_', '-')} {value}" for option, value in tuning.items())
            for label, d in metrics.get("tuning", {}).get("per_label", {}).items():
                if "note" in d:  # a threshold not read off positives is worth a word where the user looks
                    print(f"elcell: note: {run.name}: {label} thresholds: {d['note']} on the {d['cells']} "
                          "validation cells; set them on cells that hold this label's defects with "
                          f"`elcell evaluate {run} --data CELLS.csv {retune}`", file=sys.stderr)
            note = burden_note(metrics["review_burden"], config.review_recall or config.threshold_recall,
                               "validation cells") if "tuning" in metrics else None
            if note:
                print(f"elcell: note: {run.name}: {note}", file=sys.stderr)
    return summary


def recall_first_tuning(config: TrainConfig) -> dict:
    """evaluate's tuning options for --threshold-recall and --review-recall: a
    missed crack costs a line more than a second look, so thresholds are set for
    recall on the validation cells rather than left at 0.5."""
    tuning = {}
    if config.threshold_recall > 0:
        tuning["tune_thresholds"] = f"recall={config.threshold_recall:g}"
    if config.review_recall > 0:
        tuning["review_band"] = f"recall={config.review_recall:g}"
    if tuning:
        tuning["recall_estimator"] = config.threshold_estimator
    return tuning


def _train_two_stages(config: TrainConfig, callbacks: list[L.Callback] | None) -> dict:
    """Both stages of `two_stage_configs`. The same command again, after the
    second stage failed, keeps the finished first stage and runs the second."""
    if config.resume:
        raise DataError("--resume continues one stage: resume RUN/pretext/checkpoints/last.ckpt or "
                        "RUN/checkpoints/last.ckpt with --finetune-epochs 0")
    if not config.finetune_lr > 0:
        raise DataError(f"--finetune-lr {config.finetune_lr} must be above 0")
    run = _run_folder(config)
    first_config, second_config = two_stage_configs(config, run)
    pretext = run / PRETEXT_STAGE
    started = run / TWO_STAGE_CONFIG
    reuse = (pretext / "summary.json").is_file() and started.is_file() and started.read_text() == config.to_yaml()
    if rank_zero_only.rank == 0 and not reuse and run.exists() and any(run.iterdir()):
        hint = (f"; its first stage did not finish: resume it with --resume {pretext}/checkpoints/last.ckpt, "
                "then run this command again") if started.is_file() and pretext.is_dir() else ""
        raise DataError(f"{run}: run folder exists and is not empty; choose another --out{hint}")
    if reuse:
        first = json.loads((pretext / "summary.json").read_text())
    else:
        prepare(config)  # bad input stops the run before its folder exists
        if rank_zero_only.rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(started, config.to_yaml())
        first = _train_stage(first_config, None)
    second = _train_stage(second_config, callbacks, may_hold=(PRETEXT_STAGE, TWO_STAGE_CONFIG))
    if not second:  # ranks other than 0
        return {}
    second["pretext"] = {"run": PRETEXT_STAGE, "best_val_f1": first["best_val_f1"],
                         "train_seconds": first["train_seconds"]}
    atomic_write_json(run / "summary.json", {k: v for k, v in second.items() if k != "run"})
    return second


def _trainer(config: TrainConfig, run: Path, gpu: bool, extra_callbacks: list) -> L.Trainer:
    best = RunCheckpoint(
        dirpath=run / "checkpoints", filename="best-epoch{epoch}-f1{val_f1:.4f}",
        monitor="val_f1", mode="max", auto_insert_metric_name=False,
    )
    # last.ckpt after every epoch, whatever the score (the monitored one above only
    # saves on improvement, and Lightning's save_last follows it); written once the
    # epoch is complete, so --resume starts the next epoch instead of repeating it.
    last = RunCheckpoint(dirpath=run / "checkpoints", filename="last", monitor=None, save_top_k=1,
                         save_on_train_epoch_end=True, enable_version_counter=False)
    # --keep last keeps the schedule's end: no early stop before it
    stopping = [EarlyStopping(monitor="val_f1", mode="max", patience=config.patience)] if config.keep == "best" else []
    if config.ema_decay > 0:
        # Validation runs on the average and checkpoints hold it as their weights,
        # so the best checkpoint, its ONNX export and --pretrained use the average.
        # On a GPU the average must live there too: Lightning builds it before the
        # model moves, and would otherwise average on the CPU after every step.
        extra_callbacks = [EMAWeightAveraging(decay=config.ema_decay, device="cuda" if gpu else None),
                           *extra_callbacks]
    if gpu:
        torch.backends.cudnn.benchmark = True
    devices = config.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    accelerator = config.accelerator
    strategy = "auto"
    if not gpu and isinstance(devices, int) and devices > 1:
        # Several CPU processes: DDP over gloo (tests, CPU clusters).
        accelerator, strategy = "cpu", "ddp"
    return L.Trainer(
        max_epochs=config.epochs,
        accelerator=accelerator,
        devices=devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        precision=resolve_precision(config),
        callbacks=[best, last, *stopping, LearningRateMonitor(logging_interval="epoch"),
                   *([] if show_progress(config.progress) else [EpochLines()]), *extra_callbacks],
        logger=[CSVLogger(run, name="logs", version=str(next_session(run))),
                TensorBoardLogger(run, name="", version="tensorboard")],
        enable_progress_bar=show_progress(config.progress),
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=False,
    )


def main(config: TrainConfig) -> int:
    summary = train(config)
    if summary:
        shown = {k: summary[k] for k in ("run", "best_val_f1", "kept", "kept_val_f1", "onnx", "onnx_max_abs_diff")}
        if "thresholds" in summary:  # recall-first, chosen on the validation cells
            shown["thresholds"] = summary["thresholds"]
        for part in ("val", "test"):  # the exported model on held-out cells: accuracy and F1 per label
            if part in summary:
                shown[part] = {label: {k: None if summary[part][label][k] is None else round(summary[part][label][k], 4)
                                       for k in ("accuracy", "f1", "recall_with_review")}
                               for label in summary["labels"]}
                shown[f"{part}_review_burden"] = round(summary[part]["review_burden"], 4)
        print(json.dumps(shown, indent=2))
    return 0
