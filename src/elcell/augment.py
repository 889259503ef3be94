"""Batch augmentation on the training device (kornia), and normalisation.

Works on float batches in [0, 1], shape [B, 1, H, W]; every sample draws its
own flips, rotation, affine warp and jitter factors.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class RandomRotate90(nn.Module):
    """Rotate each cell by a multiple of 90 degrees drawn uniformly from {0, 90, 180, 270}.

    Exact (torch.rot90, no resampling), unlike an affine warp. Cells are square
    (the cache resizes them), and a cell's physics does not change with its
    orientation, so with the flips this covers all eight symmetries of a square."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        turns = torch.randint(0, 4, (len(images),), device=images.device)
        out = images.clone()
        for k in (1, 2, 3):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
        return out


class BatchAugment(nn.Module):
    """The seed's augmentation, horizontal and vertical flips (p=0.4 each) and
    brightness/contrast jitter (multiplicative factors in [1-b, 1+b], [1-c, 1+c],
    as torchvision's ColorJitter), plus optional 90-degree rotations and a small
    affine warp (rotation in degrees, translation and scale as fractions)."""

    def __init__(self, flip_p: float = 0.4, brightness: float = 0.2, contrast: float = 0.2,
                 rotate90: bool = False, affine_degrees: float = 0.0, affine_translate: float = 0.0,
                 affine_scale: float = 0.0):
        super().__init__()
        ops: list[nn.Module] = []
        if flip_p > 0:
            ops += [K.RandomHorizontalFlip(p=flip_p), K.RandomVerticalFlip(p=flip_p)]
        if rotate90:
            ops.append(RandomRotate90())
        if affine_degrees > 0 or affine_translate > 0 or affine_scale > 0:
            # Border padding: a cell edge continues outward instead of a black band
            # the model could learn as a feature.
            ops.append(K.RandomAffine(
                degrees=affine_degrees,
                translate=(affine_translate, affine_translate) if affine_translate > 0 else None,
                scale=(1 - affine_scale, 1 + affine_scale) if affine_scale > 0 else None,
                padding_mode="border", p=1.0,
            ))
        if brightness > 0 or contrast > 0:
            ops.append(K.ColorJitter(brightness=brightness, contrast=contrast, p=1.0))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images) if len(self.ops) else images


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise with the train split's pixel mean/std (in [0, 1] units)."""
    return (images - mean) / std
