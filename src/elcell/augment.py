"""Batch augmentation on the training device (kornia), and normalisation.

Works on float batches in [0, 1], shape [B, 1, H, W]; every sample draws its
own flips and jitter factors.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class BatchAugment(nn.Module):
    """The seed's augmentation: horizontal and vertical flips (p=0.4 each) and
    brightness/contrast jitter (multiplicative factors in [1-b, 1+b], [1-c, 1+c],
    as torchvision's ColorJitter)."""

    def __init__(self, flip_p: float = 0.4, brightness: float = 0.2, contrast: float = 0.2):
        super().__init__()
        ops: list[nn.Module] = []
        if flip_p > 0:
            ops += [K.RandomHorizontalFlip(p=flip_p), K.RandomVerticalFlip(p=flip_p)]
        if brightness > 0 or contrast > 0:
            ops.append(K.ColorJitter(brightness=brightness, contrast=contrast, p=1.0))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images) if len(self.ops) else images


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise with the train split's pixel mean/std (in [0, 1] units)."""
    return (images - mean) / std
