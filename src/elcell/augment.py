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


CRACK_SHAPES = ("line", "realistic")


class SyntheticCracks(nn.Module):
    """Draw dark cracks on some clean training cells and label them defective.

    The clear defects that from-scratch models miss are thin single cracks
    (docs/accuracy.md); this makes them less rare. Each cell whose `label` is
    below 0.5 gets, with probability `p`, cracks drawn on it, and its `label`
    set to 1:

    - shape "line": one quadratic Bezier curve from one edge to another, about
      a pixel wide, darkening the cell by 15-50 % along it;
    - shape "realistic": what cracked cells look like, see `_realistic_cracks`:
      one to three jagged, mostly diagonal cracks, some ending inside the cell,
      and in 40 % of cells the smaller part cut off by a crack darkened as an
      inactive area. Such a cell also gets `inactive_label` set, if given.

    Other labels are left alone.
    """

    def __init__(self, p: float, label: int, shape: str = "line", inactive_label: int | None = None):
        super().__init__()
        if shape not in CRACK_SHAPES:
            raise ValueError(f"unknown crack shape {shape!r}; choose from {list(CRACK_SHAPES)}")
        self.p, self.label, self.shape, self.inactive_label = p, label, shape, inactive_label

    @torch.no_grad()
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clean = targets[:, self.label] < 0.5
        chosen = torch.nonzero(clean & (torch.rand(len(images), device=images.device) < self.p)).flatten()
        if len(chosen) == 0:
            return images, targets
        images, targets = images.clone(), targets.clone()
        height, width = images.shape[-2:]
        if self.shape == "line":
            shade, inactive = _bezier_crack(len(chosen), height, width, images.device), None
        else:
            shade, inactive = _realistic_cracks(len(chosen), height, width, images.device)
        images[chosen] = images[chosen] * shade[:, None]
        targets[chosen, self.label] = 1.0
        if inactive is not None and self.inactive_label is not None:
            targets[chosen[inactive], self.inactive_label] = 1.0
        return images, targets


def _bezier_crack(n: int, height: int, width: int, device) -> torch.Tensor:
    """One thin Bezier curve from edge to edge per cell, as a brightness factor [n, H, W]."""
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
    return 1 - depth * line


def _realistic_cracks(n: int, height: int, width: int, device, cracks: int = 3,
                      steps: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Cracks as seen in EL images, as a brightness factor [n, H, W] and which cells
    got a darkened (inactive) area [n].

    Each cell gets one to three cracks. A crack is a line through a random point
    of the cell, along a diagonal (+-10 degrees: mono cells cleave along
    crystal planes) or, for half of them, at any angle, made jagged by a
    Brownian bridge across it (up to 3 % of the cell size: poly cells crack
    through grains). Half the cracks run from edge to edge; the others start
    inside the cell. Each darkens the cell by 15-50 % over 1-2 pixels. In 40 %
    of the cells the first crack runs edge to edge and the smaller part it cuts
    off is darkened by 30-90 %, as a cell area that lost its contact.
    """
    size = float(max(height, width))
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], -1)  # [P, 2] as (x, y)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, device=device)

    diagonal = (torch.randint(0, 2, (n, cracks), device=device) * 2 - 1) * torch.pi / 4
    angle = torch.where(torch.rand(n, cracks, device=device) < 0.5,
                        diagonal + torch.deg2rad(uniform(-10, 10, n, cracks)), uniform(0, torch.pi, n, cracks))
    along = torch.stack([angle.cos(), angle.sin()], -1)  # [n, C, 2]
    across = torch.stack([-angle.sin(), angle.cos()], -1)
    centre = torch.stack([uniform(0.15, 0.85, n, cracks) * (width - 1),
                          uniform(0.15, 0.85, n, cracks) * (height - 1)], -1)
    offset = pixels[None, None] - centre[:, :, None]  # [n, C, P, 2]
    s = (offset * along[:, :, None]).sum(-1)  # position along each crack, in [-size, size]
    d = (offset * across[:, :, None]).sum(-1)  # signed distance from its straight line

    # Brownian bridge: a random walk pinned to 0 at both ends, scaled to 0-3 % of the cell
    walk = torch.randn(n, cracks, steps, device=device).cumsum(-1)
    t = torch.linspace(0, 1, steps, device=device)
    bridge = walk - t * walk[..., -1:]
    bridge = bridge / bridge.abs().amax(-1, keepdim=True).clamp_min(1e-6) * uniform(0, 0.03 * size, n, cracks, 1)
    position = ((s + size) / (2 * size)).clamp(0, 1) * (steps - 1)  # s as a fractional bridge index
    low = position.floor().long().clamp(max=steps - 2)
    frac = position - low
    wiggle = bridge.gather(-1, low) * (1 - frac) + bridge.gather(-1, low + 1) * frac
    side = d - wiggle  # signed distance from the jagged crack

    half_width = uniform(0.5, 1.0, n, cracks, 1)
    line = (1 - side.abs() / half_width).clamp(min=0)
    starts = torch.where(torch.rand(n, cracks, 1, device=device) < 0.5,
                         torch.full((n, cracks, 1), -size, device=device), uniform(-0.3 * size, 0.1 * size, n, cracks, 1))
    line = line * (s >= starts)
    count = torch.randint(1, cracks + 1, (n, 1), device=device)
    drawn = torch.arange(cracks, device=device)[None] < count  # [n, C]
    inactive = torch.rand(n, device=device) < 0.4
    drawn[:, 0] |= inactive  # the cut-off area needs its crack drawn ...
    line[inactive, 0] = (1 - side[inactive, 0].abs() / half_width[inactive, 0]).clamp(min=0)  # ... edge to edge
    depth = uniform(0.15, 0.5, n, cracks, 1) * drawn[..., None]
    shade = (1 - depth * line).prod(1)  # [n, P]

    cut = side[:, 0] > 0
    smaller = torch.where(cut.float().mean(-1, keepdim=True) <= 0.5, cut, ~cut)
    darken = uniform(0.3, 0.9, n, 1) * (smaller & inactive[:, None])
    return (shade * (1 - darken)).view(n, height, width), inactive


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
