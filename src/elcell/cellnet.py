"""What every network of elcell shares: one gray input channel, the spec's head,
the pooling, the per-cell input standardisation and Grad-CAM in closed form.
A family (elcell.resnet, elcell.efficientnet) subclasses CellNet.

* The stem takes one gray channel. The spec copies gray to RGB and normalises
  each copy with the same mean/std; a convolution over three identical
  channels equals one over a single channel with the three kernels summed, so
  ImageNet kernels are summed when loading (elcell.model.load_pretrained).
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

import torch
from torch import nn

from elcell.config import INPUT_NORMS, POOLINGS


def seed_head(in_features: int, num_labels: int) -> nn.Sequential:
    """The seed's classifier: in_features -> 512 -> 256 -> num_labels (logits)."""
    return nn.Sequential(
        nn.Linear(in_features, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_labels),
    )


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
        """The module whose output is the last feature map (what Grad-CAM explains)."""
        raise NotImplementedError

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] normalised cells -> the last feature map [B, num_features, h, w]."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map: [B, C, h, w]."""
        if self.input_norm == "cell":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            # a floor, not "+ eps": a blank (constant) cell stays finite, and int8
            # export leaves the Clip unquantised where it would round an Add's eps to 0
            x = (x - mean) / std.clamp_min(1e-3)
        return self.trunk(x)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C]: the spatial mean, or the maximum with pooling='max'."""
        return maps.amax(dim=(2, 3)) if self.pooling == "max" else maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, N] and Grad-CAM of every logit on the last feature map, [B, N, h, w].

        Grad-CAM weighs each feature map by the spatial mean of d(logit)/d(map).
        With a ReLU MLP head that mean is closed form: d(logit)/d(pooled) =
        W3 diag(m2) W2 diag(m1) W1 (m = ReLU masks), divided by h*w, for average
        pooling (the gradient is spread evenly) and max pooling alike (it all
        goes to the maximum's position). No autograd, so it exports to ONNX as a
        plain output.
        """
        maps = self.features(x)
        pooled = self.pool(maps)
        fc1, fc2, fc3 = self.fc[0], self.fc[2], self.fc[4]
        z1 = fc1(pooled)
        z2 = fc2(torch.relu(z1))
        logits = fc3(torch.relu(z2))
        grad = fc3.weight.unsqueeze(0) * (z2 > 0).to(maps.dtype).unsqueeze(1)  # [B, N, 256]
        grad = (grad @ fc2.weight) * (z1 > 0).to(maps.dtype).unsqueeze(1)  # [B, N, 512]
        grad = grad @ fc1.weight  # [B, N, C] = d(logit)/d(pooled)
        area = maps.shape[2] * maps.shape[3]
        cam = torch.relu(torch.einsum("bnc,bchw->bnhw", grad, maps) / area)
        return logits, cam
