"""`elcell pretrain`: self-supervised pretraining of the backbone on unlabelled cells.

Inspection lines record far more cells than anyone labels. SimCLR (Chen et
al., 2020) learns features from them alone: two random views of each cell
are pulled together and pushed away from the views of every other cell in the
batch. The backbone it writes (`backbone.pth`, torchvision names) is the
starting point of a labelled run: `elcell train --pretrained RUN/backbone.pth`.

The views differ by crop, the eight square symmetries and brightness/contrast,
never by blur or noise: whatever the views differ by, the features learn to
ignore, and a thin crack must not be ignored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import kornia.augmentation as K
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from elcell.cells.inputs import collect_inputs
from elcell.cells.labels import load_table
from elcell.errors import DataError
from elcell.io import atomic_path, atomic_write_json, atomic_write_text, check_out_folder
from elcell.options import show_progress, validate
from elcell.training.augment import BatchAugment, normalise
from elcell.training.data import (
    build_cache,
    cell_loader,
    limit_table,
    pixel_stats,
    stratified_split,
)
from elcell.training.hardware import gpu_available, machine, resolve_precision
from elcell.training.history import merge_session_logs
from elcell.training.lightning_module import cosine_schedule
from elcell.training.nets.resnet import ResNet
from elcell.training.pretrain_options import PretrainConfig

MIN_CELLS = 8


def nt_xent(embeddings: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's loss on 2B L2-normalised embeddings whose rows i and i+B are the
    two views of one cell; also the share of rows whose most similar other row is
    their partner (1.0 = every view finds its twin among 2B-1 candidates)."""
    n = len(embeddings) // 2
    similarity = embeddings @ embeddings.T / temperature
    self_pairs = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(embeddings.device)
    loss = F.cross_entropy(similarity, partner)
    accuracy = (similarity.argmax(dim=1) == partner).float().mean()
    return loss, accuracy


class SimCLRModule(L.LightningModule):
    def __init__(self, backbone: str, mean: float, std: float, image_size: int, lr: float = 1e-3,
                 weight_decay: float = 1e-4, warmup_epochs: int = 2, temperature: float = 0.2,
                 crop_scale: float = 0.35, brightness: float = 0.4, contrast: float = 0.4,
                 channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = ResNet(backbone, num_labels=1)
        self.encoder.fc = nn.Identity()  # the encoder returns the pooled features
        width = self.encoder.num_features
        # SimCLR's projection head: the loss acts on its output, the backbone keeps
        # the more general features below it.
        self.projector = nn.Sequential(nn.Linear(width, 512, bias=False), nn.BatchNorm1d(512),
                                       nn.ReLU(inplace=True), nn.Linear(512, 128))
        self.augment = nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=(crop_scale, 1.0)),
            BatchAugment(flip_p=0.5, brightness=brightness, contrast=contrast, rotate90=True),
        )
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> torch.Tensor:
        images = batch[0].float().div_(255.0)
        views = torch.cat([self.augment(images), self.augment(images)])  # each draws its own
        views = normalise(views, self.hparams.mean, self.hparams.std)
        if self.hparams.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return views

    def training_step(self, views: torch.Tensor, batch_idx: int) -> torch.Tensor:
        projected = self.projector(self.encoder(views))
        # the similarities in float32: bf16 rounds cosines near 1 to the same value
        with torch.autocast(device_type=views.device.type, enabled=False):
            loss, accuracy = nt_xent(F.normalize(projected.float(), dim=1), self.hparams.temperature)
        self.log("ssl_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(views))
        self.log("pair_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(views))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": cosine_schedule(optimizer, self.trainer, hp.warmup_epochs),
                                 "interval": "step"}}


