"""Grad-CAM inside the forward pass: equal to captum's LayerGradCam, equal in the
ONNX file, and it points at the defect on cells where we know where it is."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from helpers import randomise_batchnorm
from torch import nn

from elcell.cells.images import Decoding, load_cell
from elcell.infer.heatmaps import heatmap_peak, upsample_heatmap
from elcell.training.nets.build import ResNet
from elcell.training.nets.cellnet import heatmap_settings

TOLERANCE = 1e-4


# small models on one thread (conftest.one_thread): reproducible sums, no OpenMP stalls
pytestmark = pytest.mark.usefixtures("one_thread")


def captum_cams(model: ResNet, x: torch.Tensor) -> torch.Tensor:
    """captum's Grad-CAM of every label on layer4, stacked to [B, N, h, w]."""
    gradcam = LayerGradCam(model, model.layer4)
    labels = model.fc[4].out_features
    return torch.cat([gradcam.attribute(x, target=i, relu_attributions=True) for i in range(labels)],
                     dim=1).detach()


def assert_equals_captum(model: ResNet, x: torch.Tensor, check_nontrivial: bool = True) -> None:
    model.eval()
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        pooled = model.pool(model.features(x))
        first_mask = model.fc[0](pooled) > 0
    reference = captum_cams(model, x)
    assert cam.shape == reference.shape
    assert torch.allclose(logits, model(x).detach())
    assert reference.max() > 0
    if check_nontrivial:  # some cells ReLU'd away, and the head's ReLU masks mixed
        assert (reference == 0).any() and 0 < first_mask.float().mean() < 1
    peak = float(reference.abs().max())
    error = float((cam - reference).abs().max())
    assert error <= TOLERANCE * max(1.0, peak), f"max |ours - captum| = {error:.3g} (peak {peak:.3g})"


# test_resnet: ResNet-18's BasicBlocks (with and without a downsampling shortcut), fewer and
# narrower; ResNet-50's Bottlenecks in the slow tier
@pytest.mark.parametrize(("backbone", "pooling"), [("test_resnet", "avg"), ("test_resnet", "max"),
                                                   pytest.param("resnet50", "avg", marks=pytest.mark.slow)])
def test_forward_with_cam_equals_captum_random_model(backbone, pooling):
    torch.manual_seed(0)
    model = ResNet(backbone, num_labels=3, pooling=pooling)
    randomise_batchnorm(model, seed=1)
    model.double()
    x = torch.randn(3, 1, 96, 96, dtype=torch.float64)
    assert_equals_captum(model, x)


def autograd_layercam_last_map(model: ResNet, x: torch.Tensor) -> torch.Tensor:
    """LayerCAM of every label on the last feature map by autograd, [B, N, h, w]."""
    maps = model.features(x).detach().requires_grad_(True)
    logits = model.fc(model.pool(maps))
    cams = []
    for n in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, n].sum(), maps, retain_graph=True)
        cams.append(torch.relu((torch.relu(grad) * maps).sum(dim=1)))
    return torch.stack(cams, dim=1).detach()


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_the_coarse_map_is_layercam_on_the_last_map_beside_a_fine_map(pooling):
    """The graph's third output, for module maps: LayerCAM on the last map, as
    autograd computes it, whatever map the model's heatmap is."""
    torch.manual_seed(0)
    model = ResNet("test_resnet", num_labels=3, pooling=pooling)
    randomise_batchnorm(model, seed=1)
    model.double().eval()
    x = torch.randn(3, 1, 96, 96, dtype=torch.float64)
    model.use_heatmap(heatmap_settings(96, rotate90=False))  # the fine map: LayerCAM at stride 8
    with torch.no_grad():
        logits, fine, coarse = model.forward_with_cams(x)
    reference = autograd_layercam_last_map(model, x)
    assert fine.shape == (3, 3, 12, 12) and coarse.shape == reference.shape == (3, 3, 3, 3)
    assert (reference.amax(dim=(2, 3)) > reference.amin(dim=(2, 3))).all()  # a map, not a constant
    assert torch.allclose(logits, model(x))
    assert float((coarse - reference).abs().max()) <= TOLERANCE * max(1.0, float(reference.abs().max()))


def trained_tiny_model(tiny_run):
    from elcell.training.lightning_module import ELCellModule

    summary = json.loads((tiny_run / "summary.json").read_text())
    state = torch.load(tiny_run / summary["best_checkpoint"], map_location="cpu", weights_only=False)
    module = ELCellModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    return module.model.eval(), module.hparams


def real_cells(seed_csv, count: int, size: int) -> np.ndarray:
    rows = seed_csv.read_text().splitlines()[1:count + 1]
    return np.stack([load_cell(seed_csv.parent / row.split(";")[0], Decoding(size)) for row in rows])


def test_forward_with_cam_equals_captum_trained_model(tiny_run, seed_csv):
    model, hparams = trained_tiny_model(tiny_run)
    cells = torch.from_numpy(real_cells(seed_csv, 6, hparams["image_size"]))[:, None]
    x = (cells.double() / 255 - hparams["mean"]) / hparams["std"]
    assert_equals_captum(model.double(), x, check_nontrivial=False)
    # And in float32, the precision the ONNX file computes in.
    model.float()
    with torch.no_grad():
        _, cam = model.forward_with_cam(x.float())
    reference = captum_cams(model, x.float())
    assert float((cam - reference).abs().max()) <= TOLERANCE * max(1.0, float(reference.max()))


