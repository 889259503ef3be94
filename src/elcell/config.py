"""Options of `elcell train`. Torch-free, so the CLI can build its parser and
--print-config without importing the training stack."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields

import yaml

from elcell.errors import DataError


@dataclass
class TrainConfig:
    """Every option of `elcell train`; the CLI and --config YAML files map onto it."""

    data: str = "elpv"
    group: str | None = None
    out: str | None = None
    backbone: str = "resnet50"
    pretrained: str = "imagenet"
    image_size: int = 300
    batch_size: int = 32
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_patience: int = 3
    patience: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    limit: int | None = None
    flip_p: float = 0.4
    brightness: float = 0.2
    contrast: float = 0.2
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

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def option_types() -> dict[str, type]:
    """Each option's plain type (int for `int | None`), for building the CLI parser."""
    hints = typing.get_type_hints(TrainConfig)
    plain = {}
    for f in fields(TrainConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        plain[f.name] = args[0] if args else hints[f.name]
    return plain
