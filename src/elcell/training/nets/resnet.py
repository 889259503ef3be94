"""ResNet-18/34/50 with torchvision's parameter names (ResNet v1.5: the stride
sits on the 3x3 convolution), so torchvision/timm ImageNet files load as
they are, on one gray channel with the spec's head (elcell.training.nets.cellnet).

`test_resnet` (after timm's test_* models) has the same names with one block
per stage and an eighth of the widths: 0.5 M parameters against ResNet-18's
11 M, so the test suite trains, exports and scores a real model in seconds.
It has no ImageNet weights and is not meant to judge cells.
"""

from __future__ import annotations

import torch
from torch import nn

from elcell.training.nets import vjp
from elcell.training.nets.cellnet import CellNet, seed_head


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _Residual(nn.Module):
    """What both blocks share for the heatmap's backward pass (elcell.training.nets.vjp): the
    shortcut's gradient, through the downsampling convolution where there is one."""

    downsample: nn.Module | None

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _shortcut_vjp(self, x_size: tuple[int, int], g: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return g
        return vjp.conv(self.downsample[0], vjp.batchnorm(self.downsample[1], g), x_size)


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def forward_tape(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """forward, keeping what the backward pass needs: sizes and the ReLUs' inputs."""
        a = self.bn1(self.conv1(x))
        s = self.bn2(self.conv2(torch.relu(a))) + self._shortcut(x)
        return torch.relu(s), (vjp.size(x), a, s)

    def vjp(self, tape: tuple, g: torch.Tensor) -> torch.Tensor:
        x_size, a, s = tape
        g = vjp.relu(s, g)
        inner = vjp.conv(self.conv2, vjp.batchnorm(self.bn2, g), vjp.size(a))
        inner = vjp.conv(self.conv1, vjp.batchnorm(self.bn1, vjp.relu(a, inner)), x_size)
        return inner + self._shortcut_vjp(x_size, g)


class Bottleneck(_Residual):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def forward_tape(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        a = self.bn1(self.conv1(x))
        b = self.bn2(self.conv2(torch.relu(a)))
        s = self.bn3(self.conv3(torch.relu(b))) + self._shortcut(x)
        return torch.relu(s), (vjp.size(x), a, b, s)

    def vjp(self, tape: tuple, g: torch.Tensor) -> torch.Tensor:
        x_size, a, b, s = tape
        g = vjp.relu(s, g)
        inner = vjp.conv(self.conv3, vjp.batchnorm(self.bn3, g), vjp.size(b))
        inner = vjp.conv(self.conv2, vjp.batchnorm(self.bn2, vjp.relu(b, inner)), vjp.size(a))
        inner = vjp.conv(self.conv1, vjp.batchnorm(self.bn1, vjp.relu(a, inner)), x_size)
        return inner + self._shortcut_vjp(x_size, g)


# backbone -> (block, blocks per stage, width of each stage; the stem has the first)
ARCHITECTURES: dict[str, tuple[type[nn.Module], list[int], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], (64, 128, 256, 512)),
    "resnet34": (BasicBlock, [3, 4, 6, 3], (64, 128, 256, 512)),
    "resnet50": (Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512)),
    "test_resnet": (BasicBlock, [1, 1, 1, 1], (8, 16, 32, 64)),
}


class ResNet(CellNet):
    def __init__(self, backbone: str, num_labels: int, pooling: str = "avg", input_norm: str = "dataset"):
        if backbone not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(ARCHITECTURES)}")
        super().__init__(backbone, pooling, input_norm)
        block, depths, widths = ARCHITECTURES[backbone]
        self.conv1 = nn.Conv2d(1, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths), start=1):
            stride = 1 if stage == 1 else 2
            downsample = None
            if stride != 1 or cin != width * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(cin, width * block.expansion, stride),
                    nn.BatchNorm2d(width * block.expansion),
                )
            blocks = [block(cin, width, stride, downsample)]
            cin = width * block.expansion
            blocks += [block(cin, width) for _ in range(depth - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.num_features = cin
        self.fc = seed_head(cin, num_labels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual branch: every block starts as the
        # identity, which makes training from scratch markedly more stable.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    @property
    def cam_layer(self) -> nn.Module:
        return self.layer4

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] -> output of the last stage (layer4): [B, C, H/32, W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def units(self) -> list[tuple]:
        """The stem (stride 4), then every block with the stride of its output."""
        blocks = [(block, 4 * 2 ** (stage - 1)) for stage in range(1, 5)
                  for block in getattr(self, f"layer{stage}")]
        return [(self._stem, 4), *blocks]
