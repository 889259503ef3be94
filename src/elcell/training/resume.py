"""What a run must keep to be resumed: the checkpoint named once, then checked
against the options before any data is decoded (a wrong --shrink would decode
the whole data set first)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from elcell.errors import DataError
from elcell.training.config import TrainConfig, checkpoint_run


def resume_checkpoint(path: str) -> dict:
    """The checkpoint to resume from, or DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"--resume {path}: checkpoint not found")
    try:
        # mmap: only the hyperparameters and keys are read here; Lightning loads the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a PNG, an ONNX file, a truncated download...
        raise DataError(f"--resume {path}: not a checkpoint of `elcell train` ({type(err).__name__}); "
                        "give RUN/checkpoints/last.ckpt") from None
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= checkpoint.keys():
        raise DataError(f"--resume {path}: not a checkpoint of `elcell train`; give RUN/checkpoints/last.ckpt")
    return checkpoint


def check_resumable(config: TrainConfig, checkpoint: dict) -> None:
    """Refuse to resume with settings the checkpoint cannot carry on with."""
    trained = checkpoint["hyper_parameters"]
    # The optimiser state holds one or two parameter groups and their rates; the
    # weights were trained on one input scaling, pooling and decoding. Older runs: defaults.
    for option, default in (("backbone_lr_scale", 1.0), ("input_norm", "dataset"), ("pooling", "avg"),
                            ("shrink", "bilinear"), ("bit_depth", 16)):
        if trained.get(option, default) != getattr(config, option):
            flag = "--" + option.replace("_", "-")
            raise DataError(f"--resume {config.resume}: the run trained with {flag} "
                            f"{trained.get(option, default)}; resume it with that value")
    # OneCycleLR keeps its number of steps in its state: more epochs or smaller
    # batches would step past its end
    saved = checkpoint_run(config.resume) / "config.yaml"
    if trained.get("schedule") == "onecycle" and saved.is_file():
        run_options = yaml.safe_load(saved.read_text()) or {}
        for option in ("epochs", "batch_size", "limit"):
            if option in run_options and run_options[option] != getattr(config, option):
                raise DataError(f"--resume {config.resume}: a --schedule onecycle run cannot change its "
                                f"number of steps (it was --{option.replace('_', '-')} {run_options[option]}); "
                                "train a new run instead")
    # With an average, the checkpoint's weights are the average and the trained
    # ones sit beside them: without it, training would go on from the average.
    averaged = "averaging_state" in checkpoint
    if averaged != (config.ema_decay > 0):
        raise DataError(f"--resume {config.resume}: the run trained "
                        f"{'with' if averaged else 'without'} --ema-decay; resume it "
                        f"{'with --ema-decay' if averaged else 'without it'}")


def best_score(checkpoint: ModelCheckpoint, resume: str | None) -> float | None:
    """The run's best validation F1: this session's record, else the resumed
    checkpoint's. Lightning restores that record only into the run's own folder,
    so a run resumed into a new --out that trains no further epoch has none."""
    if checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    if not resume:
        return None
    state = torch.load(resume, map_location="cpu", weights_only=True, mmap=True)
    saved = state.get("callbacks", {}).get(checkpoint.state_key, {}).get("best_model_score")
    return None if saved is None else float(saved)


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose record of the best checkpoints follows its run folder
    when the folder is copied or moved. Lightning keeps that record only while the
    folder's path is unchanged: after a move, the best score so far would be
    forgotten (an epoch worse than the old best would become "best") and the
    export would read the old folder's, or a missing, checkpoint."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints of either class resume into the other
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def format_checkpoint_name(self, metrics: dict, filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        # the epoch counted from 1, as the log, losses.png and the exported model count it
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    def load_state_dict(self, state_dict: dict) -> None:
        def here(path):  # the same file name in this folder
            return os.path.join(self.dirpath, os.path.basename(path)) if path else path

        before, best = state_dict.get("dirpath"), state_dict.get("best_model_path")
        # Only a folder that holds the best checkpoint is the run moved: a run resumed
        # into a new --out keeps Lightning's way, and its top-k never deletes the old run's files.
        if before and best and before != self.dirpath and os.path.isfile(here(best)):
            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{key: here(state_dict.get(key)) for key in
                             ("best_model_path", "kth_best_model_path", "last_model_path")},
                          "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)
