"""The LightningModule: augmentation on the device, weighted BCE (masked where a
label is unknown), optimiser and learning-rate schedule, metrics.

Batches arrive as uint8 [B, 1, H, W] and are turned into normalised floats
after the transfer to the device, so the host ships 4x fewer bytes and the
augmentation runs where the compute is.
"""

from __future__ import annotations

import math

import torch
import torchmetrics
from lightning import LightningModule
from torch import nn

from elcell.training.augment import BatchAugment, SyntheticCracks, normalise
from elcell.training.linepath import ModulePath
from elcell.training.nets.build import build_model


class LabelF1(torchmetrics.Metric):
    """Per-label precision/recall/F1/accuracy plus the seed's weighted F1 and the mean F1.

    Counts are summed states, so torchmetrics synchronises them across DDP ranks
    and the score covers the whole validation set. (torchmetrics' multilabel
    classes refuse a single label, which ELPV has.) Matches sklearn's
    f1_score(average=...) with zero_division=0. Unknown targets (NaN) are not
    counted: each label is scored on the cells whose label is known.
    """

    full_state_update = False

    def __init__(self, num_labels: int, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, default=torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        known = ~torch.isnan(targets)
        predicted = probs >= self.threshold
        actual = targets >= 0.5  # False where NaN: `known` keeps those out of fp and tn too
        self.tp += (predicted & actual & known).sum(0)
        self.fp += (predicted & ~actual & known).sum(0)
        self.fn += (~predicted & actual & known).sum(0)
        self.tn += (~predicted & ~actual & known).sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn, tn = self.tp.double(), self.fp.double(), self.fn.double(), self.tn.double()
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
        support = tp + fn
        weighted = (f1 * support).sum() / support.sum() if support.sum() > 0 else support.sum() * 0
        accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1)
        # as metrics.summary: a label with no known cell is left out of the mean, not scored 0
        scored = tp + fp + fn + tn > 0
        mean = f1[scored].mean() if scored.any() else f1.sum() * 0
        return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy,
                "weighted_f1": weighted, "mean_f1": mean}


