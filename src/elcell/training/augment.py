"""Batch augmentation on the training device (kornia), and normalisation.

Works on float batches in [0, 1], shape [B, 1, H, W]; every sample draws its
own flips, rotation, affine warp and jitter factors.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from elcell.errors import DataError
from elcell.training.config import CRACK_SHAPES


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


NOT_ONLY_CRACKS = ("realistic+fingers",)  # shapes that also draw defects that are not cracks


class SyntheticCracks(nn.Module):
    """Draw dark cracks on some clean training cells and label them defective.

    The clear defects that from-scratch models miss are thin single cracks
    (docs/accuracy.md); this makes them less rare. Each cell whose `label` is
    below 0.5 (known: not NaN) gets, with probability `p`, cracks drawn on it, and its `label`
    set to 1:

    - shape "line": one quadratic Bezier curve from one edge to another, about
      a pixel wide, darkening the cell by 15-50 % along it;
    - shape "realistic": what cracked cells look like, see `_realistic_cracks`:
      one to three jagged, mostly diagonal cracks, some ending inside the cell;
      in 40 % of the cracked cells the smaller part that a crack cuts off is
      darkened as an inactive area, and `inactive_label` set, if given;
    - shape "realistic+branches": as "realistic", but half the cells get a
      crack network instead: a crack with a branch, and in some a branch off
      the branch (V, Y and tree shapes);
    - shape "realistic+fingers": as "realistic", but a third of the cells get
      finger interruptions instead (`_finger_interruptions`), for a label that
      counts any defect, not cracks alone.

    Other labels are left alone.
    """

    def __init__(self, p: float, label: int, shape: str = "line", inactive_label: int | None = None):
        super().__init__()
        if shape not in CRACK_SHAPES:
            raise ValueError(f"unknown crack shape {shape!r}; choose from {list(CRACK_SHAPES)}")
        self.p, self.label, self.shape, self.inactive_label = p, label, shape, inactive_label

    @torch.no_grad()
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # only cells known to be crack-free: NaN < 0.5 is False, so a cell whose crack
        # label is unknown gets no drawn crack (it may be cracked already, and then
        # setting the label to 1 would be right only by luck). An unknown inactive
        # label stays unknown unless a drawn crack darkens an area (then it is 1).
        clean = targets[:, self.label] < 0.5
        chosen = torch.nonzero(clean & (torch.rand(len(images), device=images.device) < self.p)).flatten()
        if len(chosen) == 0:
            return images, targets
        images, targets = images.clone(), targets.clone()
        height, width = images.shape[-2:]
        if self.shape == "line":
            shade, inactive = _bezier_crack(len(chosen), height, width, images.device), None
        else:
            branching = 0.5 if self.shape == "realistic+branches" else 0.0
            shade, inactive = _realistic_cracks(len(chosen), height, width, images.device, branching=branching)
        if self.shape in NOT_ONLY_CRACKS:
            # streaks are drawn on every chosen cell and a third kept: cheap at 128 px, and
            # the random draws stay those of the recorded runs (E36)
            fingers = torch.rand(len(chosen), device=images.device) < 1 / 3
            shade = torch.where(fingers[:, None, None], _finger_interruptions(images[chosen, 0]), shade)
            inactive = inactive & ~fingers
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


def _realistic_cracks(n: int, height: int, width: int, device, max_cracks: int = 3,
                      inactive_share: float = 0.4, branching: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cracks as seen in EL images, as a brightness factor [n, H, W] and which cells
    got a darkened (inactive) area [n].

    Each cell gets one to three cracks, whatever its type. A crack is a line
    through a random point of the cell's central 70 %, along a diagonal
    (+-10 degrees; mono cells cleave along crystal planes) for half of them and
    at any angle for the others, made jagged by a Brownian bridge across it (up
    to 3 % of the cell size; poly cells crack through grains). It darkens the cell by
    15-50 % over a width of 1-2 pixels. Half the cracks run from edge to edge;
    the others start near the chosen point, so they mostly end inside the cell.
    In `inactive_share` of the cells the first crack runs from edge to edge and
    the smaller part it cuts off is darkened by 30-90 %, as a cell area that
    lost its contact.

    With `branching` above 0, that share of the cells gets a crack network
    instead (`_branch`): the first crack runs from edge to edge, and each
    further one branches off the crack before it and ends inside the cell or
    at its edge.
    """
    size = float(max(height, width))
    shape = (n, max_cracks)
    diagonal = (torch.randint(0, 2, shape, device=device) * 2 - 1) * torch.pi / 4
    angle = torch.where(torch.rand(shape, device=device) < 0.5,
                        diagonal + torch.deg2rad(_uniform(-10, 10, shape, device)),
                        _uniform(0, torch.pi, shape, device))
    centre = torch.stack([_uniform(0.15, 0.85, shape, device) * (width - 1),
                          _uniform(0.15, 0.85, shape, device) * (height - 1)], -1)
    wiggle = _uniform(0, 0.03 * size, shape, device)
    bridge = _brownian_bridge(shape, BRIDGE_STEPS, device) * wiggle[..., None]
    if branching:
        network, angle, centre, bridge, length = _branch(angle, centre, bridge, branching, height, width)
    along, side = _crack_coordinates(angle, centre, bridge, height, width)  # [n, C, P] each

    line = _coverage(side, half_width=_uniform(0.5, 1.0, (*shape, 1), device))
    inactive = torch.rand(n, device=device) < inactive_share
    partial = torch.rand(shape, device=device) < 0.5
    partial[inactive, 0] = False  # the crack that cuts off an area runs from edge to edge
    start = torch.where(partial, _uniform(-0.3 * size, 0.1 * size, shape, device), -torch.inf)
    if branching:  # in a network the first crack runs from edge to edge, and branches from their origin
        rays = network[:, None] & (torch.arange(max_cracks, device=device) >= 1)
        start = torch.where(rays, 0.0, start)
        start[network, 0] = -torch.inf
        line = line * ((along <= length[..., None]) | ~rays[..., None])
    line = line * (along >= start[..., None])
    count = torch.randint(1, max_cracks + 1, (n, 1), device=device)
    if branching:
        count = torch.where(network[:, None], count.clamp_min(2), count)  # at least one branch is drawn
    depth = _uniform(0.15, 0.5, shape, device) * (torch.arange(max_cracks, device=device) < count)
    shade = (1 - depth[..., None] * line).prod(1)  # [n, P]

    cut = side[:, 0] > 0  # one side of the first crack
    smaller = torch.where(cut.float().mean(-1, keepdim=True) <= 0.5, cut, ~cut)
    darken = _uniform(0.3, 0.9, (n, 1), device) * (smaller & inactive[:, None])
    return (shade * (1 - darken)).view(n, height, width), inactive


