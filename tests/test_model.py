"""Our ResNet: torchvision's state_dict names, ImageNet weight loading, the head."""

import pytest
import torch

from elcell.errors import PretrainedError
from elcell.training.nets.build import ResNet, build_model, load_pretrained

# PyTorch on one thread (conftest.one_thread): no OpenMP stalls on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

# Facts about torchvision's models (torchvision cannot be installed here): the
# number of state_dict entries, and a few names with their shapes.
TORCHVISION_KEYS = {"resnet18": 122, "resnet34": 218, "resnet50": 320}
TORCHVISION_SHAPES = {
    "resnet18": {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                 "layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)},
    "resnet50": {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "layer1.0.conv2.weight": (64, 64, 3, 3), "layer3.5.bn3.running_var": (1024,),
                 "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048)},
}


def torchvision_style_state(backbone: str) -> dict[str, torch.Tensor]:
    """A state_dict laid out as torchvision saves it: RGB conv1, 1000-class fc."""
    torch.manual_seed(1)
    with torch.device("meta"):  # names and shapes only, without initialising 25 M weights
        layout = ResNet(backbone, 2).state_dict()
    state = {k: torch.randn(v.shape) if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)
             for k, v in layout.items() if not k.startswith("fc.")}
    state["conv1.weight"] = torch.randn(64, 3, 7, 7)
    features = 2048 if backbone == "resnet50" else 512
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, features), torch.randn(1000)
    return state


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_backbone_keys_are_torchvisions(backbone):
    state = torchvision_style_state(backbone)
    assert len(state) == TORCHVISION_KEYS[backbone]
    for key, shape in TORCHVISION_SHAPES.get(backbone, {}).items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_file_loads_and_rgb_conv1_is_folded(tmp_path, backbone):
    state = torchvision_style_state(backbone)
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = ResNet(backbone, 2)
    head_before = model.fc[0].weight.clone()
    loaded = load_pretrained(model, str(path))
    assert len(loaded) == TORCHVISION_KEYS[backbone] - 2
    own = model.state_dict()
    assert torch.equal(own["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert torch.equal(own["layer4.1.bn2.running_mean"], state["layer4.1.bn2.running_mean"])
    assert torch.allclose(own["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.fc[0].weight, head_before)  # the seed head stays fresh


def test_folded_conv1_equals_gray_copied_to_rgb(tmp_path):
    """The seed feeds gray copied to 3 channels; one channel with summed kernels is the same."""
    rgb_weight = torch.randn(64, 3, 7, 7)
    gray = torch.randn(2, 1, 32, 32)
    rgb_out = torch.nn.functional.conv2d(gray.repeat(1, 3, 1, 1), rgb_weight, stride=2, padding=3)
    gray_out = torch.nn.functional.conv2d(gray, rgb_weight.sum(1, keepdim=True), stride=2, padding=3)
    assert torch.allclose(rgb_out, gray_out, atol=1e-4)


def test_download_goes_through_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    path = tmp_path / "resnet18-test.pth"
    torch.save(torchvision_style_state("resnet18"), path)
    model = build_model("resnet18", 2, pretrained=path.as_uri())  # file:// URL, no network needed
    assert torch.allclose(model.conv1.weight, torch.load(path)["conv1.weight"].sum(1, keepdim=True))
    assert list((tmp_path / "hub").rglob("resnet18-test.pth"))  # cached like any hub download


def test_offline_download_fails_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(PretrainedError) as err:
        build_model("resnet18", 2, pretrained="http://127.0.0.1:9/resnet18-f37072fd.pth")
    message = str(err.value)
    assert "Could not download ImageNet weights" in message and "--pretrained none" in message


def test_wrong_weight_files_are_refused(tmp_path):
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(ResNet("test_resnet", 2), str(tmp_path / "missing.pth"))
    path = tmp_path / "r18.pth"
    torch.save(torchvision_style_state("resnet18"), path)
    with pytest.raises(PretrainedError, match="does not fit test_resnet: .*it fits --backbone resnet18$"):
        load_pretrained(ResNet("test_resnet", 2), str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PretrainedError, match="not a PyTorch weights file or elcell checkpoint"):
        load_pretrained(ResNet("test_resnet", 2), str(tmp_path / "junk.pth"))
    torch.save({"conv1.weight": torch.zeros(1), "note": ResNet}, tmp_path / "pickled.pth")  # a class: refused
    with pytest.raises(PretrainedError) as refused:
        load_pretrained(ResNet("test_resnet", 2), str(tmp_path / "pickled.pth"))
    assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("backbone, features", [
    ("resnet18", 512),
    pytest.param("resnet34", 512, marks=pytest.mark.slow),  # resnet18's blocks, more of them: the slow tier's
    ("resnet50", 2048),
])
def test_head_is_the_seeds(backbone, features):
    model = ResNet(backbone, 3).eval()
    sizes = [(m.in_features, m.out_features) for m in model.fc if isinstance(m, torch.nn.Linear)]
    assert sizes == [(features, 512), (512, 256), (256, 3)]
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert cam.shape == (2, 3, 2, 2) and (cam >= 0).all()


def test_max_pooling_keeps_a_small_hot_spot_that_average_pooling_dilutes():
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, 3, 5] = 6.4  # one of 64 positions lights up, as a short crack would
    assert torch.equal(ResNet("test_resnet", 1, pooling="max").pool(maps), torch.tensor([[6.4, 0.0]]))
    assert torch.allclose(ResNet("test_resnet", 1).pool(maps), torch.tensor([[0.1, 0.0]]))
    with pytest.raises(ValueError, match="pooling"):
        ResNet("test_resnet", 1, pooling="sum")


def test_elcell_checkpoint_backbone_starts_a_model_with_other_labels(tiny_run):
    """Pretrain on one label set (here crack/inactive), fine-tune on another:
    the backbone comes over, the head stays fresh."""
    import json

    import torch

    summary = json.loads((tiny_run / "summary.json").read_text())
    checkpoint = tiny_run / summary["best_checkpoint"]
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = ResNet("test_resnet", 1)
    fresh_head = model.fc[4].weight.clone()
    loaded = load_pretrained(model, str(checkpoint))
    assert "layer4.0.bn2.running_var" in loaded and not any(k.startswith("fc.") for k in loaded)
    assert torch.equal(model.layer4[0].conv2.weight, trained["model.layer4.0.conv2.weight"])
    assert torch.equal(model.fc[4].weight, fresh_head)
    with pytest.warns(UserWarning, match="trained with --input-norm dataset, this model uses cell"):
        load_pretrained(ResNet("test_resnet", 1, input_norm="cell"), str(checkpoint))
    with pytest.raises(PretrainedError, match="does not fit resnet18: .*it fits --backbone test_resnet"):
        load_pretrained(ResNet("resnet18", 1), str(checkpoint))


def test_cell_input_norm_makes_the_model_blind_to_exposure():
    torch.manual_seed(0)
    cells = torch.rand(3, 1, 64, 64)
    brighter = 1.7 * cells + 0.4  # another exposure and offset of the same cells
    with torch.no_grad():
        per_cell = ResNet("test_resnet", 2, input_norm="cell").eval()
        logits, _ = per_cell.forward_with_cam(brighter)  # Grad-CAM sees the same input
        dataset = ResNet("test_resnet", 2).eval()
        # a freshly initialised ResNet barely varies with its input, hence the small scales
        assert (per_cell(cells) - per_cell(brighter)).abs().max() < 1e-4
        assert (logits - per_cell(cells)).abs().max() < 1e-4
        assert (dataset(cells) - dataset(brighter)).abs().max() > 1e-3
        blank = per_cell(torch.full((1, 1, 64, 64), 0.5))
    assert torch.isfinite(blank).all()
    with pytest.raises(ValueError, match="unknown input_norm"):
        ResNet("test_resnet", 2, input_norm="histogram")
