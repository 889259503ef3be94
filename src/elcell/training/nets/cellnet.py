"""What every network of elcell shares: one gray input channel, the spec's head,
the pooling, the per-cell input standardisation and Grad-CAM in closed form.
A family (elcell.training.nets.resnet, elcell.training.nets.efficientnet) subclasses CellNet.

* The stem takes one gray channel. The spec copies gray to RGB and normalises
  each copy with the same mean/std; a convolution over three identical
  channels equals one over a single channel with the three kernels summed, so
  ImageNet kernels are summed when loading (elcell.training.nets.build.load_pretrained).
* fc is the spec's head: features -> 512 -> 256 -> N labels, ReLU between.
* The last feature map is pooled by its average or, with pooling="max", by
  its maximum: a crack covers a few of the map's positions, and an average
  dilutes it by the others.
* With input_norm="cell" each cell is first standardised by its own pixel mean
  and standard deviation, so the model is blind to a cell's overall gain and
  offset (EL images differ in exposure between cameras and lines); the default,
  "dataset", leaves the input as the train split's mean/std normalised it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from elcell.training.config import INPUT_NORMS, POOLINGS


def seed_head(in_features: int, num_labels: int) -> nn.Sequential:
    """The seed's classifier: in_features -> 512 -> 256 -> num_labels (logits)."""
    return nn.Sequential(
        nn.Linear(in_features, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_labels),
    )


def _flip_w(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1)


def _flip_h(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-2)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2)


def _both(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1, -2)


# The symmetries of a square as (view, undo) on [..., H, W]: the four flips
# first (any trained model), then the transposed four (models trained with
# 90-degree rotations). `undo` turns a view's map back onto the cell.
VIEWS = (
    (lambda t: t, lambda t: t), (_flip_w, _flip_w), (_flip_h, _flip_h), (_both, _both),
    (_transpose, _transpose),
    (lambda t: _flip_w(_transpose(t)), lambda t: _transpose(_flip_w(t))),
    (lambda t: _flip_h(_transpose(t)), lambda t: _transpose(_flip_h(t))),
    (lambda t: _both(_transpose(t)), lambda t: _transpose(_both(t))),
)


HEATMAP_MIN_SIDE = 16  # a heatmap coarser than this cannot show where a crack runs
CAM_STRIDES = (32, 16, 8)
# The graph's second map, for module maps (elcell.options.MAP_DETAIL): LayerCAM on
# the last feature map needs the head's gradient only, not a backward pass.
# LayerCAM, not Grad-CAM: a cell sent to review has mostly negative evidence,
# which Grad-CAM's summed channels ReLU to an empty map; LayerCAM weighs each
# channel by its positive gradient only, so it shows where the evidence for the
# label is.
COARSE_MAP = {"method": "layercam", "stride": 32}


