"""Vector-Jacobian products of the few layers a heatmap is backpropagated through.

The heatmap explains a feature map earlier than the last one (elcell.training.nets.cellnet),
so it needs d(logit)/d(map) through the layers after it. ONNX export cannot
trace autograd, so the backward pass is written out here with plain
operations (transposed convolutions, per-channel scales, masks) that export
as ordinary ONNX nodes. Every function takes gradients `g` shaped
[B, N, C, H, W]: one gradient per cell (B) and label (N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv(layer: nn.Conv2d, g: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """d/d(input) of a bias-free convolution: its transpose, sized back to `input_size`
    (a stride-2 convolution maps two input sizes to one output size)."""
    b, n = g.shape[:2]
    flat = g.flatten(0, 1)  # [B * N, C_out, h, w]
    sizes = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
             zip(flat.shape[2:], layer.stride, layer.padding, layer.dilation, layer.kernel_size, strict=True)]
    extra = tuple(target - size for target, size in zip(input_size, sizes, strict=True))
    out = F.conv_transpose2d(flat, layer.weight, stride=layer.stride, padding=layer.padding,
                             output_padding=extra, groups=layer.groups, dilation=layer.dilation)
    return out.unflatten(0, (b, n))  # [B, N, C_in, H, W]


def batchnorm(layer: nn.BatchNorm2d, g: torch.Tensor) -> torch.Tensor:
    """d/d(input) of BatchNorm in eval mode: a per-channel scale."""
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    return g * scale.view(1, 1, -1, 1, 1)


def relu(pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/d(input) of ReLU, given its input `pre` [B, C, H, W]."""
    return g * (pre > 0).to(g.dtype).unsqueeze(1)


def relu6(pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/d(input) of ReLU6 (flat below 0 and above 6), given its input `pre`."""
    return g * ((pre > 0) & (pre < 6)).to(g.dtype).unsqueeze(1)


def size(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])
