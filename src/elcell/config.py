"""Options of `elcell train`. Torch-free, so the CLI can build its parser and
--print-config without importing the training stack."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from elcell.errors import DataError

# Named starting points. Precedence: TrainConfig defaults < recipe < --config file
# < command line. `seed` is the original specification exactly (its values are
# the dataclass defaults). `full` is the best from-scratch recipe measured in
# docs/accuracy.md (E48, after E33 and E35): the one-stage recipe E03 (AdamW, cosine,
# 90-degree rotations) with realistic drawn cracks on half the clean cells, then 40
# epochs of fine-tuning on the real labels alone, on cells shrunk through a minimum
# filter. `quick` is E03 cut to 20 epochs, one stage, for a laptop CPU. `full` is
# what `elcell train` uses unless told otherwise.
_FROM_SCRATCH = {
    "backbone": "resnet18", "pretrained": "none", "image_size": 128, "batch_size": 32,
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 2,
    "rotate90": True, "flip_p": 0.4, "brightness": 0.2, "contrast": 0.2, "loss_weighting": "balanced",
}
RECIPES: dict[str, dict] = {
    "seed": {},
    "full": {**_FROM_SCRATCH, "epochs": 40, "patience": 40, "synthetic_cracks": 0.5,
             "synthetic_crack_shape": "realistic", "finetune_epochs": 40, "finetune_lr": 3e-4, "shrink": "min"},
    "quick": {**_FROM_SCRATCH, "epochs": 20, "patience": 20},
}
DEFAULT_RECIPE = "full"


@dataclass
class TrainConfig:
    """Every option of `elcell train`; the CLI and --config YAML files map onto it."""

    recipe: str = "seed"
    data: str = "elpv"
    group: str | None = None
    out: str | None = None
    backbone: str = "resnet50"
    pooling: str = "avg"
    input_norm: str = "dataset"
    pretrained: str = "imagenet"
    image_size: int = 300
    shrink: str = "bilinear"
    bit_depth: int = 16
    batch_size: int = 32
    epochs: int = 100
    optimizer: str = "adam"
    lr: float = 1e-4
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.0
    schedule: str = "plateau"
    warmup_epochs: int = 0
    lr_patience: int = 3
    patience: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    init_seed: int | None = None
    limit: int | None = None
    flip_p: float = 0.4
    brightness: float = 0.2
    contrast: float = 0.2
    rotate90: bool = False
    affine_degrees: float = 0.0
    affine_translate: float = 0.0
    affine_scale: float = 0.0
    loss_weighting: str = "balanced"
    synthetic_cracks: float = 0.0
    synthetic_crack_shape: str = "line"
    finetune_epochs: int = 0
    finetune_lr: float = 3e-4
    tta: bool = False
    precision: str = "auto"
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    workers: int | None = None
    cache_dir: str | None = None
    resume: str | None = None
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"{source}: unknown option(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_recipe(cls, recipe: str = "seed", **overrides) -> TrainConfig:
        return cls.from_dict({**recipe_defaults(recipe), **overrides, "recipe": recipe})

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


PRETEXT_STAGE = "pretext"  # the first stage's run folder inside a two-stage run


def two_stage_configs(config: TrainConfig, run: Path) -> tuple[TrainConfig, TrainConfig]:
    """Drawn cracks as a pretext task (docs/accuracy.md, E33 then E35).

    The first stage trains as configured, drawn cracks included, into
    RUN/pretext. The second starts from its backbone with a fresh head and
    fine-tunes on the real labels alone, for --finetune-epochs at peak rate
    --finetune-lr after a warm-up of at most one epoch, into RUN: that model is
    exported and scored. All other options (split, augmentation, optimiser,
    schedule, patience) are shared, so both stages hold out the same cells.
    """
    pretext = run / PRETEXT_STAGE
    first = replace(config, out=str(pretext), finetune_epochs=0)
    second = replace(config, out=str(run), finetune_epochs=0, synthetic_cracks=0.0,
                     pretrained=str(pretext / "checkpoints" / "last.ckpt"), epochs=config.finetune_epochs,
                     lr=config.finetune_lr, warmup_epochs=min(config.warmup_epochs, 1),
                     patience=min(config.patience, config.finetune_epochs))
    return first, second


@dataclass
class PretrainConfig:
    """Every option of `elcell pretrain` (self-supervised, no labels needed)."""

    data: str = "elpv"
    group: str | None = None
    out: str | None = None
    backbone: str = "resnet18"
    image_size: int = 128
    shrink: str = "bilinear"
    bit_depth: int = 16
    batch_size: int = 128
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.2
    crop_scale: float = 0.35
    brightness: float = 0.4
    contrast: float = 0.4
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    limit: int | None = None
    precision: str = "auto"
    accelerator: str = "auto"
    workers: int | None = None
    cache_dir: str | None = None
    progress: bool = True

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def option_types(config_class: type = TrainConfig) -> dict[str, type]:
    """Each option's plain type (int for `int | None`), for building the CLI parser."""
    hints = typing.get_type_hints(config_class)
    plain = {}
    for f in fields(config_class):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        plain[f.name] = args[0] if args else hints[f.name]
    return plain


# The options of elcell's first release. Every run's config.yaml sets them all (it
# sets every option of its time); a hand-written --config file hardly ever does.
_FIRST_RELEASE_OPTIONS = frozenset((
    "data", "group", "out", "backbone", "pretrained", "image_size", "batch_size", "epochs", "lr",
    "weight_decay", "lr_patience", "patience", "val_fraction", "test_fraction", "seed", "limit", "flip_p",
    "brightness", "contrast", "precision", "accelerator", "devices", "num_nodes", "workers", "cache_dir",
    "resume", "progress"))


def checkpoint_run(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint was written in: RUN/checkpoints/last.ckpt -> RUN."""
    return Path(checkpoint).resolve().parent.parent


def is_run_record(values: dict) -> bool:
    """Whether option `values` read from a file are a run's config.yaml (or
    two-stage.yaml): they set every option of elcell's first release."""
    return _FIRST_RELEASE_OPTIONS <= values.keys()


def complete_run_record(values: dict) -> dict:
    """A run's recorded options, each option newer than the run at its plain
    default: what the run did without it (e.g. one stage, line cracks), not what
    today's recipe would add."""
    return {**asdict(TrainConfig()), **values}


def recipe_defaults(name: str) -> dict:
    if name not in RECIPES:
        raise DataError(f"--recipe {name!r}: choose from {sorted(RECIPES)}")
    return dict(RECIPES[name])