def heatmap_settings(size: int, rotate90: bool, method: str = "layercam") -> dict:
    """How an exported model computes its heatmaps (docs/heatmaps.md): LayerCAM
    on the deepest feature map with at least HEATMAP_MIN_SIDE positions a side
    (stride 16 at 289 px, 8 at 225 or 128 px), averaged over the cell's
    symmetric views (all eight for a model trained with 90-degree rotations).
    The exported graph computes one view (`graph_views`); the runtime averages
    the views, so a caller may take fewer where time matters more (a module map).
    `coarse`: the graph's second, cheaper map (COARSE_MAP)."""
    stride = next((s for s in CAM_STRIDES if -(-size // s) >= HEATMAP_MIN_SIDE), CAM_STRIDES[-1])
    return {"method": method, "stride": stride, "views": 8 if rotate90 else 4, "graph_views": 1,
            "coarse": dict(COARSE_MAP)}


class CellNet(nn.Module):
    """What every backbone family shares: the seed head `fc` on the pooled last
    feature map, the pooling, the per-cell input standardisation, and Grad-CAM
    in closed form. A family builds its layers, then sets `num_features` and
    `fc = seed_head(num_features, num_labels)`, and defines `trunk`."""

    # the first convolution's weight in a state_dict: RGB in ImageNet files, summed to gray on load
    stem_key = "conv1.weight"
    # the ImageNet classifier's prefix in the weight files, dropped on load (our head stays fresh)
    imagenet_classifier = "fc."
    num_features: int
    fc: nn.Sequential
    # What the heatmap explains, fixed when a model is exported (elcell.training.export):
    # the feature map of this stride (8, 16 or 32, the last), by this method.
    cam_stride: int = 32
    cam_method: str = "gradcam"
    # How many symmetric views of the cell the heatmap averages (1, 4 flips, or
    # the 8 symmetries of a square): each view's map turned back and averaged,
    # so a turned cell's map is exactly the turned map.
    cam_views: int = 1

    def __init__(self, backbone: str, pooling: str = "avg", input_norm: str = "dataset"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose from {list(INPUT_NORMS)}")
        self.backbone_name = backbone
        self.pooling = pooling
        self.input_norm = input_norm

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the last feature map."""
        raise NotImplementedError

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] normalised cells -> the last feature map [B, num_features, h, w]."""
        raise NotImplementedError

    def units(self) -> list[tuple[Callable, int]]:
        """The trunk as a sequence of (unit, its output's stride): running them in
        order is `trunk`. Units after the heatmap's layer also offer
        forward_tape(x) -> (out, tape) and vjp(tape, g) -> g at their input."""
        raise NotImplementedError

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "cell":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            # a floor, not "+ eps": a blank (constant) cell stays finite, and int8
            # export leaves the Clip unquantised where it would round an Add's eps to 0
            x = (x - mean) / std.clamp_min(1e-3)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map: [B, C, h, w]."""
        return self.trunk(self.normalise(x))

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C]: the spatial mean, or the maximum with pooling='max'."""
        return maps.amax(dim=(2, 3)) if self.pooling == "max" else maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))

    def head_gradient(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, N] and d(logit)/d(pooled) [B, N, C], in closed form for the
        ReLU MLP head: W3 diag(m2) W2 diag(m1) W1 (m = ReLU masks)."""
        fc1, fc2, fc3 = self.fc[0], self.fc[2], self.fc[4]
        z1 = fc1(pooled)
        z2 = fc2(torch.relu(z1))
        logits = fc3(torch.relu(z2))
        grad = fc3.weight.unsqueeze(0) * (z2 > 0).to(pooled.dtype).unsqueeze(1)  # [B, N, 256]
        grad = (grad @ fc2.weight) * (z1 > 0).to(pooled.dtype).unsqueeze(1)  # [B, N, 512]
        return logits, grad @ fc1.weight  # [B, N, C]

    def map_gradient(self, maps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d(logit)/d(last map) [B, N, C, h, w] from d(logit)/d(pooled) [B, N, C]:
        spread evenly by average pooling; by max pooling, all at each channel's
        maximum, shared evenly where positions tie (ReLU6 saturates at 6), as
        PyTorch's amax backpropagates."""
        h, w = maps.shape[2:]
        if self.pooling == "max":
            winner = (maps == maps.amax(dim=(2, 3), keepdim=True)).to(maps.dtype)  # [B, C, h, w]
            winner = winner / winner.sum(dim=(2, 3), keepdim=True)
            return grad[..., None, None] * winner.unsqueeze(1)
        return (grad / (h * w))[..., None, None].expand(*grad.shape, h, w)

    def use_heatmap(self, settings: dict) -> None:
        """Compute heatmaps as `heatmap_settings` says: the views the graph averages
        itself (older models' settings have no `graph_views`: all of them)."""
        self.cam_method, self.cam_stride = settings["method"], settings["stride"]
        self.cam_views = settings.get("graph_views", settings["views"])

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, N] of the cells as given, and their heatmaps [B, N, h, w]
        (`heatmaps`), averaged over `cam_views` symmetric views of each cell."""
        logits, maps, _ = self.forward_with_cams(x)
        return logits, maps

    def forward_with_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward_with_cam's logits and heatmaps, and the coarse map [B, N, h32, w32]
        of the same views."""
        if self.cam_views == 1:
            return self.heatmaps(x)
        batch = x.shape[0]
        views = VIEWS[:self.cam_views]
        logits, *maps = self.heatmaps(torch.cat([view(x) for view, _ in views]))
        maps = [torch.stack([undo(m[i * batch:(i + 1) * batch]) for i, (_, undo) in enumerate(views)]).mean(dim=0)
                for m in maps]
        return logits[:batch], maps[0], maps[1]

    def heatmaps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, N] and a heatmap of every logit, [B, N, h, w], on the feature
        map of stride `cam_stride` (the last map at 32), by `cam_method`:

        * "gradcam": each channel weighted by the spatial mean of d(logit)/d(map),
          summed, ReLU (Selvaraju et al. 2017);
        * "layercam": each position's channels weighted by their own positive
          gradient, summed (Jiang et al. 2021): sharper on an earlier map.

        The gradient comes from the head in closed form and, for an earlier map,
        through the layers after it by elcell.training.nets.vjp: no autograd, so it exports to
        ONNX as a plain output.

        Third, the coarse map [B, N, h32, w32] (COARSE_MAP): LayerCAM on the last
        map, from the head's gradient alone.
        """
        units = self.units()
        tap = max(i for i, (_, stride) in enumerate(units) if stride <= self.cam_stride)
        x = self.normalise(x)
        for unit, _ in units[:tap + 1]:
            x = unit(x)
        explained, tapes = x, []
        for unit, _ in units[tap + 1:]:
            x, tape = unit.forward_tape(x)
            tapes.append((unit, tape))
        logits, grad = self.head_gradient(self.pool(x))
        grad = self.map_gradient(x, grad)  # [B, N, C, h32, w32]
        coarse = torch.relu((torch.relu(grad) * x.unsqueeze(1)).sum(dim=2))
        for unit, tape in reversed(tapes):
            grad = unit.vjp(tape, grad)
        if self.cam_method == "layercam":
            cam = (torch.relu(grad) * explained.unsqueeze(1)).sum(dim=2)
        else:
            cam = torch.einsum("bnc,bchw->bnhw", grad.mean(dim=(3, 4)), explained)
        return logits, torch.relu(cam), coarse
