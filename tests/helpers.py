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


def write_partly_unknown_csv(folder: Path, seed_csv: Path, inactive_column: bool = False) -> Path:
    """The seed cells (absolute paths) with labels left empty (unknown): by
    default `crack` on every third cell and `inactive` on the others (no row is
    all empty, which read_labels_csv refuses); with inactive_column, `inactive`
    on every cell and `crack` on none."""
    lines = ["path;crack;inactive"]
    for i, (path, (crack, inactive)) in enumerate(seed_rows(seed_csv)):
        crack_blank = i % 3 == 0 and not inactive_column
        inactive_blank = inactive_column or not crack_blank
        lines.append(f"{path};{'' if crack_blank else crack};{'' if inactive_blank else inactive}")
    csv_path = folder / ("inactive_unknown.csv" if inactive_column else "partly_unknown.csv")
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path
