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


class SyntheticCracks(nn.Module):
    """Draw a thin dark crack on some clean training cells and label them defective.

    The clear defects that from-scratch models miss are thin single cracks
    (docs/accuracy.md); this makes them less rare. Each cell whose `label` is
    below 0.5 gets, with probability `p`, a quadratic Bezier curve from one
    edge to another, about a pixel wide, darkening the cell by 15-50 % along
    it, and its `label` set to 1. Other labels are left alone.
    """

    def __init__(self, p: float, label: int):
        super().__init__()
        self.p, self.label = p, label

    @torch.no_grad()
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = targets[:, self.label] < 0.5
        chosen = torch.nonzero(clean & (torch.rand(len(images), device=images.device) < self.p)).flatten()
        if len(chosen) == 0:
            return images, targets
        images, targets = images.clone(), targets.clone()
        n, (height, width), device = len(chosen), images.shape[-2:], images.device
        size = torch.tensor([width - 1, height - 1], device=device, dtype=torch.float32)
        first = torch.randint(0, 4, (n,), device=device)
        other = (first + torch.randint(1, 4, (n,), device=device)) % 4  # from one side to another
        start, end = _edge_points(first, size), _edge_points(other, size)
        bend = torch.rand(n, 1, 2, device=device) * size
        # sampled every ~1/4 pixel, so the drawn line has no gaps
        t = torch.linspace(0, 1, 4 * (height + width), device=device)[None, :, None]
        curves = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end  # [n, K, 2] as (x, y)
        line = _draw(curves, height, width)  # [n, H, W] in [0, 1]
        depth = 0.15 + 0.35 * torch.rand(n, 1, 1, device=device)
        images[chosen] = images[chosen] * (1 - depth * line)[:, None]
        targets[chosen, self.label] = 1.0
        return images, targets


def _draw(curves: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Anti-aliased lines through the points `curves` [n, K, 2]: each point spreads
    bilinearly over its four pixels; a pixel keeps its largest share. [n, H, W]."""
    n = len(curves)
    corner = curves.floor()
    frac = curves - corner
    index, weight = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            x, y = corner[..., 0] + dx, corner[..., 1] + dy
            inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            w = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
            index.append((y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).long())
            weight.append(w * inside)
    line = torch.zeros(n, height * width, device=curves.device)
    line.scatter_reduce_(1, torch.cat(index, 1), torch.cat(weight, 1), reduce="amax")
    return line.view(n, height, width)


def _edge_points(sides: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """A random point on each given side (0 left, 1 right, 2 top, 3 bottom) of a
    [0, w] x [0, h] box, as [n, 1, 2] (x, y)."""
    points = torch.rand(len(sides), 2, device=size.device) * size
    axis = sides // 2  # x is fixed on the left/right sides, y on the top/bottom ones
    points[torch.arange(len(sides), device=size.device), axis] = (sides % 2).to(size.dtype) * size[axis]
    return points[:, None]


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
