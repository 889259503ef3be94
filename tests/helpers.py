"""Small helpers several test files share (fixtures are in conftest.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A `;` CSV elcell wrote: its header and its rows as dicts."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    return rows[0], [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def seed_rows(seed_csv: Path) -> list[tuple[Path, list[int]]]:
    """The image paths and 0/1 labels of the conftest's seed-format CSV."""
    rows = []
    for line in seed_csv.read_text().splitlines()[1:]:
        path, *labels = line.split(";")
        rows.append((seed_csv.parent / path, [int(v) for v in labels]))
    return rows


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Random BN parameters and statistics. A fresh ResNet zeroes each block's last
    BN gamma, so its blocks would only pass their input through; random ones make
    a test of the layers real."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.2
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