def _branch(angle: torch.Tensor, centre: torch.Tensor, bridge: torch.Tensor, share: float, height: int,
            width: int) -> tuple[torch.Tensor, ...]:
    """Turn the cracks of `share` of the cells into networks, as cracked cells show
    them (most clearly mono cells): crack k >= 1 starts at a point 10-90 % along
    crack k - 1 (within 24 % of the cell size of its centre, for the first crack,
    which runs from edge to edge) and runs on for 15-60 % of the cell size,
    turned from it by 80-100 degrees (onto the other diagonal, where the parent
    is diagonal) in half the branches and by 20-70 degrees in the others, either
    way. Its jagged offset is shifted to be 0 at its start, so it starts on its
    parent and may stray up to twice as far as a crack's wiggle. A branch off a
    branch that has run out of the cell may start outside it, and is not seen.

    Returns which cells are networks [n], and the cracks' angles, centres
    (a branch's start), bridges and lengths along them (branches only)."""
    n, cracks = angle.shape
    device = angle.device
    size = float(max(height, width))
    shape = (n, cracks)
    network = torch.rand(n, device=device) < share
    length = _uniform(0.15, 0.6, shape, device) * size
    turn = torch.where(torch.rand(shape, device=device) < 0.5, _uniform(80, 100, shape, device),
                       _uniform(20, 70, shape, device))
    turn = torch.deg2rad(turn) * (torch.randint(0, 2, shape, device=device) * 2 - 1)
    where = _uniform(0.1, 0.9, shape, device)
    angle, centre, bridge = angle.clone(), centre.clone(), bridge.clone()
    for k in range(1, cracks):
        parent = k - 1  # the first crack is a whole line through its centre, a branch starts at its own
        along = (2 * where[:, parent] - 1) * 0.3 * size if parent == 0 else where[:, parent] * length[:, parent]
        across = _offset(bridge[:, parent:parent + 1], along[:, None, None], height, width)[:, 0, 0]
        cos, sin = angle[:, parent].cos(), angle[:, parent].sin()
        origin = centre[:, parent] + torch.stack([along * cos - across * sin, along * sin + across * cos], -1)
        pinned = bridge[:, k] - _offset(bridge[:, k:k + 1], torch.zeros(n, 1, 1, device=device), height,
                                         width)[:, 0]
        centre[:, k] = torch.where(network[:, None], origin, centre[:, k])
        angle[:, k] = torch.where(network, angle[:, parent] + turn[:, k], angle[:, k])
        bridge[:, k] = torch.where(network[:, None], pinned, bridge[:, k])
    return network, angle, centre, bridge, length


