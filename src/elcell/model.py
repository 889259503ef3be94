"""ResNet-18/34/50 with torchvision's parameter names, the seed's head, and Grad-CAM.

The state_dict keys match torchvision's, so torchvision/timm ImageNet files load
as they are. Two deliberate differences from torchvision:

* conv1 takes one gray channel. The seed copies gray to RGB and normalises each
  copy with the same mean/std; a convolution over three identical channels
  equals one over a single channel with the three kernels summed, so we sum
  them when loading ImageNet weights and save 3x the first layer's work.
* fc is the seed's head: features -> 512 -> 256 -> N labels, ReLU between.

The last feature map is pooled by its average (torchvision's) or, with
pooling="max", by its maximum: a crack covers a few of the map's positions, and
an average dilutes it by the others.

With input_norm="cell" each cell is first standardised by its own pixel mean
and standard deviation, so the model is blind to a cell's overall gain and
offset (EL images differ in exposure between cameras and lines); the default,
"dataset", leaves the input as the train split's mean/std normalised it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from elcell.errors import PretrainedError

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
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


class Bottleneck(nn.Module):
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


POOLINGS = ("avg", "max")
INPUT_NORMS = ("dataset", "cell")

ARCHITECTURES: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def seed_head(in_features: int, num_labels: int) -> nn.Sequential:
    """The seed's classifier: in_features -> 512 -> 256 -> num_labels (logits)."""
    return nn.Sequential(
        nn.Linear(in_features, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_labels),
    )


class ResNet(nn.Module):
    def __init__(self, backbone: str, num_labels: int, pooling: str = "avg", input_norm: str = "dataset"):
        super().__init__()
        if backbone not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(ARCHITECTURES)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose from {list(INPUT_NORMS)}")
        self.input_norm = input_norm
        block, depths = ARCHITECTURES[backbone]
        self.backbone_name = backbone
        self.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
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
        self.pooling = pooling
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage (layer4): [B, C, h, w]."""
        if self.input_norm == "cell":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            # a floor, not "+ eps": a blank (constant) cell stays finite, and int8
            # export leaves the Clip unquantised where it would round an Add's eps to 0
            x = (x - mean) / std.clamp_min(1e-3)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C]: the spatial mean, or the maximum with pooling='max'."""
        return maps.amax(dim=(2, 3)) if self.pooling == "max" else maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, N] and Grad-CAM of every logit on layer4, [B, N, h, w].

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


def build_model(backbone: str, num_labels: int, pretrained: str = "none", pooling: str = "avg",
                input_norm: str = "dataset") -> ResNet:
    model = ResNet(backbone, num_labels, pooling, input_norm)
    if pretrained and pretrained != "none":
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(source: str, backbone: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights in `source`, and the hyperparameters of an elcell checkpoint ({} otherwise)."""
    if source == "imagenet":
        source = IMAGENET_URLS[backbone]
    if source.startswith(("http://", "https://", "file://")):  # file:// suits a weights share
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        except Exception as err:  # urllib raises several kinds when offline
            raise PretrainedError(
                f"Could not download ImageNet weights from {source} ({type(err).__name__}: {err}); "
                "pass --pretrained PATH to a local torchvision .pth file, or --pretrained none to train from scratch."
            ) from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PretrainedError(
                f"--pretrained {source}: no such file; give a torchvision .pth file, a URL, 'imagenet' or 'none'."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            # not the error's text: PyTorch's advice to load with weights_only=False does not apply
            raise PretrainedError(f"--pretrained {source}: not a PyTorch weights file or elcell checkpoint "
                                  f"({type(err).__name__})") from None
    hyper_parameters = {}
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        hyper_parameters = state.get("hyper_parameters") or {}
        state = state["state_dict"]
        if any(key.startswith("model.") for key in state):
            # an elcell checkpoint (e.g. a model trained on ELPV, fine-tuned on your labels):
            # the ResNet sits under `model.`; loss and metric buffers are not weights
            state = {key.removeprefix("model."): v for key, v in state.items() if key.startswith("model.")}
    if not isinstance(state, dict):
        raise PretrainedError(f"--pretrained {source}: expected a state_dict, got {type(state).__name__}")
    return state, hyper_parameters


def load_pretrained(model: ResNet, source: str) -> list[str]:
    """Load a torchvision-format ResNet state_dict (file, URL or 'imagenet') into `model`.

    The ImageNet classifier (fc.*) is dropped, the seed head keeps its fresh
    initialisation, and an RGB conv1 is summed to one gray channel. Returns the
    backbone keys that were loaded.
    """
    state, trained = _read_state_dict(source, model.backbone_name)
    trained_norm = trained.get("input_norm", "dataset")
    if trained and trained_norm != model.input_norm:
        warnings.warn(f"--pretrained {source} was trained with --input-norm {trained_norm}, this model "
                      f"uses {model.input_norm}: its features will see differently scaled cells", stacklevel=2)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    if state.get("conv1.weight") is not None and state["conv1.weight"].shape[1] == 3:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected {unexpected[:3]}") \
            or f"shape mismatch {wrong[:3]}"
        raise PretrainedError(
            f"--pretrained {source} does not fit {model.backbone_name}: {detail} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape)"
        )
    model.load_state_dict(state, strict=False)
    return sorted(state)
