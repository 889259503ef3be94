"""Every option of `elcell pretrain` (self-supervised SimCLR on unlabelled cells),
declared as `elcell train`'s are (elcell.training.config). Torch-free, so the CLI
builds its parser without importing the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import yaml

from elcell.cells.images import BIT_DEPTHS, SHRINKS, Decoding
from elcell.options import NON_NEGATIVE, OPEN_FRACTION, POSITIVE, above, at_least, option, within
from elcell.training.weights import RESNETS


@dataclass
class PretrainConfig:
    """Every option of `elcell pretrain` (self-supervised SimCLR, no labels needed)."""

    data: str = option("elpv", "unlabelled cells: a folder of images (searched recursively), a CSV whose "
                       "first column lists them, or 'elpv' (labels, if any, are not used)", "data",
                       metavar="CELLS")
    group: str | None = option(None, "with a labels CSV and --test-fraction: the group column that "
                               "stratifies the split", "data", metavar="COLUMN")
    out: str | None = option(None, "run folder (default runs/pretrain-<timestamp>)", "data", metavar="DIR")
    limit: int | None = option(None, "use only this many cells: quick trials", "data", check=POSITIVE)
    val_fraction: float = option(0.1, "with --test-fraction: the --val-fraction of the `elcell train` run "
                                 "to come", "data", check=OPEN_FRACTION)
    test_fraction: float = option(0.0, "leave out the cells that `elcell train` with the same --seed, "
                                  "--val-fraction and --test-fraction holds out as its test set", "data",
                                  check=within(0, 1, "in [0, 1)", high_open=True))
    seed: int = option(0, "random seed for the split, initialisation and augmentation", "data")
    cache_dir: str | None = option(None, "where decoded images are cached", "data", metavar="DIR")
    image_size: int = option(128, "cells are resized to this square size in pixels", "decoding",
                             check=at_least(32, "32 or more"), metavar="PX")
    shrink: str = option("bilinear", "how a cell larger than --image-size is shrunk (see train --shrink; "
                         "give the training that starts from this backbone the same value)", "decoding",
                         choices=SHRINKS)
    bit_depth: int = option(16, "how many bits of a 16-bit image hold the camera's values (see train "
                            "--bit-depth)", "decoding", choices=BIT_DEPTHS, metavar="BITS")
    backbone: str = option("resnet18", "the network", "model", choices=RESNETS)
    batch_size: int = option(128, "cells per batch (each gives two views; every other view in the batch "
                             "is a negative)", "optimisation", check=at_least(2, "2 or more: contrastive "
                                                                               "learning needs pairs"))
    epochs: int = option(60, "number of epochs", "optimisation", check=POSITIVE)
    lr: float = option(1e-3, "peak learning rate of AdamW (linear warm-up, then cosine to 0)",
                       "optimisation", check=above(0))
    weight_decay: float = option(1e-4, "AdamW weight decay", "optimisation", check=NON_NEGATIVE)
    warmup_epochs: int = option(2, "linear warm-up epochs", "optimisation", check=NON_NEGATIVE)
    temperature: float = option(0.2, "temperature of the contrastive (NT-Xent) loss", "optimisation",
                                check=above(0, "positive"))
    crop_scale: float = option(0.35, "each view is a random crop of at least this share of the cell",
                               "augmentation", check=within(1e-9, 1, "in (0, 1]"))
    brightness: float = option(0.4, "brightness jitter between the views: factor from [1-b, 1+b]",
                               "augmentation", check=NON_NEGATIVE)
    contrast: float = option(0.4, "contrast jitter between the views: factor from [1-c, 1+c]",
                             "augmentation", check=NON_NEGATIVE)
    precision: str = option("auto", "'auto' or a Lightning precision", "hardware")
    accelerator: str = option("auto", "auto, cpu or gpu", "hardware", metavar="KIND")
    workers: int | None = option(None, "data loader processes (default: 4 with a GPU, 0 on CPU)",
                                 "hardware", check=NON_NEGATIVE)
    progress: bool | None = option(None, "progress bars (default: on a terminal)", "hardware")

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.image_size, self.shrink, self.bit_depth)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)