def pretrain_cells(config: PretrainConfig) -> list[Path]:
    """The images to pretrain on: a folder's (recursively), a CSV's first column,
    or, with --test-fraction, the cells of a labels CSV / ELPV without the ones
    `elcell train` with the same --seed, --val-fraction and --test-fraction
    holds out as its test set. Labels are never used."""
    if config.data != "elpv" and not config.test_fraction:
        paths = collect_inputs([config.data])
        if config.limit and config.limit < len(paths):
            keep = np.random.default_rng(config.seed).choice(len(paths), config.limit, replace=False)
            paths = [paths[i] for i in sorted(keep)]
    else:
        if Path(config.data).is_dir():
            raise DataError(f"--test-fraction needs a labels CSV or 'elpv' to split; {config.data} is a folder")
        table = load_table(config.data, group=config.group)
        if config.limit:
            table = limit_table(table, config.limit, config.seed)
        keep = np.ones(len(table), dtype=bool)
        if config.test_fraction:
            keep = stratified_split(table, config.val_fraction, config.seed, config.test_fraction) != "test"
        paths = [path for path, kept in zip(table.paths, keep) if kept]
    if len(paths) < MIN_CELLS:
        raise DataError(f"{config.data}: {len(paths)} images to pretrain on; need at least {MIN_CELLS}")
    return paths


def pretrain(config: PretrainConfig) -> dict:
    """Pretrain, write RUN/backbone.pth and RUN/summary.json, return the summary."""
    validate(config)
    paths = pretrain_cells(config)
    run = Path(config.out) if config.out else Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")
    check_out_folder(run)
    if run.exists() and any(run.iterdir()):  # before decoding: a large folder takes minutes
        raise DataError(f"{run}: run folder exists and is not empty; choose another --out")
    progress = show_progress(config.progress)
    images = build_cache(paths, config.decoding, config.cache_dir, progress=progress)
    L.seed_everything(config.seed, workers=True, verbose=False)
    everything = np.arange(len(paths))
    mean, std = pixel_stats(images, everything)
    gpu = gpu_available(config)
    precision = resolve_precision(config)
    module = SimCLRModule(
        config.backbone, mean, std, config.image_size, lr=config.lr, weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs, temperature=config.temperature, crop_scale=config.crop_scale,
        brightness=config.brightness, contrast=config.contrast,
        channels_last=gpu or precision == "bf16-mixed",
    )
    batch_size = min(config.batch_size, len(paths))
    workers = config.workers if config.workers is not None else (4 if gpu else 0)
    loader = cell_loader(images, np.zeros((len(paths), 0)), everything, batch_size, shuffle=True,
                         workers=workers, pin_memory=gpu)

    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", config.to_yaml())
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=1, precision=precision,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", filename="last", monitor=None,
                                   enable_version_counter=False),
                   LearningRateMonitor(logging_interval="epoch")],
        logger=CSVLogger(run, name="logs", version="0"), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1,
    )
    started = time.time()
    trainer.fit(module, train_dataloaders=loader)
    merge_session_logs(run)
    with atomic_path(run / "backbone.pth") as tmp:
        torch.save(module.encoder.state_dict(), tmp)
    metrics = trainer.callback_metrics
    # the training that starts from this backbone should see cells decoded the same way
    decoding = f" --image-size {config.image_size} --shrink {config.shrink}" + (
        f" --bit-depth {config.bit_depth}" if config.bit_depth != 16 else "")
    summary = {
        "backbone": "backbone.pth",
        "use": f"elcell train --backbone {config.backbone} --pretrained {run / 'backbone.pth'}{decoding}",
        "cells": len(paths),
        "epochs_run": trainer.current_epoch,
        "final_ssl_loss": float(metrics["ssl_loss"]),
        "final_pair_accuracy": float(metrics["pair_accuracy"]),
        "train_seconds": round(time.time() - started, 1),
        "machine": machine(config),
    }
    atomic_write_json(run / "summary.json", summary)
    return {"run": str(run), **summary}


def main(config: PretrainConfig) -> int:
    summary = pretrain(config)
    print(json.dumps({k: summary[k] for k in ("run", "cells", "epochs_run", "final_ssl_loss",
                                              "final_pair_accuracy", "use")}, indent=2))
    return 0