def test_onnx_heatmap_equals_torch(tiny_run, tiny_onnx, seed_csv):
    from elcell.infer.runtime import open_model
    from elcell.training.export import InferenceGraph

    model, hparams = trained_tiny_model(tiny_run)
    onnx_model = open_model(tiny_onnx, providers=["CPUExecutionProvider"])
    size, labels = onnx_model.info.decoding.size, onnx_model.info.labels
    cells = real_cells(seed_csv, 8, size)
    probs, heatmap = onnx_model.run(cells, heatmaps=True)
    settings = onnx_model.info.extra["heatmap"]
    # 32 px: the finest map kept, 4 x 4; the graph maps one view, the runtime averages 4
    assert settings == {"method": "layercam", "stride": 8, "views": 4, "graph_views": 1,
                        "coarse": {"method": "layercam", "stride": 32}}
    h = math.ceil(size / settings["stride"])
    assert probs.shape == (8, len(labels)) and heatmap.shape == (8, len(labels), h, h)
    assert np.isfinite(heatmap).all() and (heatmap >= 0).all() and heatmap.max() > 0
    model.use_heatmap(settings)
    model.cam_views = settings["views"]  # as the runtime averages them
    graph = InferenceGraph(model, hparams["mean"], hparams["std"]).eval()
    with torch.no_grad():
        torch_probs, torch_heatmap, _ = (t.numpy() for t in graph(torch.from_numpy(cells)[:, None]))
    assert np.abs(probs - torch_probs).max() <= TOLERANCE
    assert np.abs(heatmap - torch_heatmap).max() <= TOLERANCE * max(1.0, float(torch_heatmap.max()))
    # Requesting probs alone (a session of the graph cut down to them) gives the same
    # probabilities; one cell works too (dynamic batch).
    assert np.abs(onnx_model.run(cells) - probs).max() <= 1e-6
    one_probs, one_heatmap = onnx_model.run(cells[:1], heatmaps=True)
    assert np.allclose(one_heatmap, heatmap[:1], atol=1e-5)


# --------------------------------------------------------------------------- localisation

SIZE, LINE_WIDTH, NEAR = 80, 4, 8  # pixels (layer4 is 3x3); NEAR: "on the line" = within 8 px of it


def line_distance(rng: np.random.Generator) -> np.ndarray:
    """Distance of every pixel to a random row, column or diagonal."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:
        return np.abs(yy - rng.integers(8, SIZE - 8))
    if kind == 1:
        return np.abs(xx - rng.integers(8, SIZE - 8))
    sign = rng.choice([-1, 1])  # either diagonal direction
    offset = rng.integers(-SIZE // 2, SIZE // 2)
    return np.abs(xx - (yy if sign > 0 else SIZE - 1 - yy) - offset) / math.sqrt(2)


def synthetic_cells(rng: np.random.Generator, n: int):
    """Noisy cells of random brightness (so the mean gives nothing away); every
    other one has a dark line. Returns normalised [n, 1, S, S], labels, distances."""
    cells = rng.normal(0.6, 0.05, size=(n, SIZE, SIZE)) + rng.uniform(-0.1, 0.1, size=(n, 1, 1))
    labels = np.zeros(n, dtype=np.float32)
    distances = np.full((n, SIZE, SIZE), np.inf)
    for i in range(0, n, 2):
        distances[i] = line_distance(rng)
        cells[i][distances[i] <= LINE_WIDTH / 2] -= 0.4
        labels[i] = 1
    x = torch.from_numpy(((cells - 0.6) / 0.15).astype(np.float32))[:, None]
    return x, torch.from_numpy(labels), distances


@pytest.mark.slow
def test_heatmap_peak_lies_on_the_line():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ResNet("resnet18", num_labels=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        x, y, _ = synthetic_cells(rng, 8)
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # Forty small steps leave BN's running statistics behind the weights;
    # re-estimate them (no weight changes) so eval mode sees what training saw.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(synthetic_cells(rng, 32)[0])
    model.eval()

    x, y, distances = synthetic_cells(np.random.default_rng(99), 128)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
    accuracy = float(((logits[:, 0] > 0).float() == y).float().mean())
    assert accuracy >= 0.85, f"the model did not learn to find the line (accuracy {accuracy:.2f})"

    near = LINE_WIDTH / 2 + NEAR
    hits, chance = [], []
    for i in np.flatnonzero(y.numpy() == 1):
        peak = heatmap_peak(upsample_heatmap(cam[i, 0].numpy(), SIZE))
        hits.append(distances[i][peak] <= near)
        chance.append(float((distances[i] <= near).mean()))  # a random pixel's odds
    hit_rate, chance_rate = float(np.mean(hits)), float(np.mean(chance))
    assert hit_rate >= chance_rate + 0.2, f"peak on the line {hit_rate:.2f}, chance {chance_rate:.2f}"