class ELCellModule(LightningModule):
    def __init__(
        self,
        backbone: str,
        label_names: list[str],
        mean: float,
        std: float,
        pos_weight: list[float],
        lr: float = 1e-4,
        backbone_lr_scale: float = 1.0,
        weight_decay: float = 0.0,
        lr_patience: int = 3,
        lr_factor: float = 0.1,
        flip_p: float = 0.4,
        brightness: float = 0.2,
        contrast: float = 0.2,
        channels_last: bool = False,
        image_size: int = 300,
        shrink: str = "bilinear",  # for the record: how the cells were decoded (export.info_from_hparams)
        bit_depth: int = 16,
        optimizer: str = "adam",
        schedule: str = "plateau",
        warmup_epochs: int = 0,
        rotate90: bool = False,
        affine_degrees: float = 0.0,
        affine_translate: float = 0.0,
        affine_scale: float = 0.0,
        pooling: str = "avg",
        input_norm: str = "dataset",
        synthetic_cracks: float = 0.0,
        synthetic_crack_shape: str = "line",
        crack_label: int = 0,
        inactive_label: int | None = None,
        module_path: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(backbone, len(label_names), pooling=pooling, input_norm=input_norm)
        self.augment = BatchAugment(flip_p=flip_p, brightness=brightness, contrast=contrast,
                                    rotate90=rotate90, affine_degrees=affine_degrees,
                                    affine_translate=affine_translate, affine_scale=affine_scale)
        self.synthetic_cracks = (SyntheticCracks(synthetic_cracks, crack_label, synthetic_crack_shape, inactive_label)
                                 if synthetic_cracks > 0 else None)
        # per entry, so `loss` can leave out unknown labels before averaging
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32),
                                              reduction="none")
        self.val_scores = LabelF1(len(label_names))
        self.module_path = ModulePath(module_path) if module_path > 0 else None
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if backbone_lr_scale == 0:  # frozen: no gradients, so no backward pass through the backbone
            self._backbone_and_head()[0].requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, targets = batch
        images = images.float().div_(255.0)
        if self.trainer is not None and self.trainer.training:
            if self.synthetic_cracks is not None:  # first, so flips and jitter apply to the crack too
                images, targets = self.synthetic_cracks(images, targets)
            images = self.augment(images)
            if self.module_path is not None:  # after the jitter: light falls off on what the camera saw
                images = self.module_path(images)
        images = normalise(images, self.hparams.mean, self.hparams.std)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted BCE averaged over the known entries: an unknown (NaN) target
        adds nothing to the loss and gives its logit no gradient. With every
        label known it is BCEWithLogitsLoss's mean."""
        known = ~torch.isnan(targets)
        # NaN -> 0 before the loss: a NaN there would poison the backward pass even if masked
        per_entry = self.criterion(logits, torch.where(known, targets, torch.zeros_like(targets)))
        return torch.where(known, per_entry, torch.zeros_like(per_entry)).sum() / known.sum().clamp(min=1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = self.loss(self(images), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch, stage: str, scores: LabelF1) -> None:
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        scores.update(torch.sigmoid(logits.float()), targets)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(images), sync_dist=True)

    def _log_scores(self, stage: str, scores: LabelF1) -> None:
        result = scores.compute()  # torchmetrics squeezes one-label results to 0-d
        per_label = {m: result[m].reshape(-1) for m in ("precision", "recall", "f1", "accuracy")}
        self.log(f"{stage}_f1", result["weighted_f1"].float(), prog_bar=True)
        self.log(f"{stage}_mean_f1", result["mean_f1"].float())
        for i, name in enumerate(self.hparams.label_names):
            for metric in ("precision", "recall", "f1", "accuracy"):
                self.log(f"{stage}_{metric}_{name}", per_label[metric][i].float())
        scores.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_scores)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_scores)

    def configure_optimizers(self):
        hp = self.hparams
        # AdamW decouples weight decay from the gradient scale; Adam's weight_decay
        # is an L2 term (the seed's optimiser, kept as it was), and so is SGD's.
        optimizer_class, settings = _OPTIMIZERS[hp.optimizer]
        optimizer = optimizer_class(self._param_groups(), lr=hp.lr, weight_decay=hp.weight_decay, **settings)
        if hp.schedule == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=hp.lr_factor, patience=hp.lr_patience)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "monitor": "val_f1", "interval": "epoch"}}
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=self.trainer.estimated_stepping_batches)
        else:
            scheduler = cosine_schedule(optimizer, self.trainer, hp.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[dict]:
        """One group at --lr, or the backbone at lr * backbone_lr_scale and the
        head at lr, so a fresh head can learn fast on top of pretrained features
        without wrecking them. The schedules scale every group alike."""
        if self.hparams.backbone_lr_scale == 1.0:  # one group: the logged lr keeps its name
            return [{"params": list(self.parameters())}]
        backbone, head = self._backbone_and_head()
        # the names label the groups' learning rates in metrics.csv (lr-AdamW/backbone)
        return [{"params": list(backbone.parameters()), "name": "backbone",
                 "lr": self.hparams.lr * self.hparams.backbone_lr_scale},
                {"params": list(head.parameters()), "name": "head"}]

    def _backbone_and_head(self) -> tuple[nn.Module, nn.Module]:
        """Everything before the seed head (stem, stages, pooling) and the head."""
        return nn.ModuleList(m for name, m in self.model.named_children() if name != "fc"), self.model.fc


# each --optimizer's class and its settings beyond lr and weight decay (config.OPTIMIZERS)
_OPTIMIZERS = {"adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {}),
               "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True})}


def cosine_schedule(optimizer: torch.optim.Optimizer, trainer, warmup_epochs: int):
    """Per-step schedule: linear warm-up over `warmup_epochs`, then cosine decay to
    zero at the trainer's last step. The warm-up is at most half the run, so a
    short trial (--epochs 1) still decays."""
    total = trainer.estimated_stepping_batches
    warmup = min(warmup_epochs * total // max(trainer.max_epochs, 1), total // 2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: 0 -> 1 linearly over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))
