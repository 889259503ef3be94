"""ONNX export of a trained model, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from elcell.cells.images import Decoding
from elcell.errors import ExportError
from elcell.infer.modelinfo import INPUT_NAME, OUTPUT_NAMES, ModelInfo, write_info
from elcell.io import atomic_path, output_mode
from elcell.training.lightning_module import ELCellModule
from elcell.training.nets.cellnet import CellNet, heatmap_settings

# How far ONNX Runtime may differ from PyTorch on the same cells. Probabilities:
# float kernels of different CPUs agree to about 1e-6. Heatmaps (mean |diff| as
# a share of the peak) are backpropagated through ReLU masks that rounding can
# flip: 1.4e-4 was seen on an AMD Zen 3 at 96 px, and 1e-3 is still invisible
# in an overlay. A failing check keeps the run and says how to export anyway.
PARITY_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-3


class InferenceGraph(nn.Module):
    """uint8 gray cells in; probabilities, heatmaps (as the model's cam_* say) and
    coarse maps out."""

    def __init__(self, model: CellNet, mean: float, std: float):
        super().__init__()
        self.model = model
        self.mean, self.std = float(mean), float(std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images.float() / 255.0 - self.mean) / self.std
        logits, heatmap, coarse = self.model.forward_with_cams(x)
        return torch.sigmoid(logits), heatmap, coarse


def export_onnx(model: CellNet, info: ModelInfo, out: str | Path,
                check_images: np.ndarray | None = None, tolerance: float = PARITY_TOLERANCE) -> float:
    """Write `model` as an elcell ONNX file and return the parity error.

    Parity is checked on a batch of 4 (real cells when `check_images` is given):
    the largest |probability difference| between PyTorch and ONNX Runtime must
    stay within 1e-4, or nothing is written and ExportError is raised.
    """
    out = Path(out)
    graph = InferenceGraph(model, info.mean, info.std).eval().to("cpu", memory_format=torch.contiguous_format)
    size = info.decoding.size
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(out) as raw, _quiet_exporter():
        torch.onnx.export(
            graph, (example,), str(raw), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
        )
        write_info(raw, raw, info)
        error = check_parity(graph, raw, check_images, tolerance)
    return error


def check_parity(graph: InferenceGraph, onnx_path: Path, images: np.ndarray | None,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """The largest |probability difference| between PyTorch and ONNX Runtime;
    ExportError beyond `tolerance` (heatmaps: beyond HEATMAP_TOLERANCE, or
    `tolerance` if larger)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_size = session.get_inputs()[0].shape[-1]
    if images is None or len(images) < 4:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(4, graph_size, graph_size), dtype=np.uint8)
    batch = np.ascontiguousarray(images[:4])[:, None]
    with torch.no_grad():
        probs, *maps = (t.numpy() for t in graph(torch.from_numpy(batch)))
    onnx_probs, *onnx_maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    error = float(np.abs(onnx_probs - probs).max())
    heatmap_error = max(heatmap_difference(a, b) for a, b in zip(onnx_maps, maps, strict=True))
    heatmap_tolerance = max(HEATMAP_TOLERANCE, tolerance)
    if not error <= tolerance or not heatmap_error <= heatmap_tolerance:
        raise ExportError(
            f"ONNX export does not match PyTorch: max |probs diff| {error:.2e} (tolerance {tolerance:g}), "
            f"heatmap diff {heatmap_error:.2e} of its peak (tolerance {heatmap_tolerance:g})"
        )
    return error


def heatmap_difference(a: np.ndarray, b: np.ndarray) -> float:
    """How far two heatmaps of the same cells differ, as a share of the peak: the
    mean of |a - b| over positions. Not the maximum: a heatmap backpropagated
    through ReLUs is piecewise, and where ONNX Runtime's float rounding puts a
    pre-activation on the other side of 0 (or of ReLU6's 6) than PyTorch's, a
    mask flips and a few positions (about 1 in 1000 of a stride-8 map of real
    cells, more on noise) differ by more, though the rest agree to 1e-6."""
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(a - b).mean()) / scale


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter narrates every step and warns about torchvision ops we do not use."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export",
                                                    "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def info_from_hparams(hparams, epoch: int) -> ModelInfo:
    n = len(hparams["label_names"])
    decoding = Decoding(int(hparams["image_size"]), hparams.get("shrink", "bilinear"),
                        int(hparams.get("bit_depth", 16)))
    return ModelInfo(
        labels=list(hparams["label_names"]), decoding=decoding,
        mean=float(hparams["mean"]), std=float(hparams["std"]),
        thresholds=[0.5] * n, review_thresholds=[0.5] * n,
        backbone=hparams["backbone"], epoch=int(epoch),
        # what inference may use for test-time augmentation (infer.Model.run_views)
        extra={"rotate90": bool(hparams.get("rotate90", False)),
               "input_norm": hparams.get("input_norm", "dataset"),  # for the record: it is in the graph
               "heatmap": heatmap_settings(int(hparams["image_size"]), bool(hparams.get("rotate90", False)))},
    )


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None,
                      check_images: np.ndarray | None = None, overwrite: bool = True,
                      tolerance: float = PARITY_TOLERANCE) -> tuple[Path, float]:
    """Re-export a Lightning checkpoint. `out` may be a file or a folder (default: the
    checkpoint's folder; a path ending in a separator is a folder, created if
    need be); in a folder the file is named best_model_epoch{N}.onnx, N counted
    from 1 as the training log counts."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ExportError(f"{checkpoint}: checkpoint not found")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        module = ELCellModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
        epoch = int(state["epoch"]) + 1  # counted from 1, as the training log and losses.png count
    except Exception as err:  # not a file torch can read, or a checkpoint of something else
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ExportError(f"{checkpoint}: not a checkpoint of `elcell train` ({reason})") from None
    folder = out is None or str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    out = Path(out) if out else checkpoint.parent
    if folder:
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"best_model_epoch{epoch}.onnx"
    output_mode(out, overwrite=overwrite)
    info = info_from_hparams(module.hparams, epoch)
    module.model.use_heatmap(info.extra["heatmap"])
    try:
        error = export_onnx(module.model, info, out, check_images, tolerance)
    except ExportError as err:  # the checkpoint is kept: say how to export it anyway
        raise ExportError(f"{err}. {checkpoint} is kept; to export it anyway: elcell export {checkpoint} "
                          f"--parity-tolerance {10 * tolerance:g}") from None
    return out, error