def _finger_interruptions(cells: torch.Tensor, max_streaks: int = 8) -> torch.Tensor:
    """Broken fingers as seen in EL images, as a brightness factor [n, H, W] for
    the square cells [n, H, W] (training cells are square: the cache resizes them).

    A finger cut off from its busbar goes dark beyond the break, so each cell
    gets up to eight short dark streaks along its fingers, perpendicular to
    the busbars (`_busbars_horizontal`): on neighbouring fingers 1.5-3 pixels
    apart in half of the cells, spread across the cell in the others. Each is
    up to 5-30 % of the cell long (less where it runs off the cell), about a
    pixel wide, and darkens it by 15-50 %. A streak may start anywhere, so some
    cross a busbar, which a real broken finger does not. Widths and spacing are
    in pixels, chosen for the 128-pixel cells of the recipes that use them.
    """
    n, size = cells.shape[0], cells.shape[-1]
    if cells.shape[-2] != size:
        raise ValueError(f"finger interruptions need square cells, got {tuple(cells.shape[-2:])}")
    device = cells.device
    shape = (n, max_streaks)
    neighbours = _uniform(0.1, 0.9, (n, 1), device) * (size - 1) \
        + _uniform(1.5, 3.0, (n, 1), device) * torch.arange(max_streaks, device=device)
    spread = _uniform(0.05, 0.95, shape, device) * (size - 1)
    x = torch.where(torch.rand(n, 1, device=device) < 0.5, neighbours, spread)
    start = _uniform(0, 0.9, shape, device) * (size - 1)
    length = _uniform(0.05, 0.3, shape, device) * size
    count = torch.randint(1, max_streaks + 1, (n, 1), device=device)
    depth = _uniform(0.15, 0.5, shape, device) * (torch.arange(max_streaks, device=device) < count)

    position = torch.arange(size, device=device, dtype=torch.float32)
    across = _coverage(position - x[..., None], half_width=_uniform(0.4, 0.8, (*shape, 1), device))  # [n, S, W]
    along = ((position - start[..., None] + 0.5).clamp(0, 1)
             * (start[..., None] + length[..., None] - position + 0.5).clamp(0, 1))  # [n, S, H]
    streaks = along[..., :, None] * across[..., None, :]  # [n, S, H, W]: vertical streaks
    shade = (1 - depth[..., None, None] * streaks).prod(1)
    # drawn for horizontal busbars; turned for cells whose busbars are vertical
    return torch.where(_busbars_horizontal(cells)[:, None, None], shade, shade.transpose(-2, -1))


def _busbars_horizontal(cells: torch.Tensor) -> torch.Tensor:
    """Whether each cell's busbars run along its rows [n]: busbars are narrow dark
    lines across the whole cell, so the row means dip deeper than the column
    means. A 9-pixel high-pass removes slow shading; the outer tenth on each
    side, with the dark cell edges and frame, is skipped. A cell without busbars
    gets whichever way its shading happens to favour."""
    def dip(profile: torch.Tensor) -> torch.Tensor:
        smooth = torch.nn.functional.avg_pool1d(profile[:, None], 9, 1, 4, count_include_pad=False)[:, 0]
        margin = profile.shape[-1] // 10
        return (smooth - profile)[:, margin:profile.shape[-1] - margin].amax(-1)

    return dip(cells.mean(-1)) >= dip(cells.mean(-2))


def _crack_coordinates(angle: torch.Tensor, centre: torch.Tensor, bridge: torch.Tensor, height: int,
                       width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's position along each crack and its signed distance from it, [n, C, H*W] each.

    A crack is the line through `centre` [n, C, 2] (x, y) at `angle` [n, C]
    (radians, from the x axis), displaced across by `bridge` [n, C, steps]
    (pixels; `_offset`)."""
    device = angle.device
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    xs, ys = xs.flatten() - centre[..., :1], ys.flatten() - centre[..., 1:]  # [n, C, P]
    cos, sin = angle.cos()[..., None], angle.sin()[..., None]
    along, across = xs * cos + ys * sin, ys * cos - xs * sin
    return along, across - _offset(bridge, along, height, width)


def _offset(bridge: torch.Tensor, along: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """How far each crack is displaced across at the positions `along` it [n, C, K]: its
    `bridge` [n, C, steps] spread evenly over the longest distance a pixel can be
    from the crack's centre either way, and interpolated between its steps."""
    steps = bridge.shape[-1]
    reach = (height ** 2 + width ** 2) ** 0.5
    position = (along + reach) / (2 * reach) * (steps - 1)  # as a fractional bridge index
    low = position.floor().long().clamp(0, steps - 2)
    frac = position - low
    return bridge.gather(-1, low) * (1 - frac) + bridge.gather(-1, low + 1) * frac


def _coverage(side: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    """About the share of each pixel, at signed distance `side` from a crack's
    centre line, that the crack covers: every pixel step along a crack darkens
    by its full width, wherever the crack falls between pixel centres."""
    return (half_width + 0.5 - side.abs()).clamp(0, 1)


BRIDGE_STEPS = 64  # points of a crack's jagged offset, spread over the cell diagonal either side of its centre


def _brownian_bridge(shape: tuple[int, ...], steps: int, device) -> torch.Tensor:
    """Random walks of `steps` points that start and end at 0, scaled so that the
    largest excursion of each is 1: [*shape, steps]."""
    walk = torch.cat([torch.zeros(*shape, 1, device=device),
                      torch.randn(*shape, steps - 1, device=device).cumsum(-1)], -1)
    bridge = walk - torch.linspace(0, 1, steps, device=device) * walk[..., -1:]
    return bridge / bridge.abs().amax(-1, keepdim=True).clamp_min(1e-6)


def _uniform(low: float, high: float, shape: tuple[int, ...], device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


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


def crack_label(names: list[str], synthetic_cracks: float, *, shape: str) -> int:
    """The label a drawn crack sets: 'crack' (in any case), else the only label (ELPV's
    'defective'). Refuses label sets it cannot mark, and drawn broken fingers on a
    'crack' label."""
    crack = label_index(names, "crack")
    if crack is not None:
        if synthetic_cracks > 0 and shape in NOT_ONLY_CRACKS:
            raise DataError(f"--synthetic-crack-shape {shape} marks broken fingers as defects, and they are not "
                            "cracks: use it with a single defect label, and 'realistic' or 'realistic+branches' with a "
                            "'crack' label")
        return crack
    if len(names) == 1 or synthetic_cracks == 0:
        return 0
    raise DataError(f"--synthetic-cracks needs a label named 'crack' or a single label; the labels are {names} "
                    "(--synthetic-cracks 0 --finetune-epochs 0 trains in one stage without drawn cracks)")


def label_index(names: list[str], wanted: str) -> int | None:
    """Where the label `wanted` is in `names`, whatever its case (a CSV may say
    'Crack'), or None."""
    lowered = [name.lower() for name in names]
    return lowered.index(wanted) if wanted in lowered else None
